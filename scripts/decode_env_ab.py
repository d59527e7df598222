#!/usr/bin/env python
"""A/B of mlxedge decode speed under different environment settings (e.g. the CPU pool's knobs), interleaved.

Each variant is one persistent worker process (the model loaded once, with that variant's environment);
the rounds run every variant once, alternating the order, so a machine whose speed drifts (a shared VM)
affects all alike. Measures tg: --tokens tokens from a one-token prompt, EOS ignored, as bench_vs_llama_cpp.

    python scripts/decode_env_ab.py "default:" "no-poll:MLXEDGE_CPU_YIELD_US=0" \
        "split-all:MLXEDGE_CPU_PARALLEL_MIN_KB=0" [--rounds 5] [--tokens 128] [--model smollm2 | PATH] [--bits 4|8]

One setting is this script's own: AB_QKV=apart runs each attention's q, k and v projections through their own
bindings (three calls) instead of the one call the load bound (e.g. "one-call:" "apart:AB_QKV=apart").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Optional


def worker(model: str, tokens: int, bits: Optional[int]) -> None:
    import mlxedge
    from mlxedge.bench.timing import OursRunner, run_tg
    from mlxedge.sources.registry import resolve_alias

    loaded = mlxedge.load(resolve_alias(model) or model, bits=bits, dtype="float32")
    if os.environ.get("AB_QKV") == "apart":
        from mlxedge.fast_layers import BoundAttention

        for m in loaded.module.modules():
            if isinstance(m, BoundAttention):
                m._projections_size = 0  # every input is "past the decode rows": one call per projection
    runner, ids = OursRunner(loaded), loaded.tokenizer.encode("Hello")
    run_tg(runner, ids, 16)  # warm-up
    print("ready", flush=True)
    for _ in sys.stdin:
        print(json.dumps(run_tg(runner, ids, tokens)), flush=True)


def parse_variant(spec: str) -> tuple:
    name, _, settings = spec.partition(":")
    env = dict(pair.split("=", 1) for pair in settings.split(",") if pair)
    return name, env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variants", nargs="*", help='NAME:VAR=VALUE,VAR=VALUE ("NAME:" = the environment as is)')
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--model", default="smollm2", help="an alias (pulled on first use) or a local model path")
    ap.add_argument("--bits", type=int, choices=[4, 8], help="quantize while loading (a float checkpoint)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.model, args.tokens, args.bits)
    if len(args.variants) < 2:
        ap.error("give at least two variants")
    procs = []
    for spec in args.variants:
        name, env = parse_variant(spec)
        cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--tokens", str(args.tokens)]
        cmd += ["--bits", str(args.bits)] if args.bits else []
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"variant {name!r}: the worker did not start")
        procs.append((name, proc))
    rates = {name: [] for name, _ in procs}
    for rnd in range(args.rounds):
        for name, proc in procs if rnd % 2 == 0 else procs[::-1]:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            rates[name].append(json.loads(proc.stdout.readline())["tg_tps"])
    for _, proc in procs:
        proc.stdin.close()
        proc.wait()
    load = os.getloadavg()[0]
    print(f"tg{args.tokens} tok/s, {args.rounds} interleaved rounds, load average {load:.1f} on {os.cpu_count()} cores")
    for name, values in rates.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{name:20s} {statistics.fmean(values):7.1f} ± {spread:5.1f}   {[round(v, 1) for v in values]}")


if __name__ == "__main__":
    main()
