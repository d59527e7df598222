#!/usr/bin/env python
"""Where one decode step spends its time on the CPU: matmuls, the rest of the graph, and Python.

Loads a model (default: the SmolLM2-135M GGUF as stored, float32 compute, the kernels `auto` binds),
fills a KV cache with a short prompt, then times single decode steps four ways, interleaved:

- full step: build the graph and evaluate it (what decoding pays per token, without sampling);
- graph build only: the Python side of a step, nothing evaluated;
- matmuls free: every bound matmul layer (and the fused gate·up) replaced by a zero array of the
  right shape, so what is left is attention, norms, rope, residuals, the cache update and MLX's
  per-op scheduling;
- per-op count: how many primitives one step's graph holds (MLX's CPU backend pays a fixed cost
  for each).

It is a measurement aid for issue 10 (what to take next), not the kernel choice.

    python scripts/profile_cpu_decode.py [SOURCE] [--steps 64] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

import mlxedge
from mlxedge.quant.fused_mlp import FusedGatedMLP
from mlxedge.quant.layers import BoundEmbedding, BoundLinear, QuantizedEmbedding, QuantizedLinear

PROMPT = list(range(1, 33))


def _zeros_like_out(x, w, *rest, **kw):
    return mx.zeros((*x.shape[:-1], w.shape[0]), dtype=x.dtype)


def _zeros_gated(x, gate, up):
    return mx.zeros((*x.shape[:-1], gate[0].shape[0]), dtype=x.dtype)


def free_matmuls(module) -> list:
    """Swap every bound matmul's decode callable for a zero array; returns what restores them."""
    saved = []
    for _, m in module.named_modules():
        if isinstance(m, (QuantizedLinear, QuantizedEmbedding, BoundLinear, BoundEmbedding)):
            saved.append((m, "_decode", m._decode))
            m._decode = _zeros_like_out
            saved.append((m, "_decode_size", m._decode_size))
            m._decode_size = 1 << 62
        if isinstance(m, FusedGatedMLP) and m._fused is not None:
            saved.append((m, "_fused", m._fused))
            m._fused = _zeros_gated
    return saved


def restore(saved) -> None:
    for m, name, value in reversed(saved):
        setattr(m, name, value)


def count_ops(out: mx.array) -> int:
    seen, stack, n = set(), [out], 0
    while stack:
        a = stack.pop()
        if id(a) in seen:
            continue
        seen.add(id(a))
        if a.has_primitive if hasattr(a, "has_primitive") else False:
            n += 1
        stack.extend(getattr(a, "inputs", []) or [])
    return n


def step_times(module, steps: int):
    cache = make_prompt_cache(module)
    mx.eval(module(mx.array([PROMPT]), cache=cache))
    token = mx.array([[PROMPT[-1]]])
    build, full = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = module(token, cache=cache)
        t1 = time.perf_counter()
        mx.eval(out)
        t2 = time.perf_counter()
        build.append(t1 - t0)
        full.append(t2 - t0)
    return statistics.median(build) * 1e3, statistics.median(full) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", nargs="?", default="smollm2")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    mx.set_default_device(mx.cpu)
    model = mlxedge.load(args.source, dtype=args.dtype)
    print(f"kernels: {model.info['kernels']['backend']}")
    module = model.module
    rows = {"full step": [], "graph build": [], "matmuls free (full)": []}
    for _ in range(args.reps):
        b, f = step_times(module, args.steps)
        rows["full step"].append(f)
        rows["graph build"].append(b)
        saved = free_matmuls(module)
        try:
            rows["matmuls free (full)"].append(step_times(module, args.steps)[1])
        finally:
            restore(saved)
    best = {k: min(v) for k, v in rows.items()}
    for k, v in best.items():
        print(f"{k:22s} {v:7.2f} ms")
    full, free = best["full step"], best["matmuls free (full)"]
    print(f"matmuls ≈ {full - free:.2f} ms ({100 * (full - free) / full:.0f}%), rest of the step "
          f"{free:.2f} ms ({100 * free / full:.0f}%), of which graph building {best['graph build']:.2f} ms; "
          f"{1000 / full:.1f} tok/s")


if __name__ == "__main__":
    main()
