"""What the benchmark runs on: the device (chip or CPU, MLX backend, memory, cores, MLX version) and its memory
bandwidth, measured once with a read-only reduction (MLX's on the GPU, numpy's on every core on a CPU) and cached under `cache_root()/bench/bandwidth.json`,
keyed by device, backend and MLX version."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

Log = Callable[[str], None]

BANDWIDTH_CACHE_NAME = "bandwidth.json"
BANDWIDTH_PROBE_BYTES = 1 << 30  # 1 GiB source array (capped at 1/8 of memory)
BANDWIDTH_REPS = 5


def _linux_cpu_name() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _total_memory_bytes(info: dict) -> Optional[int]:
    if info.get("memory_size"):
        return int(info["memory_size"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def device_info() -> dict:
    """What runs the benchmark: chip/CPU name, MLX backend (metal or cpu), memory, cores, MLX version, line."""
    try:
        info = dict(mx.device_info())
    except Exception:  # older MLX or no device info on this backend
        info = {}
    metal = bool(getattr(mx, "metal", None) and mx.metal.is_available())
    backend = "metal" if metal else str(mx.default_device().type).split(".")[-1]
    chip = info.get("device_name") or ""
    if not metal:
        chip = _linux_cpu_name() or platform.processor() or chip or platform.machine()
    memory = _total_memory_bytes(info)
    out = {"chip": chip, "backend": backend, "memory_bytes": memory, "cpu_cores": os.cpu_count(),
           "architecture": info.get("architecture") or platform.machine(), "os": platform.system(),
           "mlx_version": getattr(mx, "__version__", "?")}
    mem = f"{memory / 2**30:.0f} GiB" if memory else "? memory"
    out["line"] = f"{chip} · {backend} · {mem} · {out['cpu_cores']} cores · mlx {out['mlx_version']}"
    return out


BANDWIDTH_METHOD = "MLX read-only reduction sum(x) over float32, bytes read / best time"
CPU_BANDWIDTH_METHOD = "numpy read-only sum over float32, one slice per core in parallel, bytes read / best time"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _probe_elements(nbytes: Optional[int]) -> int:
    if nbytes is None:
        memory = _total_memory_bytes({}) or (8 << 30)
        nbytes = min(BANDWIDTH_PROBE_BYTES, memory // 8)
    return max(1 << 20, nbytes // 4)


def measure_bandwidth(nbytes: Optional[int] = None, reps: int = BANDWIDTH_REPS) -> dict:
    """Read bandwidth of the default device: a sum over a large float32 array, bytes read / best time.

    A decode step mostly reads weights, so a read-only reduction is the fitting ceiling. On the GPU that is
    MLX's own sum. On MLX's CPU backend MLX's sum runs on one thread at a fraction of what the memory gives
    (7.5 GB/s against 37.9 GB/s for numpy summing one slice per core, quiet 2-core machine), and the native
    kernels decode on every core: its figure put decode at 126% of its "roofline". There the probe is numpy,
    one slice per core, summed in parallel (numpy releases the GIL while it sums).
    """
    n = _probe_elements(nbytes)
    if mx.default_device().type == mx.DeviceType.cpu:
        return _cpu_bandwidth(n, reps)
    x = mx.ones((n,), dtype=mx.float32)
    mx.eval(x)
    mx.eval(mx.sum(x))  # warm-up: kernel compilation
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        mx.eval(mx.sum(x))
        best = min(best, time.perf_counter() - start)
    del x
    mx.clear_cache()
    return {"bytes_per_s": 4 * n / best, "probe_bytes": 4 * n, "best_s": best, "reps": reps,
            "method": BANDWIDTH_METHOD}


def _cpu_bandwidth(n: int, reps: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    threads = _cores()
    x = np.ones(n, dtype=np.float32)
    parts = np.array_split(x, threads)
    best = math.inf
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.sum, parts))  # warm-up: pages touched, threads started
        for _ in range(reps):
            start = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - start)
    del x, parts
    return {"bytes_per_s": 4 * n / best, "probe_bytes": 4 * n, "best_s": best, "reps": reps,
            "threads": threads, "method": CPU_BANDWIDTH_METHOD}


def _method_here() -> str:
    return CPU_BANDWIDTH_METHOD if mx.default_device().type == mx.DeviceType.cpu else BANDWIDTH_METHOD


def bandwidth_cache_path() -> Path:
    from ..paths import cache_root

    return cache_root() / "bench" / BANDWIDTH_CACHE_NAME


def device_bandwidth(device: Optional[dict] = None, remeasure: bool = False, log: Optional[Log] = None) -> dict:
    """The device's measured bandwidth, from the cache when this device/backend/MLX was measured before."""
    device = device or device_info()
    key = f"{device['chip']}|{device['backend']}|mlx {device['mlx_version']}"
    path = bandwidth_cache_path()
    cache = {}
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    entry = cache.get(key)
    if (not remeasure and isinstance(entry, dict) and entry.get("bytes_per_s")
            and entry.get("method") in (BANDWIDTH_METHOD, CPU_BANDWIDTH_METHOD)
            and entry.get("method") == _method_here()):  # a figure from another probe is measured again
        return {**entry, "cached": True}
    if log:
        log("measuring memory bandwidth (once per device; cached)...")
    result = measure_bandwidth()
    result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cache[key] = result
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=2))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time
    return {**result, "cached": False}

