#!/usr/bin/env python
"""Where one decode step of SmolLM2 spends its time on the CPU once the matmuls are native.

Loads the GGUF (the test cache's SmolLM2-135M-Instruct Q4_1, or a path given) with float32 compute and
times a greedy decode three ways, interleaved: MLX built-ins; the quantized Linears (and the fused
gate*up) routed to mlxedge.cpu's native kernels; and the same with every quantized matmul replaced by a
free stand-in of the right shape. The last one is what is left of a step without matmuls: attention,
norms, rope, embedding, sampling, graph building and Python. This is a measurement aid, not the kernel
choice (that binds kernels per layer at load, in the model's own code).

    python scripts/profile_cpu_decode.py [GGUF] [--tokens 48] [--reps 3]
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import mlx.core as mx

import mlxedge
import mlxedge.cpu as cpu
from mlxedge.quant import fused_mlp, layers

DEFAULT = Path.home() / ".cache" / "mlxedge-tests" / "smollm2-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Write a short story about a lighthouse keeper."


def native_qmm(x, w, s, b, *, group_size, bits):
    return cpu.quantized_matmul(x, w, s, b, group_size=group_size, bits=bits)


def native_gated(x, gate, up, *, group_size, bits):
    return cpu.gate_up_silu(x, gate, up, group_size=group_size, bits=bits)


def free_qmm(x, w, s, b, *, group_size, bits):
    return mx.zeros((*x.shape[:-1], w.shape[0]), dtype=x.dtype)


def free_gated(x, gate, up, *, group_size, bits):
    return mx.zeros((*x.shape[:-1], gate[0].shape[0]), dtype=x.dtype)


@contextlib.contextmanager
def routed(qmm, gated):
    saved = layers.quantized_matmul, fused_mlp.gated_mlp
    if qmm is not None:
        layers.quantized_matmul, fused_mlp.gated_mlp = qmm, gated
    try:
        yield
    finally:
        layers.quantized_matmul, fused_mlp.gated_mlp = saved


def decode_ms_per_token(model, tokens: int) -> float:
    r = model.generate(PROMPT, max_tokens=tokens, temperature=0.0)
    return 1000.0 / r.stats["generation_tps"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf", nargs="?", default=str(DEFAULT))
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    mx.set_default_device(mx.cpu)
    print(f"native backend: {cpu.describe()}")
    model = mlxedge.load(args.gguf, dtype="float32")
    variants = {"mlx built-ins": (None, None), "native kernels": (native_qmm, native_gated),
                "matmuls free": (free_qmm, free_gated)}
    times = {k: [] for k in variants}
    for _ in range(args.reps):
        for name, (q, g) in variants.items():
            with routed(q, g):
                times[name].append(decode_ms_per_token(model, args.tokens))
    best = {k: min(v) for k, v in times.items()}
    for k, v in best.items():
        print(f"{k:15s} {v:7.2f} ms/token  ({1000 / v:6.1f} tok/s)")
    mm = best["native kernels"] - best["matmuls free"]
    print(f"of a native step: matmuls {mm:.2f} ms ({100 * mm / best['native kernels']:.0f}%), "
          f"everything else {best['matmuls free']:.2f} ms ({100 * best['matmuls free'] / best['native kernels']:.0f}%)")


if __name__ == "__main__":
    main()
