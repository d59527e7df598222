"""Which models are resident: load by name on first use, admit only what fits the budget, unload when idle.

Runs on the engine's worker thread (loading is MLX work); `snapshot()` may be read from any thread.
Admission arithmetic comes from `mlxedge.plan`: a model needs its weights + activations (+ one context of
KV cache, reserved per request instead), the process needs the runtime overhead once, and the sum must
stay under the budget. Idle models are evicted, least recently used first, to make room.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import mlxedge

from .errors import BusyError, ModelNotFoundError, OverBudgetError
from ..errors import SourceError


def canonical_name(name: str) -> str:
    """Ollama clients say `model:latest`; the tag means nothing here."""
    name = str(name).strip()
    return name[: -len(":latest")] if name.endswith(":latest") else name


@dataclass
class Resident:
    name: str
    source: str
    model: "mlxedge.Model"
    weight_bytes: int          # weights + activation scratch (the plan's), resident while loaded
    kv_bytes_per_token: float  # one sequence's KV cache per token (the plan's kv_cache_bytes / context)
    context_length: int
    load_s: float
    keep_alive: float
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    active: int = 0

    def describe(self) -> dict:
        info = self.model.info
        return {"name": self.name, "source": self.source, "bytes": self.weight_bytes,
                "architecture": info.get("architecture"), "parameters": info.get("parameters"),
                "bits": info.get("bits"), "group_size": info.get("group_size"),
                "quantization": info.get("quantization") or [], "dtype": info.get("dtype"),
                "context_length": self.context_length,
                "loaded_at": self.loaded_at, "active_requests": self.active,
                "expires_in_s": None if math.isinf(self.keep_alive)   # kept until unloaded (JSON has no inf)
                else max(0.0, self.keep_alive - (time.monotonic() - self.last_used))}


class Registry:
    """models: name -> source (None: any alias, path or .gguf a caller names is allowed, as for the bridge)."""

    def __init__(self, models: Optional[Dict[str, str]] = None, *, memory_budget=None, keep_alive: float = 300.0,
                 load_options: Optional[dict] = None, loader: Callable = mlxedge.load, planner: Callable = mlxedge.plan):
        self.models = {canonical_name(k): str(v) for k, v in (models or {}).items()} if models is not None else None
        self.memory_budget = memory_budget
        self.keep_alive = keep_alive
        self.load_options = dict(load_options or {})
        self._load, self._plan = loader, planner
        self.resident: Dict[str, Resident] = {}
        self.overhead_bytes = 0
        self.budget_bytes: Optional[int] = None
        self._lock = threading.Lock()
        self._snapshot: List[dict] = []

    # --- names
    def source_of(self, name: str) -> str:
        name = canonical_name(name)
        if self.models is None:
            return name
        if name not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFoundError(f"model {name!r} is not served here (served: {known})")
        return self.models[name]

    def known(self) -> List[str]:
        names = list(self.models) if self.models is not None else []
        return names + [n for n in self.resident if n not in names]

    def plan(self, name: str) -> dict:
        return self._plan_source(self.source_of(name))

    def _plan_source(self, source: str) -> dict:
        opts = {k: v for k, v in self.load_options.items() if k in ("bits", "group_size", "dtype", "context_length")}
        try:
            return self._plan(source, memory_budget=self.memory_budget, **opts)
        except SourceError as exc:
            raise ModelNotFoundError(str(exc)) from None

    # --- residency
    def get(self, name: str, progress: Optional[Callable[[int, int], None]] = None,
            keep_alive: Optional[float] = None) -> Resident:
        """The resident model called `name`, loading it (and evicting idle ones) when needed."""
        name = canonical_name(name)
        entry = self.resident.get(name)
        if entry is None:
            entry = self._load_entry(name, progress)
        entry.last_used = time.monotonic()
        if keep_alive is not None:
            entry.keep_alive = keep_alive
        self._publish()
        return entry

    def _load_entry(self, name: str, progress) -> Resident:
        source = self.source_of(name)
        plan = self._plan_source(source)
        need = plan["weight_bytes"] + plan["activation_bytes"]
        self.budget_bytes = plan["budget_bytes"]
        self.overhead_bytes = plan["overhead_bytes"]
        alone = need + plan["kv_cache_bytes"] + plan["overhead_bytes"]
        if alone > plan["budget_bytes"]:
            raise OverBudgetError(
                f"model {name!r} needs {_mb(alone)} (weights, activations, one {plan['settings']['context_length']}"
                f"-token context and runtime) but the budget is {_mb(plan['budget_bytes'])}; "
                f"load it with fewer bits or a shorter context, or raise the memory budget")
        for victim in sorted((r for r in self.resident.values() if r.active == 0), key=lambda r: r.last_used):
            if self.resident_bytes() + alone <= plan["budget_bytes"]:
                break
            self.unload(victim.name)
        if self.resident_bytes() + alone > plan["budget_bytes"]:
            raise OverBudgetError(
                f"model {name!r} needs {_mb(alone)} but only {_mb(plan['budget_bytes'] - self.resident_bytes())} "
                f"of the budget is free while other models serve requests; retry later or unload one")
        started = time.perf_counter()
        opts = dict(self.load_options)
        if self.memory_budget is not None:
            opts["memory_budget"] = self.memory_budget
        try:
            model = self._load(source, progress=progress, **opts)
        except SourceError as exc:
            raise ModelNotFoundError(str(exc)) from None
        model.tokenizer  # built now, so loading time is counted as such and the first request does not pay it
        ctx = int(model.info.get("context_length") or plan["settings"]["context_length"])
        entry = Resident(name=name, source=source, model=model, weight_bytes=need,
                         kv_bytes_per_token=plan["kv_cache_bytes"] / max(1, plan["settings"]["context_length"]),
                         context_length=ctx, load_s=time.perf_counter() - started, keep_alive=self.keep_alive)
        self.resident[name] = entry
        self._publish()
        return entry

    def resident_bytes(self) -> int:
        return sum(r.weight_bytes for r in self.resident.values())

    def unload(self, name: str) -> bool:
        """Release a model (False when it was not loaded); BusyError while requests are generating with it."""
        name = canonical_name(name)
        entry = self.resident.get(name)
        if entry is None:
            return False
        if entry.active:
            raise BusyError(f"model {name!r} is serving {entry.active} request(s); cancel them or retry when done")
        del self.resident[name]
        import gc

        import mlx.core as mx

        gc.collect()
        mx.clear_cache()
        self._publish()
        return True

    def expire(self) -> List[str]:
        """Unload every idle model whose keep_alive has passed; return their names."""
        now = time.monotonic()
        gone = [r.name for r in self.resident.values() if r.active == 0 and now - r.last_used >= r.keep_alive]
        for name in gone:
            self.unload(name)
        if self.resident:
            self._publish()
        return gone

    def headroom_bytes(self) -> Optional[int]:
        """Budget left for KV caches of running requests (None until a plan has told the budget)."""
        if self.budget_bytes is None:
            return None
        return self.budget_bytes - self.overhead_bytes - self.resident_bytes()

    # --- thread-safe view
    def _publish(self) -> None:
        snap = [r.describe() for r in self.resident.values()]
        with self._lock:
            self._snapshot = snap

    def snapshot(self) -> List[dict]:
        with self._lock:
            return list(self._snapshot)


def _mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB"


