#!/usr/bin/env python
"""Decode (tg) and prefill (pp) tok/s of mlxedge vs llama.cpp, MLX's built-in kernels and mlx-lm, side by side.

Sides, all on the SmolLM2-135M-Instruct GGUF (Q4_1, its token embedding/head Q8_0) or its exact bytes:
- `mlxedge q4`: the GGUF as stored (Q4_1 -> 4-bit g32, Q8_0 -> 8-bit g32), kernels as chosen at load
  (MLXEDGE_KERNELS, default auto: the native CPU kernels where they measured faster);
- `mlxedge q8`: the same weights quantized to 8 bits, g32, while loading;
- `mlxedge q4 builtin`: the GGUF as stored with every layer bound to MLX's built-in kernels;
- `llama.cpp q4`: llama-cpp-python on the very same GGUF, n_threads = n_threads_batch = --threads;
  `llama.cpp q8`: the GGUF requantized to Q8_0 by llama.cpp's own quantizer;
- `mlx-lm q4` / `mlx-lm q8`: mlx-lm's load + stream_generate on mlx-lm copies written by mlxedge.convert
  (identical bytes) in the compute dtype mlxedge uses (float32 here).
Tests as llama-bench's: pp = one prompt of -p tokens, rate = p / time to the first token; tg = -n tokens
from a one-token prompt, rate over the tokens after the first; EOS ignored everywhere; one warm-up per side,
then --reps repetitions, interleaved across sides (order alternating) so drifting load hits all alike.
Sides running on MLX's built-in kernels (slow on this CPU) can be given fewer tokens (--slow-p/--slow-n);
their rates are then per those counts, which the table says. Ratios are of means: mlxedge ÷ other side.
llama-cpp-python is an optional extra (`pip install 'mlxedge[llama]'`); without it that side is skipped.

    python scripts/bench_vs_llama_cpp.py [-p 512] [-n 128] [--reps 3] [--threads 2] [--slow-p 128 --slow-n 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlxedge
from mlxedge.bench import MlxLmRunner, OursRunner, prompt_ids, run_pp, run_tg
from mlxedge.kernels import KernelChoice


class LlamaCppRunner:
    """llama-cpp-python's generate on exact token ids (greedy, never stopping), KV cache reset per run."""

    def __init__(self, path: Path, threads: int, n_ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                         n_batch=512, verbose=False)

    def tokens(self, ids, n):
        self.llm.reset()  # no prefix reuse between runs
        for i, token in enumerate(self.llm.generate(list(ids), top_k=1, temp=0.0, reset=True)):
            yield token
            if i + 1 >= n:
                return


