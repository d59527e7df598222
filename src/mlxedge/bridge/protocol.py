"""The bridge protocol, written once: a JSON Schema for every request and every event.

The bridge validates each request line against these; docs/bridge/*.schema.json are generated from them
(`python -m mlxedge.bridge.protocol docs/bridge`) and a test keeps the two identical.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..engine import CODES

PROTOCOL_VERSION = 1
SCHEMA_URI = "https://json-schema.org/draft/2020-12/schema"

_ID = {"type": ["string", "integer"], "description": "Chosen by the client; every event of the request echoes it."}
_SAMPLING = {
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": 0},
    "min_p": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0},
    "seed": {"type": "integer", "minimum": 0},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 16}]},
    "logprobs": {"type": "boolean", "description": "Attach the sampled token's log-probability to each delta."},
    "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
}
_MODEL = {"type": "string", "minLength": 1,
          "description": "Alias, directory or .gguf path; optional where a model is loaded (the last loaded)."}
_MESSAGE = {"type": "object", "required": ["role", "content"], "additionalProperties": False,
            "properties": {"role": {"enum": ["system", "user", "assistant", "tool"]}, "content": {"type": "string"}}}

_QUANT_SPEC = {"type": "object", "required": ["bits", "group_size", "modules"], "additionalProperties": False,
               "properties": {"bits": {"type": "integer"}, "group_size": {"type": "integer"},
                              "modules": {"type": "integer", "minimum": 1}}}
_RESIDENT = {
    "type": "object", "description": "A loaded model, as `load` answers it and `status` lists it.",
    "required": ["name", "bytes", "architecture", "parameters", "bits", "group_size", "quantization", "dtype",
                 "context_length"],
    "properties": {
        "name": {"type": "string"}, "source": {"type": "string"}, "bytes": {"type": "integer"},
        "architecture": {"type": "string"}, "parameters": {"type": "integer"},
        "bits": {"type": ["integer", "null"], "description": "Bits of the spec most modules use; null: unquantized."},
        "group_size": {"type": ["integer", "null"], "description": "Group size of that spec; null: unquantized."},
        "quantization": {"type": "array", "items": _QUANT_SPEC,
                         "description": "Every spec with its module count, most used first ([]: unquantized)."},
        "dtype": {"type": "string"}, "context_length": {"type": "integer"}}}
_RESULTS = {"load": _RESIDENT,  # the results whose shape a client relies on
            "status": {"type": "object", "required": ["resident"],
                       "properties": {"resident": {"type": "array", "items": _RESIDENT}}}}


def _request(op: str, description: str, props: dict, required=()) -> dict:
    return {"$schema": SCHEMA_URI, "title": f"request: {op}", "description": description, "type": "object",
            "required": ["id", "op", *required], "additionalProperties": False,
            "properties": {"id": _ID, "op": {"const": op}, **props}}


def _event(name: str, description: str, props: dict, required=(), id_nullable=False) -> dict:
    return {"$schema": SCHEMA_URI, "title": f"event: {name}", "description": description, "type": "object",
            "required": ["event", *(() if name == "ready" else ("id",)), *required], "additionalProperties": False,
            "properties": {**({} if name == "ready" else {"id": {"type": ["string", "integer", "null"]}
                                                            if id_nullable else _ID}),
                           "event": {"const": name}, **props}}


REQUESTS = {
    "load": _request("load", "Load a model (or keep it loaded); answers progress (stage load) then result.",
                     {"model": _MODEL, "keep_alive": {"type": "number", "minimum": 0}}, ["model"]),
    "unload": _request("unload", "Release a model's memory.", {"model": _MODEL}, ["model"]),
    "status": _request("status", "Loaded models, queue and cache state.", {}),
    "generate": _request("generate", "Complete a prompt: progress, delta..., done.",
                         {"model": _MODEL, "prompt": {"type": "string", "minLength": 1},
                          "raw": {"type": "boolean", "description": "Skip the chat template."}, **_SAMPLING},
                         ["prompt"]),
    "chat": _request("chat", "Reply to a conversation: progress, delta..., done.",
                     {"model": _MODEL, "messages": {"type": "array", "items": _MESSAGE, "minItems": 1}, **_SAMPLING},
                     ["messages"]),
    "session.create": _request("session.create", "Start a conversation kept by the bridge; result: {session}.",
                               {"model": _MODEL, "system": {"type": "string"}}),
    "session.send": _request("session.send", "Add a user message to a session and stream the reply.",
                             {"session": {"type": "string"}, "content": {"type": "string"}, **_SAMPLING},
                             ["session", "content"]),
    "session.messages": _request("session.messages", "The session's history; result: {messages}.",
                                 {"session": {"type": "string"}}, ["session"]),
    "session.reset": _request("session.reset", "Forget the session's turns (keeps its system prompt).",
                              {"session": {"type": "string"}}, ["session"]),
    "session.close": _request("session.close", "Drop the session.", {"session": {"type": "string"}}, ["session"]),
    "cancel": _request("cancel", "Stop request `target` at its next token; it ends with done (cancelled).",
                       {"target": _ID}, ["target"]),
    "tokenize": _request("tokenize", "Token ids of text; result: {tokens}.",
                         {"model": _MODEL, "text": {"type": "string"}}, ["text"]),
}

EVENTS = {
    "ready": _event("ready", "First line the bridge prints, once it reads requests.",
                    {"protocol": {"const": PROTOCOL_VERSION}, "version": {"type": "string"}},
                    ["protocol", "version"]),
    "result": {**_event("result", "The answer to a non-streaming request.",
                        {"op": {"enum": sorted(REQUESTS)}, "result": {"type": "object"}}, ["op", "result"]),
               "allOf": [{"if": {"properties": {"op": {"const": op}}},
                          "then": {"properties": {"result": result}}} for op, result in _RESULTS.items()]},
    "progress": _event("progress", "Work done so far: loading (tensors) or prompt prefill (tokens).",
                       {"stage": {"enum": ["load", "prefill"]}, "processed": {"type": "integer", "minimum": 0},
                        "total": {"type": "integer", "minimum": 0}}, ["stage", "processed", "total"]),
    "delta": _event("delta", "New text (may be empty when a token completes no character yet).",
                    {"text": {"type": "string"}, "token": {"type": "integer"},
                     "logprob": {"type": "object", "required": ["token", "token_id", "logprob"],
                                 "properties": {"token": {"type": "string"}, "token_id": {"type": "integer"},
                                                "logprob": {"type": "number"}, "bytes": {"type": "array"},
                                                "top_logprobs": {"type": "array"}}}},
                    ["text"]),
    "done": _event("done", "The end of a generation.",
                   {"finish_reason": {"enum": ["stop", "length", "cancelled"]}, "text": {"type": "string"},
                    "stats": {"type": "object", "required": ["prompt_tokens", "generation_tokens"],
                              "properties": {"prompt_tokens": {"type": "integer"},
                                             "generation_tokens": {"type": "integer"},
                                             "cached_tokens": {"type": "integer"}}}},
                   ["finish_reason", "text", "stats"]),
    "error": _event("error", "A request failed (or a line could not be read: id is null then).",
                    {"code": {"enum": list(CODES)}, "message": {"type": "string"}}, ["code", "message"],
                    id_nullable=True),
}


def schema_files() -> dict:
    """file name -> schema, as written under docs/bridge/."""
    files = {f"request.{op}.schema.json": s for op, s in REQUESTS.items()}
    files.update({f"event.{name}.schema.json": s for name, s in EVENTS.items()})
    return files


def write(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, schema in schema_files().items():
        (directory / name).write_text(json.dumps(schema, indent=2) + "\n")


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/bridge"))
