"""Side-by-side timing of the custom kernels against MLX's built-ins on this device (`python -m mlxedge.metal.bench`).

For typical decode shapes (Llama-style 1B/3B/8B projections) it times both paths in one process with
`selection.measure` and prints the ratio and the effective weight bandwidth (`--json`: the same as JSON, what
scripts/mac_check.py records). Where Metal is absent it says so and measures nothing.
"""

from __future__ import annotations

import argparse
import json
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


NO_METAL = "No Metal device here: the custom kernels only run on Apple GPUs (MLX built-ins are used)."


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


def bench_report(bits: int = 4, group_size: int = 64, rows: int = 1, dtype: str = "float16") -> dict:
    """Plain-dict results (for JSON reports): one entry per shape, or available=False without Metal."""
    settings = {"bits": bits, "group_size": group_size, "rows": rows, "dtype": dtype}
    if not metal_available():
        return {"available": False, "reason": NO_METAL, **settings}
    shapes = []
    for label, n, k, r, weight_bytes in bench_rows(bits, group_size, rows, getattr(mx, dtype)):
        shapes.append({"shape": label, "n": n, "k": k, "custom_ms": r["custom_s"] * 1e3,
                       "builtin_ms": r["builtin_s"] * 1e3, "speedup": r["builtin_s"] / r["custom_s"],
                       "custom_gb_per_s": weight_bytes / r["custom_s"] / 1e9, "agree": r["agree"]})
    return {"available": True, **settings, "shapes": shapes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4, choices=kernels.SUPPORTED_BITS)
    parser.add_argument("--group-size", type=int, default=64, choices=kernels.SUPPORTED_GROUP_SIZES)
    parser.add_argument("--rows", type=int, default=1, choices=range(1, kernels.MAX_ROWS + 1))
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if not metal_available() and not args.json:
        print(NO_METAL)
        return 0
    report = bench_report(args.bits, args.group_size, args.rows, args.dtype)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{'shape':<12} {'N':>6} {'K':>6} {'custom ms':>10} {'builtin ms':>10} {'speed-up':>8} "
          f"{'custom GB/s':>11} agree")
    for r in report["shapes"]:
        print(f"{r['shape']:<12} {r['n']:>6} {r['k']:>6} {r['custom_ms']:>10.3f} {r['builtin_ms']:>10.3f} "
              f"{r['speedup']:>8.2f} {r['custom_gb_per_s']:>11.1f} {r['agree']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
