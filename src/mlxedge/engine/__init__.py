"""Models resident in one process, shared by every long-running front-end (server, bridge).

`Engine` owns a worker thread that does all MLX work; front-ends submit `Request`s and read `Event`s from
the returned `Handle`. Errors carry a protocol `code` (see `errors.CODES`).
"""

from .engine import Engine
from .errors import (CODES, BadRequestError, BusyError, CancelledError, EngineError, ModelNotFoundError,
                     OverBudgetError, error_code, error_message)
from .logprobs import token_logprobs
from .registry import Registry, canonical_name
from .request import Event, Handle, Request

__all__ = ["Engine", "Request", "Event", "Handle", "Registry", "canonical_name", "token_logprobs", "CODES",
           "EngineError", "BadRequestError", "BusyError", "CancelledError", "ModelNotFoundError", "OverBudgetError",
           "error_code", "error_message"]
