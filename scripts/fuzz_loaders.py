"""The long loader fuzz run: seeded mutations of a tiny GGUF, a tiny safetensors model and the real SmolLM2 GGUF.

Prints counts by outcome (clean error by class and message shape, loaded with finite logits, and the
findings: loaded with non-finite logits, unexpected exception, multi-line error, crash, hang), and the
structurally corrupt cases that loaded (must be none). Cases run in one worker process per target with
a per-case watchdog (tests/fuzz_harness.py); any case replays from (target, seed, index).

    nice -n 10 python scripts/fuzz_loaders.py --cases 4000 --real-cases 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from fuzz_harness import Target, is_structural, run_cases, summarize  # noqa: E402


def real_gguf(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit)
    cached = sorted((Path.home() / ".cache" / "mlxedge-tests" / "smollm2-gguf").glob("*.gguf"))
    if cached:
        return cached[0]
    from mlxedge.sources.registry import resolve_alias

    found = resolve_alias("smollm2")
    return Path(found) if found else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=4000, help="cases per tiny target (GGUF, safetensors)")
    ap.add_argument("--real-cases", type=int, default=2000, help="cases on the real SmolLM2 GGUF (0: skip)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--gguf", help="the real GGUF to mutate (default: the test cache's SmolLM2)")
    ap.add_argument("--case-timeout", type=float, default=60.0)
    args = ap.parse_args()

    from gguf_tiny import TINY, tiny_model, write_gguf
    from tiny_models import build_tiny

    work = Path(tempfile.mkdtemp(prefix="mlxedge-fuzz-"))
    print(f"work directory (per-case results in *.jsonl): {work}", flush=True)
    targets = [(Target("tiny-gguf", "gguf", str(write_gguf(tiny_model("llama"), work / "tiny.gguf",
                                                           TINY["llama"]["types"]))), args.cases),
               (Target("tiny-safetensors", "dir", str(build_tiny("llama", work / "st"))), args.cases)]
    real = real_gguf(args.gguf) if args.real_cases else None
    if real is not None:
        targets.append((Target("smollm2-gguf", "gguf", str(real)), args.real_cases))
    elif args.real_cases:
        print("(no SmolLM2 GGUF found: run the test suite once, or pass --gguf)")

    grand = {}
    total_cases, start = 0, time.time()
    findings = []
    for target, count in targets:
        t0 = time.time()
        log = open(work / f"{target.name}.jsonl", "w")

        def progress(result, log=log, t0=t0, name=target.name):
            log.write(json.dumps(result) + "\n")
            log.flush()
            if (result["index"] + 1) % 100 == 0:
                print(f"  {name}: {result['index'] + 1} cases, {time.time() - t0:.0f} s", flush=True)

        results = run_cases(target, args.seed, count, work / target.name, case_timeout=args.case_timeout,
                            total_timeout=24 * 3600, on_result=progress)
        log.close()
        total_cases += len(results)
        print(f"\n== {target.name}: {len(results)} cases in {time.time() - t0:.0f} s")
        for key, n in summarize(results).items():
            print(f"{n:7d}  {key}")
        for r in results:
            outcome = r["outcome"]
            if outcome == "loaded":
                outcome = "loaded-finite"
            if outcome == "error":
                outcome = "clean error"
            grand[outcome] = grand.get(outcome, 0) + 1
            if r["outcome"] not in ("error", "loaded") or (r["outcome"] == "loaded" and is_structural(r["kind"])):
                findings.append((target.name, r))
        silent = sum(1 for r in results if r["outcome"] == "loaded" and is_structural(r["kind"]))
        print(f"  structurally corrupt cases that loaded: {silent}")
    print(f"\n== all targets: {total_cases} cases in {time.time() - start:.0f} s (seed {args.seed})")
    for key in ("clean error", "loaded-finite", "nonfinite", "unexpected", "multiline", "crash", "hang"):
        print(f"{grand.get(key, 0):7d}  {key}")
    for name, r in findings[:50]:
        print(f"FINDING {name} case {r['index']} [{r['kind']}] {r['outcome']}: {r['detail'][:200]}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
