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
Each side runs in its own worker process (loaded once, then driven rep by rep from here, one side at a time):
two runtimes in one process disturb each other (llama.cpp's idle thread pool cost mlxedge ~20% of its decode
speed on 2 cores when they shared a process). --same-process restores the old single-process run.
llama-cpp-python is an optional extra (`pip install 'mlxedge[llama]'`); without it that side is skipped.
On a CPU with AMX under a VM (Intel Sapphire/Emerald Rapids here), llama.cpp's default native build runs AMX
tile instructions on its worker threads and dies with SIGILL at the first prompt; build it for AVX-512 VNNI,
the ISA mlxedge's kernels use there:
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
      -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON" \\
      pip install --no-cache-dir --force-reinstall --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36
(pip otherwise reuses a wheel it cached from an earlier native build, which loads and decodes, then dies at
the first batched prompt: exit 132.)

    python scripts/bench_vs_llama_cpp.py [-p 512] [-n 128] [--reps 3] [--threads 2] [--slow-p 128 --slow-n 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlxedge
from mlxedge.bench.timing import MlxLmRunner, OursRunner, prompt_ids, run_pp, run_tg
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


def make_side(name: str, args, gguf: Path, work: Path):
    """(runner, kernels info or None, slow) for one side, loaded in this process."""
    if name.startswith("mlxedge"):
        bits = 8 if name == "mlxedge q8" else None
        model = mlxedge.load(gguf, bits=bits, group_size=32, dtype=args.dtype)
        if name.endswith("builtin"):
            model.use_kernels(KernelChoice("builtin"))
        return OursRunner(model), model.info["kernels"], name.endswith("builtin")
    n_ctx = max(args.p, args.n) + 16
    if name == "llama.cpp q4":
        return LlamaCppRunner(gguf, args.threads, n_ctx), None, False
    if name == "llama.cpp q8":
        return LlamaCppRunner(quantize_q8_0(gguf, work / "q8_0.gguf", args.threads), args.threads, n_ctx), None, False
    bits = 8 if name == "mlx-lm q8" else None
    target = work / f"mlx-lm-{bits or 'stored'}"
    mlxedge.convert(gguf, target, bits=bits, group_size=32, dtype=args.dtype, force=True)
    return MlxLmRunner(target), None, True


SIDES = ("mlxedge q4", "mlxedge q8", "mlxedge q4 builtin", "llama.cpp q4", "llama.cpp q8", "mlx-lm q4", "mlx-lm q8")


def worker(args, gguf: Path) -> int:
    """--worker SIDE: load one side, answer JSON commands on stdin ({"op": "pp"|"tg"|"warm", ...}) one per line."""
    work = Path(tempfile.mkdtemp(prefix="bench-llama-"))
    try:
        runner, kernels, slow = make_side(args.worker, args, gguf, work)
    except ImportError as e:
        print(json.dumps({"error": f"{e} (pip install 'mlxedge[llama]')"}), flush=True)
        return 0
    print(json.dumps({"ready": True, "kernels": kernels, "slow": slow}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        ids = cmd["ids"]
        if cmd["op"] == "warm":
            run_pp(runner, ids[:32])
            run_tg(runner, ids, 4)
            out = {}
        elif cmd["op"] == "pp":
            out = run_pp(runner, ids)
        else:
            out = run_tg(runner, ids, cmd["n"])
        print(json.dumps(out), flush=True)
    return 0


class Remote:
    """A side in its own process: load it, then run one command at a time."""

    def __init__(self, name: str, argv: list):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", name, *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.hello = json.loads(self.proc.stdout.readline() or '{"error": "worker died while loading"}')

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:  # the worker died, e.g. SIGILL from a llama.cpp built for instructions this VM traps
            code = self.proc.wait(timeout=60)
            hint = ("; on an AMX host rebuild llama-cpp-python as this script's docstring says"
                    if self.name.startswith("llama.cpp") else "")
            raise SystemExit(f"error: the {self.name} worker died (exit {code}) during {cmd['op']!r}{hint}")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Local:
    """A side in this process (--same-process)."""

    def __init__(self, name: str, args, gguf: Path, work: Path):
        try:
            self.runner, kernels, slow = make_side(name, args, gguf, work)
            self.hello = {"ready": True, "kernels": kernels, "slow": slow}
        except ImportError as e:
            self.hello = {"error": str(e)}

    def ask(self, op, ids, n=None):
        if op == "warm":
            run_pp(self.runner, ids[:32])
            run_tg(self.runner, ids, 4)
            return {}
        return run_pp(self.runner, ids) if op == "pp" else run_tg(self.runner, ids, n)

    def close(self):
        pass


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
    parser.add_argument("--same-process", action="store_true", help="load every side in this one process")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("MLXEDGE_CPU_THREADS", str(args.threads))  # read when mlxedge.cpu first imports
    from mlxedge.sources.registry import resolve_alias

    gguf = resolve_alias("smollm2")
    if args.worker:
        return worker(args, gguf)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    slow_p, slow_n = args.slow_p or args.p, args.slow_n or args.n
    work = Path(tempfile.mkdtemp(prefix="bench-llama-"))
    argv = ["-p", str(args.p), "-n", str(args.n), "--threads", str(args.threads), "--dtype", args.dtype]
    ids = prompt_ids(mlxedge.load(gguf, dtype=args.dtype).tokenizer, max(args.p, slow_p))
    sides, kernels = {}, {}  # name -> (handle, p, n)
    for name in SIDES:
        if name in skip:
            continue
        print(f"loading {name}...", file=sys.stderr)
        handle = Local(name, args, gguf, work) if args.same_process else Remote(name, argv)
        if "error" in handle.hello:
            print(f"skipping {name}: {handle.hello['error']}", file=sys.stderr)
            continue
        slow = handle.hello["slow"]
        sides[name] = (handle, slow_p if slow else args.p, slow_n if slow else args.n)
        if handle.hello.get("kernels"):
            kernels[name] = handle.hello["kernels"]
    if not sides:
        parser.error("every side was skipped")
    results = {name: {"pp": [], "tg": []} for name in sides}
    for name, (handle, p, n) in sides.items():
        print(f"warm-up {name}", file=sys.stderr)
        handle.ask(op="warm", ids=ids)
    started = time.time()
    for rep in range(args.reps):
        order = list(sides.items())
        if rep % 2:
            order.reverse()
        for name, (handle, p, n) in order:
            results[name]["pp"].append(handle.ask(op="pp", ids=ids[:p])["pp_tps"])
            results[name]["tg"].append(handle.ask(op="tg", ids=ids, n=n)["tg_tps"])
            print(f"rep {rep + 1} {name}: pp {results[name]['pp'][-1]:.1f} tg {results[name]['tg'][-1]:.1f}",
                  file=sys.stderr)
    for handle, _, _ in sides.values():
        handle.close()

    load = os.getloadavg()
    how = "one process" if args.same_process else "one process per side"
    print(f"SmolLM2-135M-Instruct ({gguf.name}); {args.reps} interleaved repetitions after a warm-up, mean ± stdev; "
          f"{how}; threads {args.threads}; compute dtype {args.dtype}; {time.time() - started:.0f} s; "
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
