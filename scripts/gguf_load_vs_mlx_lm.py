#!/usr/bin/env python
"""Load time and peak RSS: mlxedge loading a GGUF vs mlx-lm loading the same model converted to its format.

    python scripts/gguf_load_vs_mlx_lm.py [GGUF]     (defaults to the default alias's file)

The mlx-lm copy is written once by `mlxedge.convert` with the GGUF's own quantization kept (bits=None), so
both runtimes hold the same bytes. Each load runs in a fresh process, alternating, three times each; the
child reports the seconds of the load call, VmHWM (peak RSS) after it, and RSS just before it.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
which, path = sys.argv[1], sys.argv[2]
if which == "mlxedge":
    import mlxedge
    import mlx.core as mx
    before = rss("VmRSS:"); t = time.perf_counter()
    model = mlxedge.load(path, dtype="float16"); mx.eval(model.module.parameters())
else:
    from mlx_lm import load
    import mlx.core as mx
    before = rss("VmRSS:"); t = time.perf_counter()
    model, _ = load(path); mx.eval(model.parameters())
print(json.dumps({"seconds": time.perf_counter() - t, "peak": rss("VmHWM:"), "before": before}))
"""


def run(which: str, path: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, path], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    import mlxedge
    from mlxedge.sources.registry import resolve_alias

    gguf = sys.argv[1] if len(sys.argv) > 1 else str(resolve_alias("smollm2"))
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "mlx-copy"
        mlxedge.convert(gguf, copy, bits=None)
        results = {"mlxedge (GGUF)": [], "mlx-lm (converted copy)": []}
        for _ in range(3):
            results["mlxedge (GGUF)"].append(run("mlxedge", gguf))
            results["mlx-lm (converted copy)"].append(run("mlx-lm", str(copy)))
    print(f"GGUF: {gguf} ({Path(gguf).stat().st_size / 1e6:.1f} MB); both in float16, 3 fresh processes each")
    print("| loader | load s (median) | peak RSS MB (median) | RSS before load MB | growth MB |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        peak = statistics.median(r["peak"] for r in runs) / 1e6
        before = statistics.median(r["before"] for r in runs) / 1e6
        print(f"| {name} | {seconds:.2f} | {peak:.0f} | {before:.0f} | {peak - before:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
