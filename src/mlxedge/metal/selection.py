"""Per-device choice between a candidate kernel and MLX's built-in, measured once per shape and kept on disk.

The kernel choice (mlxedge.kernels) asks `Selector.prefers_custom(device, key, run_custom, run_builtin)` when a
model is loaded in `auto` mode. The first time a (device, shape) pair is seen, both paths run on the same
inputs, their outputs are compared (a kernel that disagrees with the built-in is never chosen), and then each
is timed as a chain of launches evaluated at once — enough of its own launches that its chain takes about
CHAIN_TARGET_S, so the latency of one synchronisation does not swamp a kernel of a few microseconds. The
candidate wins only if it was clearly faster. The verdict is written to a JSON file (the caller names it:
mlxedge.kernels.selection_file), keyed by device, and reused by every later load on that device, so a
model starts without measuring anything the second time. A verdict measured while the machine was
oversubscribed (load average above the core count) is kept as provisional (`"quiet": false`): later loads
on a busy machine reuse it rather than measure again under the same noise, and the first load on a quiet
machine measures that shape once more and keeps the quiet verdict for good.
Imports only mlx and the standard library, so the Metal and the native CPU kernels share it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import mlx.core as mx

WIN_MARGIN = 0.95     # custom must take under 95% of the built-in's time
REPETITIONS = 5
AGREEMENT_RTOL = 2e-2
CHAIN_TARGET_S = 0.02  # a timed chain lasts about this long...
MIN_CHAIN, MAX_CHAIN = 3, 50  # ...within these many launches
# One launch each decides when the slower path's launch alone lasts CHAIN_TARGET_S (its sync latency is
# negligible) and the faster one, its latency included, is still this many times faster: no noise flips that.
# MLX's CPU quantized matmul in float16 takes 1.3 s per call at SmolLM2's 49152x576 head (the native kernel
# 1.4 ms), so five chains of it made a model's first float16 load on this machine take 102 s.
DECIDED_RATIO = 4.0


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def chain_length(seconds_per_call: float, target_s: float = CHAIN_TARGET_S) -> int:
    """Launches per timed chain: about target_s of work, MIN_CHAIN..MAX_CHAIN launches."""
    if seconds_per_call <= 0:
        return MAX_CHAIN
    return max(MIN_CHAIN, min(MAX_CHAIN, math.ceil(target_s / seconds_per_call)))


def _time_chain(fn, length: int) -> float:
    """Seconds per launch of `length` launches of fn built into one graph and evaluated at once."""
    start = time.perf_counter()
    mx.eval([fn() for _ in range(length)])
    return (time.perf_counter() - start) / length


class WithReference:
    """A built-in thunk to time, carrying the thunk the candidate's output must agree with instead: e.g. the
    built-in computed in float32 where its own half-precision accumulation is not accurate enough to judge by
    (MLX's CPU quantized matmul in bfloat16 misses a float32-accumulating kernel by ~10%)."""

    def __init__(self, run, reference):
        self.run, self.reference = run, reference

    def __call__(self):
        return self.run()


def measure(run_custom, run_builtin, repetitions: int = REPETITIONS) -> dict:
    """Time both paths as chains of launches (warm-up first, then alternating); medians per launch; agreement
    with the built-in's output (or with `run_builtin.reference()`'s, see WithReference). Where one launch each
    already decides (DECIDED_RATIO), those single launches are the result ("chain": 1)."""
    reference = getattr(run_builtin, "reference", None) or run_builtin
    custom_out, builtin_out = run_custom(), reference()
    mx.eval(custom_out, builtin_out)
    a, b = custom_out.astype(mx.float32), builtin_out.astype(mx.float32)
    scale = float(mx.max(mx.abs(b)).item()) or 1.0
    agree = bool(mx.all(mx.isfinite(a)).item()) and float(mx.max(mx.abs(a - b)).item()) <= AGREEMENT_RTOL * scale
    # one launch each sizes each path's chain: about CHAIN_TARGET_S of its own launches, so a slow path is
    # not run as many times as a fast one needs (MLX's float16 576x576 CPU matmul, 15 ms a launch, in chains
    # of 50 sized by the native kernel's 20 us took 3.3 s of smollm2's first float16 load)
    custom_1, builtin_1 = _time_chain(run_custom, 1), _time_chain(run_builtin, 1)
    faster, slower = sorted((custom_1, builtin_1))
    if slower >= CHAIN_TARGET_S and slower >= DECIDED_RATIO * faster:
        return {"custom_s": custom_1, "builtin_s": builtin_1, "agree": agree, "chain": 1, "builtin_chain": 1}
    lengths = {"custom": chain_length(custom_1), "builtin": chain_length(builtin_1)}
    times = {"custom": [], "builtin": []}
    for _ in range(repetitions):
        for name, fn in (("custom", run_custom), ("builtin", run_builtin)):
            times[name].append(_time_chain(fn, lengths[name]))
    return {"custom_s": _median(times["custom"]), "builtin_s": _median(times["builtin"]), "agree": agree,
            "chain": lengths["custom"], "builtin_chain": lengths["builtin"]}


def machine_is_quiet() -> bool:
    """No more runnable work than cores (1-minute load average): a timing taken now is worth keeping."""
    try:
        return os.getloadavg()[0] <= (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return True


class Selector:
    """Holds measured verdicts per device; `measure_fn` and `quiet` are injectable so tests decide them.

    A verdict measured while the machine is oversubscribed (`quiet()` False) is saved as provisional:
    timings of thread pools fighting other processes for cores should not decide every later load, but
    measuring again on every start of a busy machine costs seconds and is no less noisy. So a provisional
    verdict is reused while the machine stays busy and replaced by the first quiet measurement.
    `measured` and `reused` count this selector's decisions (shown by `mlxedge ... --debug`).
    """

    def __init__(self, path, measure_fn=measure, quiet=machine_is_quiet):
        self.path = Path(path)
        self.measure_fn = measure_fn
        self.quiet = quiet
        self._data = None
        self._decided = {}  # (device, key) -> verdict already settled in this process
        self.measured = 0
        self.reused = 0

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

    def _entry(self, device: str, key: str):
        entry = self._load().get(device, {}).get(key)
        return entry if isinstance(entry, dict) and "custom" in entry else None

    def lookup(self, device: str, key: str):
        """The saved verdict (provisional or not) for this shape on this device, or None."""
        if (device, key) in self._decided:
            return self._decided[(device, key)]
        entry = self._entry(device, key)
        return None if entry is None else bool(entry["custom"])

    def prefers_custom(self, device: str, key: str, run_custom, run_builtin) -> bool:
        if (device, key) in self._decided:
            return self._decided[(device, key)]
        entry = self._entry(device, key)
        quiet = None
        if entry is not None and entry.get("quiet", True) is False:  # provisional: keep it unless quiet now
            quiet = self.quiet()
        if entry is not None and (entry.get("quiet", True) or not quiet):
            self.reused += 1
            self._decided[(device, key)] = bool(entry["custom"])
            return self._decided[(device, key)]
        try:
            result = self.measure_fn(run_custom, run_builtin)
        except Exception as e:  # e.g. inside mx.compile, or a kernel the device rejects: use the built-in
            warnings.warn(f"mlxedge: kernel measurement for {key} failed ({e}); using MLX's built-in")
            return False
        self.measured += 1
        custom = bool(result["agree"]) and result["custom_s"] < WIN_MARGIN * result["builtin_s"]
        quiet = self.quiet() if quiet is None else quiet
        self._data = None  # re-read: another process may have saved verdicts meanwhile
        self._load().setdefault(device, {})[key] = {**result, "custom": custom, "quiet": bool(quiet)}
        self._save()
        self._decided[(device, key)] = custom
        return custom
