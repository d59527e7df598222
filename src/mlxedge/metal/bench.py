"""Side-by-side timing of the custom kernels against MLX's built-ins on this device (`python -m mlxedge.metal.bench`).

For typical decode shapes (Llama-style 1B/3B/8B projections) it times both paths in one process with
`selection.measure` and prints the ratio and the effective weight bandwidth. Where Metal is absent it says so
and measures nothing.
"""

from __future__ import annotations

import argparse
import sys

import mlx.core as mx

from . import kernels
from .dispatch import GateUpLauncher, QMVLauncher, builtin_qmv, swiglu
from .runner import MetalRunner, metal_available
from .selection import measure

# (label, N, K): projection shapes of Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B.
SHAPES = (
    ("1B q/o", 2048, 2048), ("1B gate/up", 8192, 2048), ("1B down", 2048, 8192),
    ("3B q/o", 3072, 3072), ("3B gate/up", 8192, 3072), ("3B down", 3072, 8192),
    ("8B q/o", 4096, 4096), ("8B gate/up", 14336, 4096), ("8B down", 4096, 14336),
)


def bench_rows(bits: int, group_size: int, rows: int, dtype, runner=None) -> list:
    runner = runner if runner is not None else MetalRunner()
    results = []
    for label, n, k in SHAPES:
        w, s, b = mx.quantize(mx.random.normal((n, k), key=mx.random.key(1)).astype(dtype),
                              group_size=group_size, bits=bits)
        x = mx.random.normal((rows, k), key=mx.random.key(2)).astype(dtype)
        mx.eval(w, s, b, x)
        if "gate/up" in label:
            u = tuple(a + 0 for a in (w, s, b))
            fused = GateUpLauncher(runner, n, k, bits, group_size, dtype)
            r = measure(lambda: fused(x, (w, s, b), u),
                        lambda: swiglu(builtin_qmv(x, w, s, b, group_size, bits), builtin_qmv(x, *u, group_size, bits)))
            weight_bytes = 2 * (w.nbytes + s.nbytes + b.nbytes)
        else:
            qmv = QMVLauncher(runner, n, k, bits, group_size, dtype)
            r = measure(lambda: qmv(x, w, s, b), lambda: builtin_qmv(x, w, s, b, group_size, bits))
            weight_bytes = w.nbytes + s.nbytes + b.nbytes
        results.append((label, n, k, r, weight_bytes))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4, choices=kernels.SUPPORTED_BITS)
    parser.add_argument("--group-size", type=int, default=64, choices=kernels.SUPPORTED_GROUP_SIZES)
    parser.add_argument("--rows", type=int, default=1, choices=range(1, kernels.MAX_ROWS + 1))
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    args = parser.parse_args(argv)
    if not metal_available():
        print("No Metal device here: the custom kernels only run on Apple GPUs (MLX built-ins are used).")
        return 0
    dtype = getattr(mx, args.dtype)
    print(f"{'shape':<12} {'N':>6} {'K':>6} {'custom ms':>10} {'builtin ms':>10} {'speed-up':>8} "
          f"{'custom GB/s':>11} agree")
    for label, n, k, r, weight_bytes in bench_rows(args.bits, args.group_size, args.rows, dtype):
        print(f"{label:<12} {n:>6} {k:>6} {r['custom_s'] * 1e3:>10.3f} {r['builtin_s'] * 1e3:>10.3f} "
              f"{r['builtin_s'] / r['custom_s']:>8.2f} {weight_bytes / r['custom_s'] / 1e9:>11.1f} {r['agree']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
