"""Ollama-compatible routes: /api/chat, /api/generate (NDJSON streams), /api/tags, /api/show, /api/ps,
/api/pull, /api/version."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, List, Optional, Union

from fastapi import APIRouter, Request as HttpRequest
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

import mlxedge

from ..engine import Request, canonical_name
from . import runs
from .errors import ApiError

OLLAMA_COMPAT_VERSION = "0.6.0"   # what /api/version reports: the Ollama API level these routes follow
_DURATION = re.compile(r"^\s*(-?[0-9.]+)\s*(ms|s|m|h)?\s*$")


class Options(BaseModel):
    model_config = ConfigDict(extra="allow")
    temperature: Optional[float] = Field(default=None, ge=0.0, le=100.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=0)
    min_p: Optional[float] = Field(default=None, ge=0.0, lt=1.0)
    repeat_penalty: Optional[float] = Field(default=None, gt=0.0, le=100.0)
    seed: Optional[int] = Field(default=None, ge=0, lt=2**63)
    num_predict: Optional[int] = None
    stop: Optional[List[str]] = None


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(pattern="^(system|user|assistant|tool)$")
    content: str = ""
    images: Optional[List[str]] = None


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=512)
    stream: Optional[bool] = True
    options: Optional[Options] = None
    format: Optional[Union[str, Dict[str, Any]]] = None
    keep_alive: Optional[Union[float, str]] = None
    think: Optional[Union[bool, str]] = None


class ChatBody(_Base):
    messages: List[OllamaMessage] = Field(default_factory=list)
    tools: Optional[List[Dict[str, Any]]] = None


class GenerateBody(_Base):
    prompt: Optional[str] = ""
    system: Optional[str] = None
    raw: Optional[bool] = False
    images: Optional[List[str]] = None
    template: Optional[str] = None
    context: Optional[List[int]] = None
    suffix: Optional[str] = None


class NameBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Optional[str] = Field(default=None, max_length=512)
    name: Optional[str] = Field(default=None, max_length=512)
    stream: Optional[bool] = True

    @property
    def target(self) -> str:
        name = self.model or self.name
        if not name:
            raise ApiError("bad_request", "model is required")
        return name


def keep_alive_seconds(value) -> Optional[float]:
    """Ollama's keep_alive: seconds as a number, or "5m"/"30s"/"1h"/"250ms"; negative keeps the model forever."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ApiError("bad_request", f"keep_alive {value!r} is not a duration such as 300, \"5m\" or \"1h\"",
                           "keep_alive")
        number, unit = float(match.group(1)), match.group(2) or "s"
        seconds = number * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return float("inf") if seconds < 0 else seconds


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _refuse(body: _Base) -> None:
    if body.format not in (None, ""):
        raise ApiError("bad_request", "format (JSON mode / schema) is not supported: there is no constrained "
                       "decoding yet, so the reply would not be guaranteed to match it; omit format")
    if getattr(body, "tools", None):
        raise ApiError("bad_request", "tools are not supported")
    for name in ("images", "template", "context", "suffix"):
        if getattr(body, name, None):
            raise ApiError("bad_request", f"{name} is not supported")


def _request(body: _Base, prompt, raw: bool, limits) -> Request:
    opts = body.options or Options()
    max_tokens = opts.num_predict if opts.num_predict and opts.num_predict > 0 else limits.default_max_tokens
    if max_tokens > limits.max_tokens:
        raise ApiError("bad_request", f"num_predict {max_tokens} is over this server's limit of {limits.max_tokens}")
    sampling = {k: v for k, v in (("temperature", opts.temperature), ("top_p", opts.top_p), ("top_k", opts.top_k),
                                  ("min_p", opts.min_p), ("repetition_penalty", opts.repeat_penalty),
                                  ("seed", opts.seed)) if v is not None}
    return Request(model=canonical_name(body.model), prompt=prompt, raw=raw, max_tokens=max_tokens,
                   sampling=sampling, stop=[s for s in (opts.stop or []) if s],
                   keep_alive=keep_alive_seconds(body.keep_alive))


def _final_fields(done) -> dict:
    stats = done.stats or {}
    ns = lambda s: int(max(0.0, float(s)) * 1e9)  # noqa: E731
    return {"done": True, "done_reason": "stop" if done.finish_reason == "cancelled" else done.finish_reason,
            "total_duration": ns(stats.get("total_s", 0)), "load_duration": ns(stats.get("load_s", 0)),
            "prompt_eval_count": int(stats.get("prompt_tokens", 0)),
            "prompt_eval_duration": ns(stats.get("prefill_s", 0)),
            "eval_count": int(stats.get("generation_tokens", 0)), "eval_duration": ns(stats.get("decode_s", 0))}


def _ndjson(obj) -> str:
    return json.dumps(obj, separators=(",", ":")) + "\n"


