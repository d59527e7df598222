"""Keeping a generation inside its memory plan: the context guard and, on macOS, the wired-memory limit.

- `check_generation_context`: before generating, prompt + max_tokens against the planned context: fits
  ("full"), keeps a rotating window of the latest tokens when asked, or a GenerationError saying what to change.
- `wired_limit`: on macOS with Metal, wire the plan's bytes for the duration of generation and restore the
  previous limit after (also on an exception); a no-op where Metal is absent.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

from ..errors import GenerationError


@dataclass(frozen=True)
class ContextDecision:
    """How the KV cache is to be kept: "full" (every token, within the plan) or "rotating" (last `window`)."""

    mode: str
    window: int
    tokens_needed: int


def check_generation_context(prompt_tokens: int, max_tokens: int, context_length: int, *,
                             rotating: bool = False) -> ContextDecision:
    """Check prompt + max_tokens against the planned context before generating.

    Fits: mode "full". Too long and rotating=True: mode "rotating" with a window of `context_length` (the KV
    cache keeps the latest tokens, memory stays at the plan). Too long otherwise: GenerationError saying
    by how much and what to change.
    """
    if prompt_tokens < 0 or max_tokens < 0:
        raise GenerationError(f"prompt_tokens and max_tokens must not be negative (got {prompt_tokens}, {max_tokens}).")
    needed = int(prompt_tokens) + int(max_tokens)
    if needed <= context_length:
        return ContextDecision("full", int(context_length), needed)
    if rotating:
        return ContextDecision("rotating", int(context_length), needed)
    if prompt_tokens > context_length:
        raise GenerationError(
            f"the prompt has {prompt_tokens} tokens but the model was planned for a {context_length}-token context; "
            f"shorten the prompt, load with context_length={needed} or more, or ask for a rotating KV window.")
    raise GenerationError(
        f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = {needed} exceeds the planned "
        f"{context_length}-token context; use max_tokens={context_length - prompt_tokens} or less, load with "
        f"context_length={needed} or more, or ask for a rotating KV window.")


class _MlxMetal:
    """The slice of MLX that `wired_limit` uses; tests substitute a fake with the same methods."""

    def is_available(self) -> bool:
        import mlx.core as mx

        return bool(mx.metal.is_available())

    def device_info(self) -> dict:
        import mlx.core as mx

        return dict(mx.device_info())

    def set_wired_limit(self, limit: int) -> int:
        import mlx.core as mx

        return int(mx.set_wired_limit(int(limit)))

    def synchronize(self) -> None:
        import mlx.core as mx

        mx.synchronize()


@contextmanager
def wired_limit(plan_bytes: int, *, metal=None) -> Iterator[Optional[int]]:
    """Keep the plan's bytes wired (resident) on the GPU for the duration of the block, then restore.

    On macOS with Metal: set the wired limit to min(plan_bytes, the recommended working set) on enter, and
    on exit (also on an exception) synchronize and set it back to the previous value. Yields the limit set,
    or None where Metal is absent (a no-op) or the system refuses the limit (nothing to restore then).
    """
    metal = metal if metal is not None else _MlxMetal()
    if not metal.is_available():
        yield None
        return
    recommended = (metal.device_info() or {}).get("max_recommended_working_set_size")
    target = int(min(plan_bytes, recommended)) if recommended else int(plan_bytes)
    try:
        previous = metal.set_wired_limit(target)
    except (RuntimeError, ValueError):
        yield None
        return
    try:
        yield target
    finally:
        sync = getattr(metal, "synchronize", None)
        if sync is not None:
            sync()
        metal.set_wired_limit(previous)
