#!/usr/bin/env python
"""Time to build one decode step's graph (Python side only, nothing evaluated): mlxedge vs mlx-lm.

Both sides run the same model and bytes: mlxedge loads the source (default: the SmolLM2-135M GGUF as
stored, computing in float32), mlx-lm loads an mlx-lm copy written by `mlxedge.convert` in the same dtype.
Each side gets a KV cache filled by an evaluated prefill; then, many times, one decode step's forward is
built — `model(token, cache=cache)` — and dropped unevaluated, and the cache is put back as it was. The
Python cost of a step (module calls, our per-layer kernel binding vs mlx-lm's plain layers) is what is
timed; MLX evaluates nothing. Repetitions are interleaved and the median per step is reported, with
mlxedge ÷ mlx-lm (target ≤ 1.1). mlxedge is measured once per kernel mode given (--modes).

    python scripts/graph_build_time.py [SOURCE] [--steps 200] [--reps 7] [--modes auto,builtin]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

import mlxedge
from mlxedge.kernels import KernelChoice

PROMPT = list(range(1, 33))


def prepared(module):
    """A KV cache holding an evaluated 32-token prefill, and a function that restores it."""
    cache = make_prompt_cache(module)
    mx.eval(module(mx.array([PROMPT]), cache=cache))
    mx.eval([c.state for c in cache])
    saved = [(c.keys, c.values, c.offset) for c in cache]

    def restore():  # fresh views: the cache's in-place slice update must not grow the saved arrays' graphs
        for c, (k, v, offset) in zip(cache, saved):
            c.keys, c.values, c.offset = k[:], v[:], offset

    return cache, restore


def build_seconds(module, steps: int) -> float:
    """Mean seconds to build one decode step's graph, over `steps` builds."""
    cache, restore = prepared(module)
    restore()
    token = mx.array([[PROMPT[-1]]])
    mx.eval(token)
    total = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        out = module(token, cache=cache)
        total += time.perf_counter() - start
        del out
        restore()
    return total / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", default="smollm2")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--modes", default="auto,builtin", help="MLXEDGE_KERNELS modes to measure mlxedge in")
    args = parser.parse_args()

    from mlx_lm import load as mlx_lm_load

    model = mlxedge.load(args.source, dtype=args.dtype)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    with tempfile.TemporaryDirectory(prefix="graph-build-") as tmp:
        target = Path(tmp) / "mlx-lm"
        mlxedge.convert(args.source, target, bits=None, dtype=args.dtype, force=True)
        theirs, _ = mlx_lm_load(str(target))
    choices = {mode: KernelChoice(mode) for mode in modes}
    results = {mode: [] for mode in modes}
    results["mlx-lm"] = []
    for rep in range(args.reps):
        order = list(modes) + ["mlx-lm"]
        if rep % 2:
            order.reverse()
        for name in order:
            if name == "mlx-lm":
                results[name].append(build_seconds(theirs, args.steps))
            else:
                model.use_kernels(choices[name])
                results[name].append(build_seconds(model.module, args.steps))
    base = statistics.median(results["mlx-lm"])
    print(f"model: {args.source} ({model.info['architecture']}, bits {model.info['bits']}, {args.dtype}); "
          f"{args.steps} graph builds per repetition, {args.reps} interleaved repetitions; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'side':<34} {'µs / step (median)':>18} {'min':>8} {'÷ mlx-lm':>9}")
    for name, values in results.items():
        label = name if name == "mlx-lm" else f"mlxedge {name}: {choices[name].backend}"[:34]
        med = statistics.median(values)
        print(f"{label:<34} {med * 1e6:>18.0f} {min(values) * 1e6:>8.0f} {med / base:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
