"""Checks of the arguments of the public generation calls (Model.generate/stream, Session.send/stream).

A bad argument — an unknown keyword, a wrong type, a value out of range — raises GenerationError with one line
naming the argument and what it accepts, never a bare TypeError or ValueError: these calls are driven from
other languages through the bridge, where MlxedgeError is the contract. Sampling values are checked by
`generate.sampler.SamplingParams.validate`, the KV-cache bits by `generate.kv_cache.validate_kv_bits`.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Callable, List, Optional

from .errors import GenerationError


def checked_call(func: Callable) -> Callable:
    """Decorator: arguments that do not bind to `func`'s signature raise GenerationError, not TypeError.

    The signature stays `func`'s own (functools.wraps), so help() and editors show every keyword.
    """
    signature = inspect.signature(func)
    accepted = [name for name, p in signature.parameters.items()
                if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise GenerationError(_binding_message(func.__qualname__, exc, kwargs, signature, accepted)) from None
        return func(*args, **kwargs)

    return wrapper


def _binding_message(name: str, exc: TypeError, kwargs: dict, signature, accepted: List[str]) -> str:
    unknown = [k for k in kwargs if k not in signature.parameters]
    if unknown:
        close = difflib.get_close_matches(unknown[0], accepted, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (f"{name}() has no argument {unknown[0]!r}{hint}; it accepts: {', '.join(accepted)}.")
    return f"{name}(): {exc}."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_max_tokens(max_tokens) -> int:
    if not _is_int(max_tokens) or max_tokens < 0:
        raise GenerationError(f"max_tokens must be an integer >= 0, got {max_tokens!r}.")
    return max_tokens


def check_stop(stop) -> Optional[List[str]]:
    """None, one string or a list of strings -> None or a list (empty strings stop nothing)."""
    if stop is None:
        return None
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise GenerationError(f"stop must be a string or a list of strings, got {stop!r}.")
    return list(items) or None


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise GenerationError(f"{name} must be True or False, got {value!r}.")
    return value


def check_cancel(cancel) -> Optional[Callable[[], bool]]:
    if cancel is not None and not callable(cancel):
        raise GenerationError(f"cancel must be a function returning True to stop, or None; got {cancel!r}.")
    return cancel


def check_num_draft_tokens(n) -> int:
    if not _is_int(n) or n < 1:
        raise GenerationError(f"num_draft_tokens must be an integer >= 1, got {n!r}.")
    return n


def check_ids(ids, vocab_size: int) -> List[int]:
    """Prompt token ids: a non-empty sequence of integers in [0, vocab_size)."""
    if isinstance(ids, (str, bytes, dict)) or not hasattr(ids, "__iter__"):
        raise GenerationError(f"ids must be a list of token ids, got {type(ids).__name__}.")
    values = list(ids)
    bad = next((v for v in values if not (_is_int(v) or hasattr(v, "__index__")) or isinstance(v, bool)), None)
    if bad is not None:
        raise GenerationError(f"ids must be integers, got {bad!r}.")
    values = [int(v) for v in values]
    if not values:
        raise GenerationError("ids is empty; give at least one token id.")
    out_of_range = next((v for v in values if not 0 <= v < vocab_size), None)
    if out_of_range is not None:
        raise GenerationError(f"token id {out_of_range} is outside the vocabulary [0, {vocab_size}).")
    return values
