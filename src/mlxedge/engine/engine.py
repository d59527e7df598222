"""The engine: one worker thread owns every model and all MLX work; front-ends submit requests to it.

Front-ends call `submit(request)` from any thread (or asyncio loop) and read the returned Handle's events.
The worker admits requests FIFO up to `max_active` running at once. Requests of a model that can batch
(`Model.batching_unsupported()` is None) decode together: each prefills alone, one chunk per scheduler
pass (so a long prompt does not stall the others), then joins its model's DecodeBatch, and every pass runs
ONE forward for all of that model's rows (continuous batching: rows join and leave between steps). Requests
of a model that cannot batch (a rotating window asked for at load, a quantized KV cache, an architecture
failing the batching probe) are stepped one token each in turn (fair round-robin); the reason is logged once per load
and counted in /metrics (mlxedge_unbatched_requests_total). Each request's KV cache is reserved against the
memory budget before it starts (a batch row also pays for the padding its batch gains); a queue longer
than `max_queue` answers BusyError at once instead of hanging. Cancellation (a flag on the handle) is
checked before every token.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import weakref

import mlx.core as mx
import numpy as np

from .errors import BusyError, OverBudgetError, error_code, error_message
from .metrics import Metrics
from .prefix_cache import PrefixCache, Run
from .registry import Registry, Resident
from .request import Event, Handle, Request

log = logging.getLogger("mlxedge.engine")

DEFAULT_MAX_QUEUE = 32
DEFAULT_MAX_ACTIVE = 8
DEFAULT_PREFIX_CACHE_BYTES = 512 * 1024 * 1024
EXPIRE_EVERY_S = 1.0


@dataclass
class _Running:
    handle: Handle
    resident: Resident
    run: Run
    kv_bytes: int
    admitted_at: float
    load_s: float
    batch: object = None     # the DecodeBatch its row decodes in (None: decoded on its own, round-robin)
    joined: bool = False     # its row has joined the batch (its prompt is prefilled)
    tokens: List[int] = field(default_factory=list)
    held: List[Event] = field(default_factory=list)     # deltas held back until logprobs are known
    first_at: Optional[float] = None


class Engine:
    def __init__(self, models=None, *, memory_budget=None, keep_alive: float = 300.0,
                 max_queue: int = DEFAULT_MAX_QUEUE, max_active: int = DEFAULT_MAX_ACTIVE,
                 prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES, load_options: Optional[dict] = None,
                 registry: Optional[Registry] = None):
        self.registry = registry or Registry(models, memory_budget=memory_budget, keep_alive=keep_alive,
                                             load_options=load_options)
        self.cache = PrefixCache(prefix_cache_bytes)
        self.metrics = Metrics()
        self.max_queue = max_queue
        self.max_active = max_active
        self.started = time.time()
        self._ids = itertools.count(1)
        self._inbox: "queue.Queue" = queue.Queue()
        self._pending: deque = deque()            # handles waiting for a slot or for KV budget (worker only)
        self._prepared = {}                       # handle id -> (resident, run, load_s) opened but not started
        self._running: List[_Running] = []        # worker only
        self._batches: Dict[str, tuple] = {}      # model name -> (Resident, DecodeBatch) (worker only)
        self._owners: Dict[int, _Running] = {}    # id(BatchRow) -> its running state (worker only)
        self._unbatched: Dict[str, tuple] = {}    # model name -> (Resident, reason it cannot batch)
        self.batching: Dict[str, dict] = {}       # model name -> batched forwards, row steps, largest batch
        self._waiting = 0                         # requests submitted and not yet running (under _lock)
        self._active_count = 0
        self._lock = threading.Lock()
        self._closing = False
        self.recent: deque = deque(maxlen=64)     # finished handles, newest last (status and tests read them)
        self._thread = threading.Thread(target=self._serve_then_release, name="mlxedge-engine", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    # ------------------------------------------------------------------ any thread
    def submit(self, request: Request, loop=None) -> Handle:
        """Queue a request; BusyError when the queue is full, BadRequestError for a malformed one."""
        request.validate()
        with self._lock:
            if self._closing:
                raise BusyError("the engine is shutting down")
            if self._waiting >= self.max_queue:
                self.metrics.inc("mlxedge_rejected_total", reason="busy")
                raise BusyError(f"the server is busy ({self._waiting} requests queued, limit {self.max_queue}); "
                                "retry shortly")
            self._waiting += 1
        handle = Handle(request, loop=loop)
        handle.id = next(self._ids)
        self._inbox.put(("request", handle))
        return handle

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() on the worker thread (anything touching models or MLX); its result as a Future."""
        fut: Future = Future()
        if self._closing:
            fut.set_exception(BusyError("the engine is shutting down"))
            return fut
        self._inbox.put(("call", fn, fut))
        return fut

    def run(self, fn: Callable[[], object], timeout: Optional[float] = None):
        return self.call(fn).result(timeout)

    def load(self, name: str, progress=None, keep_alive: Optional[float] = None) -> dict:
        return self.run(lambda: self.registry.get(name, progress=progress, keep_alive=keep_alive).describe())

    def unload(self, name: str) -> bool:
        def drop():
            self.cache.clear_model(name)
            return self.registry.unload(name)
        return self.run(drop)

    def tokenize(self, name: str, text: str) -> List[int]:
        return self.run(lambda: self.registry.get(name).model.tokenizer.encode(text))

    def queue_depth(self) -> int:
        with self._lock:
            return self._waiting

    def active_count(self) -> int:
        with self._lock:
            return self._active_count

    def status(self) -> dict:
        return {"resident": self.registry.snapshot(), "queued": self.queue_depth(), "running": self.active_count(),
                "max_queue": self.max_queue, "max_active": self.max_active, "prefix_cache": self.cache.stats(),
                "batching": self.batching_status(),
                "budget_bytes": self.registry.budget_bytes, "uptime_s": time.time() - self.started}

    def batching_status(self) -> Dict[str, dict]:
        """Per model: batched (bool), the reason when not, and the decode forwards run so far."""
        return {name: dict(entry) for name, entry in list(self.batching.items())}

    def prometheus(self) -> str:
        resident = self.registry.snapshot()
        cache = self.cache.stats()
        gauges = {
            "mlxedge_queue_depth": ("requests waiting for a slot", self.queue_depth()),
            "mlxedge_running_requests": ("requests generating now", self.active_count()),
            "mlxedge_resident_models": ("models loaded", len(resident)),
            "mlxedge_resident_bytes": ("planned bytes of loaded models", sum(r["bytes"] for r in resident)),
            "mlxedge_prefix_cache_bytes": ("bytes held by the prefix cache", cache["bytes"]),
            "mlxedge_prefix_cache_hits": ("requests that reused a cached prefix", cache["hits"]),
            "mlxedge_prefix_cache_misses": ("requests that found no cached prefix", cache["misses"]),
            "mlxedge_batch_rows_max": ("the most requests one batched decode forward has run",
                                       max([b.get("max_rows", 0) for b in list(self.batching.values())], default=0)),
        }
        return self.metrics.render(gauges, help_of=lambda name: _HELP.get(name, name))

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything and stop the worker (models are released with it)."""
        with self._lock:
            self._closing = True
        self._inbox.put(("close",))
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker thread
    def _serve_then_release(self) -> None:
        try:
            self._serve()
        finally:
            # MLX keeps per-thread streams; a thread that used them must clear them before it ends, or the
            # process aborts at exit ("terminate called without an active exception").
            mx.clear_streams()

    def _serve(self) -> None:
        last_expire = time.monotonic()
        while True:
            idle = not self._running and not self._pending
            try:
                item = self._inbox.get(timeout=EXPIRE_EVERY_S) if idle else self._inbox.get_nowait()
            except queue.Empty:
                item = None
            while item is not None:
                if item[0] == "close":
                    self._shutdown()
                    return
                self._handle_item(item)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = None
            try:
                self._admit()
                self._step()
                if time.monotonic() - last_expire >= EXPIRE_EVERY_S:
                    last_expire = time.monotonic()
                    for name in self.registry.expire():
                        self.cache.clear_model(name)
                        log.info("unloaded %s after its keep_alive", name)
            except Exception:  # a bug in the scheduler itself: log it, keep the worker (and every client) alive
                log.exception("engine scheduling step failed")

    def _handle_item(self, item) -> None:
        if item[0] == "request":
            self._pending.append(item[1])
            return
        _, fn, fut = item
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as exc:  # handed to the caller, who reports it
            fut.set_exception(exc)

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

    def _fail(self, handle: Handle, exc: BaseException) -> None:
        code = error_code(exc)
        if code == "internal":
            log.exception("request %s failed", handle.id, exc_info=exc)
        self.metrics.inc("mlxedge_requests_total", model=handle.request.model, outcome=code)
        handle.push(Event("error", code=code, message=error_message(exc)))

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
            state = _Running(handle=handle, resident=resident, run=run, kv_bytes=need,
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
            poll = _PrefillProgress(handle)
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

    def _step(self) -> None:
        for state in list(self._running):
            if state.batch is not None:
                self._advance_row(state)
                continue
            handle = state.handle
            if handle.cancelled:
                state.run.events.close()
                self._finish(state, "cancelled", None)
                continue
            try:
                event = next(state.run.events)
            except Exception as exc:
                self._retire(state)
                self._fail(handle, exc)
                continue
            if event.finish_reason is None:   # a token: one forward of one request
                self._count_forwards(state.resident.name, "round_robin", 1)
            self._handle_event(state, event)
        stepping = {}
        for state in self._running:
            if state.batch is not None and len(state.batch):
                stepping[id(state.batch)] = (state.resident.name, state.batch)
        for name, batch in stepping.values():
            self._step_batch(name, batch)
        for name, (resident, batch) in list(self._batches.items()):
            if self.registry.resident.get(name) is not resident:
                del self._batches[name]  # the model was unloaded: its batch goes with it (rows keep theirs)
        for name, (resident, _) in list(self._unbatched.items()):
            if self.registry.resident.get(name) is not resident:
                del self._unbatched[name]  # ... and so does what kept an unloaded model referenced

    def _handle_event(self, state: _Running, event) -> None:
        if event.finish_reason is None:
            self._deliver_token(state, event)
        else:
            if event.text:
                self._emit(state, Event("delta", text=event.text))
            self._finish(state, event.finish_reason, event.stats)

    def _advance_row(self, state: _Running) -> None:
        """A batch row between steps: leave when cancelled, else prefill a chunk or join the batch."""
        row, handle = state.run.row, state.handle
        if handle.cancelled:
            state.batch.remove(row)
            self._finish(state, "cancelled", row.stats())
            return
        if state.joined:
            return
        try:
            if not row.ready:
                row.prefill_step()
                if row.prefilled < len(row.prompt_ids):
                    handle.push(Event("progress", processed=row.prefilled, total=len(row.prompt_ids)))
            if row.ready:
                state.batch.add(row)
                state.joined = True
        except Exception as exc:
            self._retire(state)
            self._fail(handle, exc)

    def _step_batch(self, name: str, batch) -> None:
        """One batched forward for every joined row of a model; hand each row its token."""
        before = batch.row_steps
        try:
            results = batch.step()
        except Exception as exc:  # the batch's caches are in an unknown state: every row of it fails
            rows = list(batch.rows)
            batch.clear()
            for row in rows:
                state = self._owners.get(id(row))
                if state is not None:
                    self._retire(state)
                    self._fail(state.handle, exc)
            return
        self._count_forwards(name, "batched", batch.row_steps - before, batch=batch)
        for row, events in results:
            state = self._owners.get(id(row))
            for event in events:
                self._handle_event(state, event)

    def _count_forwards(self, model: str, mode: str, rows: int, batch=None) -> None:
        self.metrics.inc("mlxedge_decode_forwards_total", model=model, mode=mode)
        self.metrics.inc("mlxedge_decode_rows_total", rows, model=model, mode=mode)
        if batch is not None:
            entry = self.batching.get(model)
            if entry is not None:
                entry.update(forwards=batch.forwards, row_steps=batch.row_steps, max_rows=batch.max_rows)

    def _deliver_token(self, state: _Running, event) -> None:
        if state.first_at is None:
            state.first_at = time.perf_counter()
            state.handle.push(Event("progress", processed=len(state.run.prompt_ids),
                                    total=len(state.run.prompt_ids)))
        state.tokens.append(event.token)
        self._emit(state, Event("delta", text=event.text, token=event.token))

    def _emit(self, state: _Running, event: Event) -> None:
        if state.handle.request.logprobs:
            state.held.append(event)
        else:
            state.handle.push(event)

    def _finish(self, state: _Running, reason: str, model_stats: Optional[dict]) -> None:
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

    def _retire(self, state: _Running) -> None:
        self._running.remove(state)
        if state.run.row is not None:
            state.batch.remove(state.run.row)  # no-op once it has left
            self._owners.pop(id(state.run.row), None)
        with self._lock:
            self._active_count = len(self._running)
        state.resident.active -= 1
        state.resident.last_used = time.monotonic()
        self.cache.close(state.run)

    def _release_with_logprobs(self, state: _Running) -> None:
        request = state.handle.request
        entries = token_logprobs(state.resident.model, state.run.prompt_ids, state.tokens, request.top_logprobs)
        by_token = iter(entries)
        for event in state.held:
            if event.token is not None:
                event.logprob = next(by_token)
            state.handle.push(event)
        state.held = []

    def _shutdown(self) -> None:
        for state in list(self._running):
            if state.run.events is not None:
                state.run.events.close()
            if state.batch is not None:
                state.batch.remove(state.run.row)
            self._finish(state, "cancelled", None)
        for handle in list(self._pending):
            self._dequeue(handle)
            handle.push(Event("error", code="cancelled", message="the engine shut down before this request ran"))
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item[0] == "request":
                item[1].push(Event("error", code="cancelled", message="the engine shut down"))
            elif item[0] == "call":
                item[2].set_exception(BusyError("the engine shut down"))
        for name in list(self.registry.resident):
            self.registry.unload(name)


class _PrefillProgress:
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


_LIVE: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _close_live_engines() -> None:
    for engine in list(_LIVE):
        engine.close()


def token_logprobs(model, prompt_ids: List[int], tokens: List[int], top: int) -> List[dict]:
    """Log-probabilities of generated tokens under the model's raw distribution (one full forward pass).

    Each entry: token (its text), token_id, logprob, bytes, top_logprobs (the `top` most likely ids).
    """
    if not tokens:
        return []
    logits = model.logits(list(prompt_ids) + list(tokens)).astype(np.float64)
    rows = logits[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(tokens)]
    peak = rows.max(axis=-1, keepdims=True)
    logp = rows - (peak + np.log(np.exp(rows - peak).sum(axis=-1, keepdims=True)))
    decode = model.tokenizer.decode
    out = []
    for i, token in enumerate(tokens):
        entry = _entry(decode, int(token), float(logp[i, token]))
        if top:
            best = np.argsort(-logp[i])[:top]
            entry["top_logprobs"] = [_entry(decode, int(t), float(logp[i, t])) for t in best]
        out.append(entry)
    return out


def _entry(decode, token: int, logprob: float) -> dict:
    text = decode([token])
    return {"token": text, "token_id": token, "logprob": logprob if math.isfinite(logprob) else -9999.0,
            "bytes": list(text.encode("utf-8"))}


_HELP = {
    "mlxedge_requests_total": "finished requests by model and outcome (stop, length, cancelled or an error code)",
    "mlxedge_prompt_tokens_total": "prompt tokens processed",
    "mlxedge_generated_tokens_total": "tokens generated",
    "mlxedge_rejected_total": "requests refused at the door",
    "mlxedge_http_requests_total": "HTTP requests by route and status",
}
