"""The engine's typed failures and the one mapping from any exception to a protocol error code.

Every front-end (HTTP, stdio bridge) reports errors by these codes: bad_request, not_found, over_budget,
busy, cancelled, internal. Messages are one line a person can act on; tracebacks never leave the process.
"""

from __future__ import annotations

from ..errors import GenerationError, MemoryBudgetError, MlxedgeError, QuantizationError, SourceError, UnsupportedError

CODES = ("bad_request", "not_found", "over_budget", "busy", "cancelled", "internal")


class EngineError(MlxedgeError):
    code = "internal"


class BadRequestError(EngineError):
    code = "bad_request"


class ModelNotFoundError(EngineError):
    code = "not_found"


class OverBudgetError(EngineError):
    code = "over_budget"


class BusyError(EngineError):
    code = "busy"


class CancelledError(EngineError):
    code = "cancelled"


def error_code(exc: BaseException) -> str:
    """The protocol code for an exception (anything unexpected is `internal`)."""
    if isinstance(exc, EngineError):
        return exc.code
    if isinstance(exc, MemoryBudgetError):
        return "over_budget"
    if isinstance(exc, SourceError):
        return "not_found"
    if isinstance(exc, (GenerationError, QuantizationError, UnsupportedError, ValueError, TypeError)):
        return "bad_request"
    return "internal"


def error_message(exc: BaseException) -> str:
    """A one-line message safe to show a client: MlxedgeError text as is, anything else generic."""
    if isinstance(exc, (MlxedgeError, ValueError, TypeError)):
        return " ".join(str(exc).split()) or type(exc).__name__
    return f"internal error ({type(exc).__name__}); see the server log"
