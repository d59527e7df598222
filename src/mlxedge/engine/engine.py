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

This module holds the Engine's public face (any thread) and its worker loop (inbox, scheduler passes,
keep_alive expiry, shutdown); the worker's parts live beside it: admission.py (queue to running, KV
reservations), stepping.py (prefill chunks, batched and round-robin decode steps), delivery.py (events,
logprobs, finishing a request), running.py (the record of a running request).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import queue
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from typing import Callable, Dict, List, Optional

import mlx.core as mx

from .admission import Admission
from .delivery import Delivery
from .errors import BusyError
from .metrics import HELP, Metrics
from .prefix_cache import PrefixCache
from .registry import Registry
from .request import Event, Handle, Request
from .running import Running
from .stepping import Stepping

log = logging.getLogger("mlxedge.engine")

DEFAULT_MAX_QUEUE = 32
DEFAULT_MAX_ACTIVE = 8
DEFAULT_PREFIX_CACHE_BYTES = 512 * 1024 * 1024
EXPIRE_EVERY_S = 1.0


class Engine(Admission, Stepping, Delivery):
    """Models resident in one process and the worker thread that runs all their MLX work.

    Public methods may be called from any thread; everything else runs on the worker: admission
    (admission.py), decode steps (stepping.py) and event delivery (delivery.py) are its parts.
    """

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
        self._running: List[Running] = []         # worker only
        self._batches: Dict[str, tuple] = {}      # model name -> (Resident, DecodeBatch) (worker only)
        self._owners: Dict[int, Running] = {}     # id(BatchRow) -> its running state (worker only)
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
        return self.metrics.render(gauges, help_of=lambda name: HELP.get(name, name))

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


_LIVE: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _close_live_engines() -> None:
    for engine in list(_LIVE):
        engine.close()
