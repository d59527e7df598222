#!/usr/bin/env python
"""The check a contributor with a Mac runs (`make mac-check`): suite, Metal kernel benchmark, model benchmark,
all written to one JSON report.

1. the test suite (pytest; on a Mac the Metal tests run the real kernels against MLX's built-ins),
2. the Metal kernel benchmark: custom kernel vs MLX built-in per decode shape (`python -m mlxedge.metal.bench`),
   for float16 and bfloat16 at 4 bits and at 8 bits,
3. `mlxedge bench MODEL --compare mlx-lm` on the default model (smollm2).

    python scripts/mac_check.py [--out mac-check.json] [--model smollm2] [--skip-suite] [--skip-model-bench]
                                [--pytest-args "-x -k metal"]

It is meant for Apple silicon. Elsewhere it says so, runs what it can, and marks the Metal parts
unavailable. The report's "ok" is true when every part that ran passed (tests green, every kernel agreed
with the built-in, the model benchmark finished). Timings are whatever the machine gives at that moment:
close other applications first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "smollm2"
KERNEL_SETTINGS = [("float16", 4), ("bfloat16", 4), ("float16", 8)]
MLXEDGE_CLI = "from mlxedge.cli import main; main()"


def machine() -> dict:
    import mlx.core as mx

    from mlxedge.bench.device import device_info

    info = device_info()
    info.update({"platform": sys.platform, "python": platform.python_version(),
                 "metal": bool(mx.metal.is_available()),
                 "apple_silicon": sys.platform == "darwin" and platform.machine() == "arm64"})
    return info


def run_suite(pytest_args: list) -> dict:
    """The pytest run: counts, failures, duration (from its JUnit XML)."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"--junitxml={xml}", *pytest_args], cwd=ROOT)
        seconds = time.perf_counter() - start
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        failed, skipped = [], {}
        if xml.exists():
            for case in ET.parse(xml).getroot().iter("testcase"):
                counts["tests"] += 1
                name = f"{case.get('classname')}::{case.get('name')}"
                for child in case:
                    if child.tag in ("failure", "error"):
                        counts["failures" if child.tag == "failure" else "errors"] += 1
                        failed.append({"test": name, "message": (child.get("message") or "")[:500]})
                    elif child.tag == "skipped":
                        counts["skipped"] += 1
                        reason = (child.get("message") or "").strip()
                        skipped[reason] = skipped.get(reason, 0) + 1
    return {"exit_code": proc.returncode, "seconds": round(seconds, 1), **counts,
            "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed, "skipped_by_reason": skipped, "ok": proc.returncode == 0}


def run_kernel_bench() -> dict:
    from mlxedge.metal.bench import bench_report

    reports = []
    for dtype, bits in KERNEL_SETTINGS:
        print(f"mac-check: Metal kernel benchmark, {bits}-bit {dtype} ...", flush=True)
        reports.append(bench_report(bits=bits, group_size=64, rows=1, dtype=dtype))
    available = all(r["available"] for r in reports)
    out = {"available": available, "runs": reports}
    if available:
        shapes = [s for r in reports for s in r["shapes"]]
        out["ok"] = all(s["agree"] for s in shapes)
        out["custom_faster_shapes"] = sum(s["speedup"] > 1 for s in shapes)
        out["shapes_total"] = len(shapes)
    else:
        out["reason"] = reports[0].get("reason")
    return out


def run_model_bench(model: str, extra: list) -> dict:
    """`mlxedge bench MODEL --compare mlx-lm --json` in a child process (its own memory, its own peak)."""
    command = [sys.executable, "-c", MLXEDGE_CLI, "bench", model, "--compare", "mlx-lm", "--json", *extra]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    out = {"command": "mlxedge " + " ".join(shlex.quote(a) for a in command[3:]), "exit_code": proc.returncode,
           "seconds": round(time.perf_counter() - start, 1)}
    if proc.returncode == 0:
        try:
            out["result"] = json.loads(proc.stdout)
        except ValueError:
            out["stdout"] = proc.stdout[-4000:]
    else:
        out["stderr"] = proc.stderr[-4000:]
    out["ok"] = proc.returncode == 0 and "result" in out
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="mac-check.json", help="where the JSON report goes")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model for `mlxedge bench --compare mlx-lm`")
    parser.add_argument("--bench-args", default="", help="extra `mlxedge bench` options, e.g. '-p 128 -n 64'")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. '-x -k metal'")
    parser.add_argument("--skip-suite", action="store_true")
    parser.add_argument("--skip-model-bench", action="store_true")
    args = parser.parse_args(argv)

    info = machine()
    report = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": info}
    if not info["metal"]:
        report["note"] = ("make mac-check is meant for a Mac with Apple silicon. Metal is absent here, so the "
                          "Metal kernel benchmark is marked unavailable and the suite runs its non-Metal tests.")
        print(f"mac-check: {report['note']}", flush=True)

    report["suite"] = ({"skipped": "--skip-suite"} if args.skip_suite
                       else run_suite(shlex.split(args.pytest_args)))
    report["kernel_bench"] = run_kernel_bench()
    if args.skip_model_bench:
        report["model_bench"] = {"skipped": "--skip-model-bench"}
    else:
        print(f"mac-check: mlxedge bench {args.model} --compare mlx-lm ...", flush=True)
        report["model_bench"] = run_model_bench(args.model, shlex.split(args.bench_args))
    parts = [p for p in (report["suite"], report["kernel_bench"], report["model_bench"]) if "ok" in p]
    report["ok"] = all(p["ok"] for p in parts)

    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, out)
    suite = report["suite"]
    kb = report["kernel_bench"]
    print(f"mac-check: report written to {out}")
    if "tests" in suite:
        print(f"  suite: {suite['passed']} passed, {suite['failures'] + suite['errors']} failed, "
              f"{suite['skipped']} skipped in {suite['seconds']} s")
    if kb["available"]:
        print(f"  kernels: custom faster on {kb['custom_faster_shapes']}/{kb['shapes_total']} shapes, "
              f"all agree: {kb['ok']}")
    else:
        print(f"  kernels: unavailable ({kb['reason']})")
    if "exit_code" in report["model_bench"]:
        print(f"  model bench: exit {report['model_bench']['exit_code']} in {report['model_bench']['seconds']} s")
    print(f"  ok: {report['ok']}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
