"""The ASGI app: OpenAI and Ollama routes over one Engine, /health, /metrics, and the safety layer
(optional API key, request body limit, CORS only when asked, JSON errors everywhere)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Optional, Sequence

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse


from ..engine import Engine
from . import errors, ollama_api, openai_api

OPEN_PATHS = ("/health",)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens: int = 4096          # the most any request may ask for
    default_max_tokens: int = 512   # when a request does not say


class _Guard:
    """Pure ASGI middleware: API key and body-size checks before any route runs (streams stay unbuffered)."""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int, metrics):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = []

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self._guarded(scope, receive, counting_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.inc("mlxedge_http_requests_total", path=route, status=str(status[0] if status else 0))

    async def _guarded(self, scope, receive, send):
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and path not in OPEN_PATHS and scope.get("method") != "OPTIONS":
            given = headers.get("authorization", "")
            token = given[7:].strip() if given.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return await errors.error_response(path, "unauthorized", "missing or wrong API key: send "
                                                   "'Authorization: Bearer <key>'")(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await errors.error_response(path, "too_large", f"request body over {self.max_body} bytes")(
                scope, receive, send)
        if scope.get("method") == "POST" and "json" not in headers.get("content-type", ""):
            # `curl -d '{...}'` (Ollama's documented usage) sends a form content type: bodies are JSON here
            scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"] + \
                [(b"content-type", b"application/json")]
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise errors.ApiError("too_large", f"request body over {self.max_body} bytes")
            return message

        return await self.app(scope, limited_receive, send)


def create_app(engine: Engine, *, api_key: Optional[str] = None, allow_origins: Sequence[str] = (),
               limits: Limits = Limits()) -> FastAPI:
    app = FastAPI(title="mlxedge", version=_version(), docs_url=None, redoc_url=None)
    errors.install(app)
    app.include_router(openai_api.router(engine, limits))
    app.include_router(ollama_api.router(engine, limits))

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": [r["name"] for r in engine.registry.snapshot()],
                "queued": engine.queue_depth(), "running": engine.active_count()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(engine.prometheus(), media_type="text/plain; version=0.0.4")

    if allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"])
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes, metrics=engine.metrics)
    return app


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mlxedge")
    except Exception:
        return "0"


__all__ = ["create_app", "Limits"]
