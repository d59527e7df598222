"""Admission, on the engine's worker thread: pending requests leave the queue FIFO, up to `max_active`
running at once. Each gets its model (loaded, or found resident), its KV state (a batch row when the model
can batch, else its own stream, polled through a cancel hook that also reports prefill progress) and a KV
reservation against the memory budget (a batch row also pays for the padding its batch gains); cached
prefixes are evicted for it first. One that can never fit fails at once (OverBudgetError); one that must
wait for running requests to finish keeps its place at the head of the queue.

`Admission` is one part of `Engine` (engine.py holds the state it works on).
"""

from __future__ import annotations

import logging
import time
from typing import Optional

from .errors import OverBudgetError
from .prefix_cache import Run
from .registry import Resident
from .request import Event, Handle, Request
from .running import Running

log = logging.getLogger("mlxedge.engine")


class Admission:
    """The Engine's admission: `_admit` runs once per scheduler pass on the worker thread."""

    def _dequeue(self, handle: Handle, started: bool = False) -> None:
        self._pending.remove(handle)
        prepared = self._prepared.pop(handle.id, None)
        if prepared is not None and not started:
            run = prepared[1]
            if run.events is not None:
                run.events.close()
            self.cache.close(run)  # a cached state taken for a request that never ran goes back, untouched
        with self._lock:
            self._waiting -= 1

    def _admit(self) -> None:
        while self._pending and len(self._running) < self.max_active:
            handle = self._pending[0]
            if handle.cancelled:
                self._dequeue(handle)
                self.metrics.inc("mlxedge_requests_total", model=handle.request.model, outcome="cancelled")
                handle.push(Event("done", finish_reason="cancelled", stats={"generation_tokens": 0}))
                continue
            try:
                prepared = self._prepare(handle)
            except Exception as exc:
                self._dequeue(handle)
                self._fail(handle, exc)
                continue
            resident, run, load_s = prepared
            need = self._kv_need(resident, run, handle.request)
            headroom = self.registry.headroom_bytes()
            reserved = sum(r.kv_bytes for r in self._running)
            if headroom is not None:
                if reserved + need + self.cache.nbytes > headroom:
                    self.cache.evict(headroom - reserved - need)  # cached prefixes yield to running requests
                headroom -= self.cache.nbytes
            if headroom is not None and need > headroom:
                self._dequeue(handle)
                self._fail(handle, OverBudgetError(
                    f"this request's KV cache ({need / 1e6:.0f} MB for {len(run.prompt_ids)} prompt + "
                    f"{handle.request.max_tokens} new tokens) does not fit the {max(0, headroom) / 1e6:.0f} MB "
                    "left in the memory budget; shorten the prompt or max_tokens"))
                continue
            if headroom is not None and reserved + need > headroom:
                return  # FIFO: wait until running requests release their KV caches
            self._dequeue(handle, started=True)
            resident.active += 1
            state = Running(handle=handle, resident=resident, run=run, kv_bytes=need,
                             admitted_at=time.perf_counter(), load_s=load_s)
            if run.row is not None:
                state.batch = run.batch
                self._owners[id(run.row)] = state
            self._running.append(state)
            with self._lock:
                self._active_count = len(self._running)
            handle.push(Event("progress", processed=run.cached_tokens, total=len(run.prompt_ids)))

    def _prepare(self, handle: Handle):
        if handle.id in self._prepared:
            return self._prepared[handle.id]
        request = handle.request
        before = self.registry.resident.get(request.model)
        started = time.perf_counter()
        resident = self.registry.get(request.model, keep_alive=request.keep_alive)
        load_s = 0.0 if before is resident else time.perf_counter() - started
        batch = self._batch_for(resident)
        if batch is not None:
            run = self.cache.open_row(resident, request)
            run.batch = batch
        else:
            self.metrics.inc("mlxedge_unbatched_requests_total", model=resident.name,
                             reason=self._unbatched[resident.name][1])
            poll = PrefillProgress(handle)
            run = self.cache.open(resident, request, cancel=poll,
                                  enabled=self.registry.load_options.get("kv_overflow") != "rotate")
            poll.run = run
        self._prepared[handle.id] = (resident, run, load_s)
        return self._prepared[handle.id]

    def _batch_for(self, resident: Resident):
        """The DecodeBatch of this resident model, or None when it cannot batch (the reason logged once)."""
        name = resident.name
        entry = self._batches.get(name)
        if entry is not None and entry[0] is resident:
            return entry[1]
        known = self._unbatched.get(name)
        if known is not None and known[0] is resident:
            return None
        reason = resident.model.batching_unsupported()
        if reason is not None:
            reason = " ".join(str(reason).split())[:200]  # one line: it is a /metrics label value too
        if reason is None:
            self._batches[name] = (resident, resident.model.new_batch())
            self._unbatched.pop(name, None)
            self.batching[name] = {"batched": True, "forwards": 0, "row_steps": 0, "max_rows": 0}
            return self._batches[name][1]
        self._batches.pop(name, None)
        self._unbatched[name] = (resident, reason)
        self.batching[name] = {"batched": False, "reason": reason}
        log.warning("model %s cannot batch requests (%s); they decode one token each in turn", name, reason)
        return None

    def _kv_need(self, resident: Resident, run: Run, request: Request) -> int:
        """KV bytes to reserve for a request: its own prompt + max_tokens; a batch row also pays what its
        batch grows by, since every row is padded to the longest (B x longest minus what is reserved)."""
        own = len(run.prompt_ids) + request.max_tokens
        if run.row is None:
            return int(own * resident.kv_bytes_per_token)
        mates = [s for s in self._running if s.run.row is not None and s.resident is resident]
        longest = max([len(s.run.prompt_ids) + s.handle.request.max_tokens for s in mates], default=0)
        grows = (len(mates) + 1) * max(longest, own) - len(mates) * longest
        return int(grows * resident.kv_bytes_per_token)


class PrefillProgress:
    """The cancel hook handed to the model's stream, which also reports prefill progress.

    The generation loop polls the hook before every prefill chunk and after every token; while the prompt
    is still being prefilled, the KV state's token count is exactly how much of it is done, so each poll
    that finds more of it done reports a `progress` event (processed/total).
    """

    def __init__(self, handle: Handle):
        self.handle = handle
        self.run: Optional[Run] = None
        self.reported = -1

    def __call__(self) -> bool:
        run = self.run
        if run is not None and run.state is not None:
            done, total = len(run.state.tokens), len(run.prompt_ids)
            if max(self.reported, run.cached_tokens) < done < total:
                self.reported = done
                self.handle.push(Event("progress", processed=done, total=total))
        return self.handle.cancelled
