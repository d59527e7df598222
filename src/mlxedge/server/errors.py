"""HTTP errors: every failure becomes a JSON body in the caller's dialect (OpenAI or Ollama), no tracebacks."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import EngineError, error_code, error_message
from ..errors import MlxedgeError

log = logging.getLogger("mlxedge.server")

STATUS = {"bad_request": 400, "not_found": 404, "over_budget": 400, "busy": 429, "cancelled": 499,
          "internal": 500, "unauthorized": 401, "too_large": 413, "not_allowed": 405}
OPENAI_TYPE = {"not_found": "invalid_request_error", "bad_request": "invalid_request_error",
               "over_budget": "invalid_request_error", "busy": "rate_limit_error", "unauthorized": "authentication_error",
               "too_large": "invalid_request_error", "internal": "server_error", "cancelled": "server_error",
               "not_allowed": "invalid_request_error"}


class ApiError(EngineError):
    """An error raised by the HTTP layer itself, with its code and the offending parameter."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.param = param


def error_response(path: str, code: str, message: str, param: str | None = None) -> JSONResponse:
    status = STATUS.get(code, 500)
    headers = {"Retry-After": "1"} if code == "busy" else None
    if path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    error_code_field = "model_not_found" if code == "not_found" else code
    return JSONResponse({"error": {"message": message, "type": OPENAI_TYPE.get(code, "server_error"),
                                   "param": param, "code": error_code_field}}, status_code=status, headers=headers)


def exception_response(path: str, exc: BaseException) -> JSONResponse:
    code = error_code(exc)
    if code == "internal":
        log.error("internal error on %s", path, exc_info=exc)
    return error_response(path, code, error_message(exc), getattr(exc, "param", None))


def install(app) -> None:
    @app.exception_handler(MlxedgeError)
    async def _known(request: Request, exc: MlxedgeError):
        return exception_response(request.url.path, exc)

    @app.exception_handler(Exception)   # last resort (Starlette's server-error layer): still JSON, no traceback
    async def _any(request: Request, exc: Exception):
        return exception_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"invalid request: {where + ': ' if where else ''}{first.get('msg', 'malformed body')}"
        return error_response(request.url.path, "bad_request", message, where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "not_allowed", 401: "unauthorized", 413: "too_large"}.get(
            exc.status_code, "bad_request")
        message = exc.detail if isinstance(exc.detail, str) else "bad request"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        response = error_response(request.url.path, code, message)
        response.status_code = exc.status_code
        return response