def _details(info: dict) -> dict:
    bits = info.get("bits")
    mixed = len({spec["bits"] for spec in info.get("quantization") or []}) > 1  # e.g. a K-quant recipe
    params = info.get("parameters") or 0
    return {"parent_model": "", "format": "gguf" if info.get("source_kind") == "gguf" else "safetensors",
            "family": info.get("architecture") or "", "families": [info.get("architecture") or ""],
            "parameter_size": f"{params / 1e6:.0f}M" if params < 1e9 else f"{params / 1e9:.1f}B",
            "quantization_level": "mixed" if mixed else f"Q{bits}" if bits else "F32"}


def router(engine, limits) -> APIRouter:
    api = APIRouter()

    async def run(body: _Base, prompt, raw: bool, http: HttpRequest, shape):
        _refuse(body)
        request = _request(body, prompt, raw, limits)
        started = await runs.start(engine, request)
        model = body.model
        if not body.stream:
            result = await runs.collect(started, http)
            return {"model": model, "created_at": _now(), **shape(result.text), **_final_fields(result.done)}

        async def stream():
            async for event in runs.events(started):
                if event.kind == "delta" and event.text:
                    yield _ndjson({"model": model, "created_at": _now(), **shape(event.text), "done": False})
                elif event.kind == "error":
                    yield _ndjson({"error": event.message})
                elif event.kind == "done":
                    yield _ndjson({"model": model, "created_at": _now(), **shape(""), **_final_fields(event)})

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    @api.post("/api/chat")
    async def chat(body: ChatBody, http: HttpRequest):
        if not body.messages:
            return await load_only(body)
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        if any(m.images for m in body.messages):
            raise ApiError("bad_request", "images are not supported")
        return await run(body, messages, False, http,
                         lambda text: {"message": {"role": "assistant", "content": text}})

    @api.post("/api/generate")
    async def generate(body: GenerateBody, http: HttpRequest):
        if not body.prompt:
            return await load_only(body)
        if body.raw:
            prompt, raw = body.prompt, True
        else:
            prompt = ([{"role": "system", "content": body.system}] if body.system else []) + \
                     [{"role": "user", "content": body.prompt}]
            raw = False
        return await run(body, prompt, raw, http, lambda text: {"response": text})

    async def load_only(body: _Base):
        """Ollama's idiom: a request without messages/prompt loads (or, with keep_alive 0, unloads) the model."""
        name = canonical_name(body.model)
        engine.registry.source_of(name)
        keep = keep_alive_seconds(body.keep_alive)
        if keep == 0:
            await asyncio.wrap_future(engine.call(lambda: engine.registry.unload(name)))
            reason = "unload"
        else:
            await asyncio.wrap_future(engine.call(lambda: engine.registry.get(name, keep_alive=keep).describe()))
            reason = "load"
        return {"model": body.model, "created_at": _now(), "response": "", "done": True, "done_reason": reason}

    @api.get("/api/tags")
    async def tags():
        resident = {r["name"]: r for r in engine.registry.snapshot()}
        models = []
        for name in engine.registry.known():
            entry = {"name": f"{name}:latest", "model": f"{name}:latest", "modified_at": _now(), "digest": "",
                     "size": int(resident[name]["bytes"]) if name in resident else 0}
            models.append(entry)
        return {"models": models}

    @api.post("/api/show")
    async def show(body: NameBody):
        name = canonical_name(body.target)
        engine.registry.source_of(name)
        info = await asyncio.wrap_future(engine.call(lambda: dict(engine.registry.get(name).model.info)))
        model_info = {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool)) or v is None}
        return {"modelfile": "", "parameters": "", "template": "", "details": _details(info),
                "model_info": model_info, "capabilities": ["completion"], "modified_at": _now()}

    @api.get("/api/ps")
    async def ps():
        models = []
        for r in engine.registry.snapshot():
            left = r["expires_in_s"] if r["expires_in_s"] is not None else 10 * 365 * 86400
            expires = datetime.now(timezone.utc) + timedelta(seconds=left)
            models.append({"name": f"{r['name']}:latest", "model": f"{r['name']}:latest", "size": int(r["bytes"]),
                           "size_vram": 0, "digest": "", "expires_at": expires.isoformat().replace("+00:00", "Z"),
                           "context_length": r["context_length"],
                           "details": _details({"architecture": r["architecture"], "parameters": r["parameters"],
                                                "bits": r["bits"], "quantization": r["quantization"]})})
        return {"models": models}

    @api.post("/api/pull")
    async def pull(body: NameBody):
        name = canonical_name(body.target)
        source = engine.registry.source_of(name)
        # plan() resolves the source, fetching an alias's file into the cache on first use, and reads headers
        plan = await asyncio.to_thread(mlxedge.plan, source)
        lines = [{"status": "pulling manifest"},
                 {"status": f"verifying {name}", "total": plan["weight_bytes"], "completed": plan["weight_bytes"]},
                 {"status": "success"}]
        if body.stream is False:
            return lines[-1]
        return StreamingResponse(iter(_ndjson(x) for x in lines), media_type="application/x-ndjson")

    @api.get("/api/version")
    async def version():
        return {"version": OLLAMA_COMPAT_VERSION}

    return api
