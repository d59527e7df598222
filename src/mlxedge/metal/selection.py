"""Per-device choice between a custom kernel and MLX's built-in, measured once per shape and kept on disk.

`auto` mode asks `Selector.prefers_custom(device, key, run_custom, run_builtin)`. The first time a (device,
shape) pair is seen, both paths run a few times on the same inputs, their outputs are compared (a kernel
that disagrees with the built-in is never chosen), and the custom kernel wins only if it was clearly
faster. The verdict is written to a JSON file (MLXEDGE_KERNEL_CACHE, else the user cache directory),
keyed by device, and reused by every later process on that device.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import mlx.core as mx

WIN_MARGIN = 0.95     # custom must take under 95% of the built-in's time
REPETITIONS = 7
AGREEMENT_RTOL = 2e-2


def default_cache_path() -> Path:
    explicit = os.environ.get("MLXEDGE_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    root = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    return Path(root) / "mlxedge" / "kernel-selection.json"


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def measure(run_custom, run_builtin, repetitions: int = REPETITIONS) -> dict:
    """Time both paths (warm-up first, then alternating runs); report medians and whether outputs agree."""
    custom_out, builtin_out = run_custom(), run_builtin()
    mx.eval(custom_out, builtin_out)
    a, b = custom_out.astype(mx.float32), builtin_out.astype(mx.float32)
    scale = float(mx.max(mx.abs(b)).item()) or 1.0
    agree = bool(mx.all(mx.isfinite(a)).item()) and float(mx.max(mx.abs(a - b)).item()) <= AGREEMENT_RTOL * scale
    times = {"custom": [], "builtin": []}
    for _ in range(repetitions):
        for name, fn in (("custom", run_custom), ("builtin", run_builtin)):
            start = time.perf_counter()
            mx.eval(fn())
            times[name].append(time.perf_counter() - start)
    return {"custom_s": _median(times["custom"]), "builtin_s": _median(times["builtin"]), "agree": agree}


class Selector:
    """Holds measured verdicts per device; `measure` is injectable so tests can decide the winner."""

    def __init__(self, path: Path | None = None, measure_fn=measure):
        self.path = Path(path) if path is not None else default_cache_path()
        self.measure_fn = measure_fn
        self._data = None

    def _load(self) -> dict:
        if self._data is None:
            try:
                self._data = json.loads(self.path.read_text())
                if not isinstance(self._data, dict):
                    self._data = {}
            except (OSError, ValueError):
                self._data = {}
        return self._data

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".kernel-selection")
            with os.fdopen(fd, "w") as f:
                json.dump(self._data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only cache costs a re-measurement next time, nothing more
            warnings.warn(f"mlxedge: could not save kernel selection to {self.path}: {e}")

    def lookup(self, device: str, key: str):
        entry = self._load().get(device, {}).get(key)
        return None if entry is None else bool(entry["custom"])

    def prefers_custom(self, device: str, key: str, run_custom, run_builtin) -> bool:
        known = self.lookup(device, key)
        if known is not None:
            return known
        try:
            result = self.measure_fn(run_custom, run_builtin)
        except Exception as e:  # e.g. inside mx.compile, or a kernel the device rejects: use the built-in
            warnings.warn(f"mlxedge: kernel measurement for {key} failed ({e}); using MLX's built-in")
            return False
        custom = bool(result["agree"]) and result["custom_s"] < WIN_MARGIN * result["builtin_s"]
        self._load().setdefault(device, {})[key] = {**result, "custom": custom}
        self._save()
        return custom
