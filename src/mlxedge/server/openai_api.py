"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions (SSE streaming or not)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Dict, List, Literal, Optional, Union

from fastapi import APIRouter, Request as HttpRequest
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..engine import Request
from . import runs
from .errors import ApiError


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "text"


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, List[ContentPart], None] = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=512)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    stop: Union[str, List[str], None] = None
    seed: Optional[int] = Field(default=None, ge=0, lt=2**63)
    n: Optional[int] = Field(default=None, ge=1)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    frequency_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    user: Optional[str] = None


class ChatCompletionRequest(_Common):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Optional[Union[str, Dict[str, Any]]] = None


class CompletionRequest(_Common):
    prompt: Union[str, List[str]]
    logprobs: Optional[int] = Field(default=None, ge=0, le=5)
    echo: Optional[bool] = False
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(default=None, ge=1)


def _refuse_unsupported(body: _Common) -> None:
    if (body.n or 1) != 1:
        raise ApiError("bad_request", "n > 1 is not supported; send one request per completion", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            raise ApiError("bad_request", f"{name} is not supported; leave it unset or 0", name)
    fmt = getattr(body, "response_format", None)
    if fmt is not None and fmt.type != "text":
        raise ApiError("bad_request", f"response_format {fmt.type!r} is not supported (no constrained decoding "
                       "yet): the reply would not be guaranteed to match it; omit response_format", "response_format")
    if getattr(body, "tools", None) or getattr(body, "tool_choice", None) not in (None, "none"):
        raise ApiError("bad_request", "tools / tool_choice are not supported", "tools")
    if getattr(body, "echo", False) or getattr(body, "suffix", None) or (getattr(body, "best_of", None) or 1) > 1:
        raise ApiError("bad_request", "echo, suffix and best_of > 1 are not supported", "echo")


def _stops(stop) -> List[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise ApiError("bad_request", "at most 4 stop sequences", "stop")
    return [s for s in stops if s]


def _message_text(message: ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.type != "text":
            raise ApiError("bad_request", f"message content of type {part.type!r} is not supported (text only)",
                           "messages")
        texts.append(part.text or "")
    return "".join(texts)


def _engine_request(body: _Common, prompt, raw: bool, limits, logprobs: bool, top: int) -> Request:
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or limits.default_max_tokens
    if max_tokens > limits.max_tokens:
        raise ApiError("bad_request", f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens}",
                       "max_tokens")
    sampling = {}
    if body.temperature is not None:
        sampling["temperature"] = body.temperature
    if body.top_p is not None:
        sampling["top_p"] = body.top_p
    if body.seed is not None:
        sampling["seed"] = body.seed
    return Request(model=body.model, prompt=prompt, raw=raw, max_tokens=max_tokens, sampling=sampling,
                   stop=_stops(body.stop), logprobs=logprobs, top_logprobs=top)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _finish(reason: Optional[str]) -> Optional[str]:
    return {"cancelled": "stop"}.get(reason, reason)


def _chat_logprobs(entries: List[dict]) -> dict:
    return {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"],
                         "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"]}
                                          for t in e.get("top_logprobs", [])]} for e in entries]}


def _completion_logprobs(entries: List[dict], offset: int = 0) -> dict:
    offsets, pos = [], offset
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs", [])} for e in entries],
            "text_offset": offsets}


def _sse_response(started, chunk: dict, delta, final, include_usage: bool, opening: Optional[dict] = None):
    """The SSE stream of one request: chunk dicts whose choice comes from delta(event) / final(reason), the
    usage chunk when asked, then `data: [DONE]`."""

    async def stream():
        if opening is not None:
            yield _sse(opening)
        async for event in runs.events(started):
            if event.kind == "delta" and (event.text or event.logprob):
                yield _sse({**chunk, "choices": [delta(event)]})
            elif event.kind == "error":
                yield _sse({"error": {"message": event.message, "type": "server_error", "code": event.code}})
            elif event.kind == "done":
                yield _sse({**chunk, "choices": [final(_finish(event.finish_reason))]})
                if include_usage:
                    yield _sse({**chunk, "choices": [], "usage": runs.usage(event.stats)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def router(engine, limits) -> APIRouter:
    api = APIRouter()

    @api.get("/v1/models")
    async def list_models():
        now = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": now, "owned_by": "mlxedge"}
                                           for name in engine.registry.known()]}

    @api.get("/v1/models/{model}")
    async def get_model(model: str):
        engine.registry.source_of(model)
        return {"id": model, "object": "model", "created": int(time.time()), "owned_by": "mlxedge"}

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HttpRequest):
        _refuse_unsupported(body)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _message_text(m)}
                    for m in body.messages]
        want_logprobs = bool(body.logprobs)
        request = _engine_request(body, messages, False, limits, want_logprobs, body.top_logprobs or 0)
        started = await runs.start(engine, request)
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": ident, "created": created, "model": body.model, "system_fingerprint": "mlxedge"}
        if not body.stream:
            result = await runs.collect(started, http)
            return {**head, "object": "chat.completion", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": result.text},
                "logprobs": _chat_logprobs(result.logprobs) if want_logprobs else None,
                "finish_reason": _finish(result.done.finish_reason)}], "usage": runs.usage(result.done.stats)}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        chunk = {**head, "object": "chat.completion.chunk"}
        opening = {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                         "finish_reason": None}]}

        def delta(event):
            lp = _chat_logprobs([event.logprob]) if event.logprob else None
            return {"index": 0, "delta": {"content": event.text}, "logprobs": lp, "finish_reason": None}

        def final(reason):
            return {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}

        return _sse_response(started, chunk, delta, final, include_usage, opening)

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        _refuse_unsupported(body)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError("bad_request", "prompt must be one string (batches of prompts are not supported)",
                               "prompt")
            prompt = prompt[0]
        if not prompt:
            raise ApiError("bad_request", "prompt must not be empty", "prompt")
        want = body.logprobs is not None
        request = _engine_request(body, prompt, True, limits, want, body.logprobs or 0)
        started = await runs.start(engine, request)
        ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": ident, "object": "text_completion", "created": created, "model": body.model,
                "system_fingerprint": "mlxedge"}
        if not body.stream:
            result = await runs.collect(started, http)
            return {**head, "choices": [{"index": 0, "text": result.text,
                                         "logprobs": _completion_logprobs(result.logprobs) if want else None,
                                         "finish_reason": _finish(result.done.finish_reason)}],
                    "usage": runs.usage(result.done.stats)}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        offset = [0]

        def delta(event):
            lp = _completion_logprobs([event.logprob], offset[0]) if event.logprob else None
            offset[0] += len(event.text)
            return {"index": 0, "text": event.text, "logprobs": lp, "finish_reason": None}

        def final(reason):
            return {"index": 0, "text": "", "logprobs": None, "finish_reason": reason}

        return _sse_response(started, head, delta, final, include_usage)

    return api