def quantize_q8_0(src: Path, dest: Path, threads: int) -> Path:
    """llama.cpp's own quantizer: the GGUF requantized to Q8_0."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), params) != 0:
        raise RuntimeError("llama_model_quantize failed")
    return dest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-p", type=int, default=512)
    parser.add_argument("-n", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slow-p", type=int, default=None, help="pp tokens for sides on MLX's built-in kernels")
    parser.add_argument("--slow-n", type=int, default=None, help="tg tokens for sides on MLX's built-in kernels")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip", default="", help="comma-separated side names to leave out")
    args = parser.parse_args()
    os.environ.setdefault("MLXEDGE_CPU_THREADS", str(args.threads))  # read when mlxedge.cpu first imports
    from mlxedge.sources.registry import resolve_alias

    gguf = resolve_alias("smollm2")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    slow_p, slow_n = args.slow_p or args.p, args.slow_n or args.n
    sides = {}  # name -> (runner, p, n)
    work = Path(tempfile.mkdtemp(prefix="bench-llama-"))

    def add(name, make, slow=False):
        if name in skip:
            return
        print(f"loading {name}...", file=sys.stderr)
        try:
            sides[name] = (make(), slow_p if slow else args.p, slow_n if slow else args.n)
        except ImportError as e:
            print(f"skipping {name}: {e} (pip install 'mlxedge[llama]')", file=sys.stderr)

    tokenizer, kernels = [], {}  # filled as mlxedge sides load

    def ours(name, bits, mode=None):
        model = mlxedge.load(gguf, bits=bits, group_size=32, dtype=args.dtype)
        if mode is not None:
            model.use_kernels(KernelChoice(mode))
        tokenizer.append(model.tokenizer)
        kernels[name] = model.info["kernels"]
        return OursRunner(model)

    def theirs(bits):
        target = work / f"mlx-lm-{bits or 'stored'}"
        mlxedge.convert(gguf, target, bits=bits, group_size=32, dtype=args.dtype, force=True)
        return MlxLmRunner(target)

    n_ctx = max(args.p, args.n) + 16
    add("mlxedge q4", lambda: ours("mlxedge q4", None))
    add("mlxedge q8", lambda: ours("mlxedge q8", 8))
    add("mlxedge q4 builtin", lambda: ours("mlxedge q4 builtin", None, "builtin"), slow=True)
    add("llama.cpp q4", lambda: LlamaCppRunner(gguf, args.threads, n_ctx))
    add("llama.cpp q8", lambda: LlamaCppRunner(quantize_q8_0(gguf, work / "q8_0.gguf", args.threads),
                                               args.threads, n_ctx))
    add("mlx-lm q4", lambda: theirs(None), slow=True)
    add("mlx-lm q8", lambda: theirs(8), slow=True)

    if not tokenizer:
        parser.error("at least one mlxedge side is needed (its tokenizer makes the prompt)")
    ids = prompt_ids(tokenizer[0], max(args.p, slow_p))
    results = {name: {"pp": [], "tg": []} for name in sides}
    for name, (runner, p, n) in sides.items():  # warm-up
        print(f"warm-up {name}", file=sys.stderr)
        run_pp(runner, ids[:min(p, 32)])
        run_tg(runner, ids, 4)
    started = time.time()
    for rep in range(args.reps):
        order = list(sides.items())
        if rep % 2:
            order.reverse()
        for name, (runner, p, n) in order:
            results[name]["pp"].append(run_pp(runner, ids[:p])["pp_tps"])
            results[name]["tg"].append(run_tg(runner, ids, n)["tg_tps"])
            print(f"rep {rep + 1} {name}: pp {results[name]['pp'][-1]:.1f} tg {results[name]['tg'][-1]:.1f}",
                  file=sys.stderr)

    load = os.getloadavg()
    print(f"SmolLM2-135M-Instruct ({gguf.name}); {args.reps} interleaved repetitions after a warm-up, mean ± stdev; "
          f"threads {args.threads}; compute dtype {args.dtype}; {time.time() - started:.0f} s; "
          f"load average {load[0]:.1f}/{load[1]:.1f} on {os.cpu_count()} cores")
    for name, k in kernels.items():
        print(f"{name}: {k['backend']} (mode {k['mode']}; {k['layers']})")
    print()
    print("| side | pp t/s | tg t/s | pp tokens | tg tokens |")
    print("|---|---|---|---|---|")
    means = {}
    for name, r in results.items():
        pp, tg = statistics.fmean(r["pp"]), statistics.fmean(r["tg"])
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        means[name] = (pp, tg)
        _, p, n = sides[name]
        print(f"| {name} | {pp:.1f} ± {sd(r['pp']):.1f} | {tg:.1f} ± {sd(r['tg']):.1f} | {p} | {n} |")
    print()
    print("| ratio | pp | tg |")
    print("|---|---|---|")
    for ours_name, other in (("mlxedge q4", "llama.cpp q4"), ("mlxedge q8", "llama.cpp q8"),
                             ("mlxedge q4", "mlxedge q4 builtin"), ("mlxedge q4", "mlx-lm q4"),
                             ("mlxedge q8", "mlx-lm q8")):
        if ours_name in means and other in means:
            (a_pp, a_tg), (b_pp, b_tg) = means[ours_name], means[other]
            print(f"| {ours_name} ÷ {other} | {a_pp / b_pp:.2f}× | {a_tg / b_tg:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
