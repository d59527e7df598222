"""Delivery, on the engine's worker thread: what a running request's model events become for its client.

Tokens go out as `delta` events (the first one after a last `progress` event), held back when the request
asked for logprobs until the end, when one forward pass computes them all (logprobs.token_logprobs); the
end is one `done` event with the request's stats (queue, load, prefill and decode times), or an `error`
event with its protocol code. Finishing retires the request: its batch row, KV reservation and prefix-cache
entry are released and the metrics counted.

`Delivery` is one part of `Engine` (engine.py holds the state it works on).
"""

from __future__ import annotations

import logging
import time
from typing import Optional

from .errors import error_code, error_message
from .logprobs import token_logprobs
from .request import Event, Handle
from .running import Running

log = logging.getLogger("mlxedge.engine")


class Delivery:
    """The Engine's event delivery and request endings (worker thread)."""

    def _fail(self, handle: Handle, exc: BaseException) -> None:
        code = error_code(exc)
        if code == "internal":
            log.exception("request %s failed", handle.id, exc_info=exc)
        self.metrics.inc("mlxedge_requests_total", model=handle.request.model, outcome=code)
        handle.push(Event("error", code=code, message=error_message(exc)))

    def _handle_event(self, state: Running, event) -> None:
        if event.finish_reason is None:
            self._deliver_token(state, event)
        else:
            if event.text:
                self._emit(state, Event("delta", text=event.text))
            self._finish(state, event.finish_reason, event.stats)

    def _deliver_token(self, state: Running, event) -> None:
        if state.first_at is None:
            state.first_at = time.perf_counter()
            state.handle.push(Event("progress", processed=len(state.run.prompt_ids),
                                    total=len(state.run.prompt_ids)))
        state.tokens.append(event.token)
        self._emit(state, Event("delta", text=event.text, token=event.token))

    def _emit(self, state: Running, event: Event) -> None:
        if state.handle.request.logprobs:
            state.held.append(event)
        else:
            state.handle.push(event)

    def _finish(self, state: Running, reason: str, model_stats: Optional[dict]) -> None:
        handle, request = state.handle, state.handle.request
        now = time.perf_counter()
        if state.held:
            try:
                self._release_with_logprobs(state)
            except Exception as exc:
                self._retire(state)
                self._fail(handle, exc)
                return
        stats = dict(model_stats or {"prompt_tokens": len(state.run.prompt_ids),
                                     "generation_tokens": len(state.tokens)})
        first = state.first_at or now
        stats.update(cached_tokens=int(stats.get("cached_prompt_tokens", state.run.cached_tokens)), queue_s=state.admitted_at - handle.created - state.load_s,
                     load_s=state.load_s, prefill_s=first - state.admitted_at, decode_s=now - first,
                     total_s=now - handle.created)
        self._retire(state)
        model = request.model
        self.metrics.inc("mlxedge_requests_total", model=model, outcome=reason)
        self.metrics.inc("mlxedge_prompt_tokens_total", stats.get("prompt_tokens", 0), model=model)
        self.metrics.inc("mlxedge_generated_tokens_total", stats.get("generation_tokens", 0), model=model)
        if state.first_at is not None:
            self.metrics.observe_generation(stats.get("ttft_s", first - state.admitted_at),
                                            stats.get("generation_tps", 0.0))
        self.recent.append(handle)
        handle.push(Event("done", finish_reason=reason, stats=stats))

    def _retire(self, state: Running) -> None:
        self._running.remove(state)
        if state.run.row is not None:
            state.batch.remove(state.run.row)  # no-op once it has left
            self._owners.pop(id(state.run.row), None)
        with self._lock:
            self._active_count = len(self._running)
        state.resident.active -= 1
        state.resident.last_used = time.monotonic()
        self.cache.close(state.run)

    def _release_with_logprobs(self, state: Running) -> None:
        request = state.handle.request
        entries = token_logprobs(state.resident.model, state.run.prompt_ids, state.tokens, request.top_logprobs)
        by_token = iter(entries)
        for event in state.held:
            if event.token is not None:
                event.logprob = next(by_token)
            state.handle.push(event)
        state.held = []
