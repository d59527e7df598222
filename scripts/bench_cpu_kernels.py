#!/usr/bin/env python
"""Per-kernel GEMV speed of mlxedge's native CPU kernels vs MLX's built-ins, side by side in one process.

For SmolLM2-135M's decode shapes (one activation row) at 4-bit g32, 4-bit g64 and 8-bit g32 (and the
49152x576 8-bit g32 head), a 1B-class model's long-row MLP shapes, and the q·k·v projections in the one
call a bound attention makes (their three weights, one partition of their rows: `quantized_matmuls`; MLX's
built-in side runs the three matmuls),
reports time per call, the bandwidth it implies (bytes of W + scales + biases
read / time) and that bandwidth as a percentage of this machine's measured read bandwidth, and against only reading the same
bytes in calls of the same size (below). Each of our ISA paths (--isas) is timed two ways:
- kernel: the kernel alone, called in a native loop (`_ext.kernel_seconds`: no graph, no scheduling) —
  the kernel's own bandwidth;
- via MLX: the same calls as lazy MLX ops evaluated together, as a decode step runs them — adds MLX's
  per-op cost (graph node, scheduling on the CPU stream, output allocation: a few µs each).
Weights are rotated over copies totalling twice the last-level cache (at least 128 MiB), as a decode step
of a model bigger than the cache reads them, so the figures are DRAM figures, not cache ones. All sides are interleaved per repetition so machine
load affects them alike. The read bandwidth is the fastest of several streaming reductions
(STREAMING_READS), measured before and after the table (the larger counts: this machine's bandwidth moves
with its neighbours' load), on one thread and on as many threads as the pool has. Each kernel is compared
with the figure for the threads it runs on, like with like: a GEMV reading less than
MLXEDGE_CPU_PARALLEL_MIN_KB (default 128 KiB) runs on the calling thread alone, a larger one on the whole
pool, MLX's built-in on one thread. The table also gives every kernel's share of the all-threads figure.
A call reading well under a megabyte cannot reach the big buffer's figure whatever it computes: its first
lines wait for DRAM, and every 4 KiB page of MLX's arrays costs a TLB miss (on a VM, a nested page walk).
So each row also gives the same-size read (`_ext.read_seconds`): the very buffers the calls read, call after
call over the same copies, split over the same threads, best of a plain and a prefetching read — how fast any
code could read them that way — and the kernel's time against it ("% of read").

The read bandwidth of this VM moves with its neighbours' load by up to half between one minute and the next
(2-thread reference 32-52 GB/s in one hour), so --runs N measures the whole table N times and ends with each
row's median over the runs, with every run's value beside it.

Each table ends with the issue-10 target (>= 60%) checked both ways: each kernel against the same-size read,
and against the 512 MiB read, beside how far a plain read of the same bytes gets on that second scale.

    python scripts/bench_cpu_kernels.py [--isas avx512vnni,avx512] [--dtype float32|bfloat16|float16] [--reps 5] [--runs 3]
    python scripts/bench_cpu_kernels.py --gemm   # prefill: OpenBLAS tiles vs the built-in micro-kernel vs MLX
"""

from __future__ import annotations

import argparse
import glob
import statistics
import threading
import time
from typing import NamedTuple

import mlx.core as mx
import numpy as np

import mlxedge.cpu as cpu

SHAPES = [  # (name, rows of each weight, K): out x in, nn.Linear layout; several weights = one call
    ("up/gate 576->1536", (1536,), 576),
    ("down 1536->576", (576,), 1536),
    ("q/o 576->576", (576,), 576),
    ("k/v 576->192", (192,), 576),
    ("q·k·v 576->576+192+192, one call", (576, 192, 192), 576),
    # a 1B-class model's MLP (Llama-3.2-1B: 2048 hidden, 8192 intermediate): rows of 1-8 KB, where the
    # decode GEMV's prefetch has to run whole steps ahead (StepPrefetch in kernels/core.cpp)
    ("1B up/gate 2048->8192", (8192,), 2048),
    ("1B down 8192->2048", (2048,), 8192),
]
HEAD = ("head 576->49152", (49152,), 576)
CONFIGS = [(4, 32), (4, 64), (8, 32)]


def largest_cache_bytes() -> int:
    """The largest CPU cache Linux reports for cpu0 (its last level), or 32 MiB where sysfs says nothing."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = open(path).read().strip()  # e.g. "307200K", "32M"
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=32 << 20)


# rotate weights over more than this, so that each call reads them from DRAM: at least 128 MiB (with only 2x
# a 32 MiB L3 the 35 MB head still hit it) and twice the last-level cache (a 300 MiB L3 held 128 MiB whole)
ROTATE_BYTES = max(128 << 20, 2 * largest_cache_bytes())
DISTINCT_SETS = 4  # random weight sets; the other copies repeat them in buffers of their own


# Reductions that stream an array once; the fastest of them is the reference. A plain float32 `sum` is
# not one: numpy's pairwise summation is compute-bound at ~19 GB/s on one thread here, below what the
# memory gives (`dot` of an array with itself, through OpenBLAS, reads it at ~35-40 GB/s).
STREAMING_READS = {
    "sum": np.sum,
    "max": np.max,
    "or": lambda p: np.bitwise_or.reduce(p.view(np.uint64)),
    "dot": lambda p: np.dot(p, p),
}


def read_bandwidth(nbytes: int = 512 << 20, threads: int = 1, reps: int = 5) -> float:
    """Best GB/s of streaming reductions over a float32 array that fits no cache, split over `threads`:
    numpy's (STREAMING_READS) and a native one (`_ext.read_bandwidth`: 512-bit loads OR-ed in four chains
    per thread; numpy's reductions on Python threads fall short on two threads, 37 vs up to 61 GB/s here)."""
    a = np.ones(nbytes // 4, dtype=np.float32)
    parts = np.array_split(a, threads)
    best = 0.0
    for reduce in STREAMING_READS.values():
        for _ in range(reps):
            t0 = time.perf_counter()
            if threads == 1:
                reduce(a)
            else:
                ts = [threading.Thread(target=reduce, args=(p,)) for p in parts]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
            best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    return max(best, cpu._ext.read_bandwidth(nbytes, threads, reps) / 1e9)


def weights(Ns, K, bits, gs, dtype, copies, seed=0):
    """`copies` sets of one quantized (w, scales, biases) triplet per entry of Ns, each in buffers of its own.
    The first DISTINCT_SETS are random; the rest copy them (the kernels' speed does not depend on the values),
    made and evaluated a batch at a time so that memory holds the copies and not their float originals."""
    out = []
    for i in range(min(copies, DISTINCT_SETS)):
        one = []
        for j, N in enumerate(Ns):
            w = mx.random.normal((N, K), key=mx.random.key(seed + 100 * i + j))
            wq, s, b = mx.quantize(w, group_size=gs, bits=bits)
            one.append((wq, s.astype(dtype), b.astype(dtype)))
        mx.eval(one)
        out.append(one)
    while len(out) < copies:
        batch = [[tuple(a + 0 for a in t) for t in out[(len(out) + k) % DISTINCT_SETS]]
                 for k in range(min(256, copies - len(out)))]
        mx.eval(batch)
        out += batch
    return out


def nbytes(weight_set) -> int:
    return sum(a.nbytes for triplet in weight_set for a in triplet)


BUILTIN_BATCH_S = 0.25  # seconds of MLX built-in calls per timed batch (see measure)


def time_calls(fn, x, ws, calls: int) -> float:
    """Seconds per call over `calls` independent calls rotating through the weight sets `ws`, evaluated together."""
    outs = [fn(x, ws[i % len(ws)]) for i in range(calls)]
    t0 = time.perf_counter()
    mx.eval(outs)
    return (time.perf_counter() - t0) / calls


GEMM_SHAPES = [(64, 49152, 576), (256, 1536, 576), (512, 576, 1536)]  # (rows, N, K): head, up, down


def best_of(f, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(f())
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_table(reps: int) -> None:
    """Many-row matmuls: float (unquantized Linear / tied head) and 4-bit g64, per GEMM backend."""
    print("| rows x K -> N | kind | openblas tiles ms | GFLOP/s | built-in kernel ms | GFLOP/s | mlx ms | openblas speed-up over built-in |")
    print("|---|---|---|---|---|---|---|---|")
    for M, N, K in GEMM_SHAPES:
        x = mx.random.normal((M, K))
        w = mx.random.normal((N, K))
        wq, s, b = mx.quantize(w, group_size=64, bits=4)
        mx.eval(x, w, wq, s, b)
        gf = 2 * M * N * K / 1e9
        kinds = [
            ("float32", lambda: cpu.matmul(x, w), lambda: x @ w.T),
            ("4-bit g64", lambda: cpu.quantized_matmul(x, wq, s, b, group_size=64, bits=4),
             lambda: mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4)),
        ]
        for kind, ours, theirs in kinds:
            cpu._configure(blas="openblas")
            tb = best_of(ours, reps)
            cpu._configure(blas="none")
            to = best_of(ours, reps)
            cpu._configure(blas="openblas")
            tm = best_of(theirs, 1)
            print(f"| {M} x {K} -> {N} | {kind} | {tb * 1e3:.1f} | {gf / tb:.0f} | {to * 1e3:.1f} | {gf / to:.0f} "
                  f"| {tm * 1e3:.0f} | {to / tb:.2f}x |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--runs", type=int, default=1, help="whole tables to measure; with more than one, a last "
                    "table gives each row's median over them")
    ap.add_argument("--rows", type=int, default=1, help="activation rows (1 = decode)")
    ap.add_argument("--calls", type=int, default=40, help="calls per timed batch")
    ap.add_argument("--isas", default="", help="our ISA paths to compare, comma-separated (default: the one in use)")
    ap.add_argument("--only", default="", help="only the shapes whose name contains this (e.g. q/o)")
    ap.add_argument("--gemm", action="store_true", help="prefill GEMMs per backend instead of decode GEMVs")
    args = ap.parse_args()
    if not cpu.available():
        raise SystemExit(f"native CPU kernels: {cpu.describe()}")
    dtype = getattr(mx, args.dtype)
    mx.set_default_device(mx.cpu)
    if args.gemm:
        print(f"backend: {cpu.describe()}\n")
        return gemm_table(args.reps)
    threads = cpu._ext.threads()
    isas = [i.strip() for i in args.isas.split(",") if i.strip()] or [cpu._ISA_NAMES[cpu._ext.isa()]]
    for isa in isas:  # each must be one this CPU runs (an unsupported one falls back to scalar)
        cpu._configure(isa=isa)
        if cpu._ISA_NAMES[cpu._ext.isa()] != isa:
            raise SystemExit(f"this CPU has no {isa} path ({cpu.describe()})")

    describe_isa = cpu._ISA_NAMES[cpu._ext.isa()]
    cpu._configure(isa=isas[0])
    print(f"backend: {cpu.describe()}; ISA paths {', '.join(isas)}; activations {args.dtype}, rows {args.rows}")
    cpu._configure(isa=describe_isa)
    rows = [(name, Ns, K, bits, gs) for name, Ns, K in SHAPES for bits, gs in CONFIGS]
    rows.append((*HEAD, 8, 32))
    rows = [r for r in rows if args.only in r[0]]
    runs = []
    for run in range(args.runs):
        if args.runs > 1:
            print(f"\n## run {run + 1} of {args.runs}\n")
        bw, results = measure(rows, isas, threads, args, dtype)
        print_table(bw, results, isas, threads)
        runs.append((bw, results))
    if args.runs > 1:
        print_summary(runs, isas)


class Result(NamedTuple):
    """One row of a table: seconds per call, best of the repetitions."""
    name: str
    bits: int
    gs: int
    size: int  # bytes one call reads
    threads: int  # the threads it runs on
    kernel: dict  # {isa: kernel alone}
    via_mlx: dict  # {isa: through MLX}
    builtin: float  # MLX's built-in
    read: float  # the same-size read


def measure(rows, isas, threads, args, dtype):
    """One table's worth: the read bandwidth before and after (the larger of each counts), and a Result per row."""
    def reference() -> dict:
        return {1: read_bandwidth(threads=1), threads: read_bandwidth(threads=threads)}

    bw = reference()
    print("read bandwidth before the table (best of "
          f"{', '.join(STREAMING_READS)}, native, over 512 MiB): "
          + ", ".join(f"{t} thread(s) {g:.1f} GB/s" for t, g in bw.items()) + "\n")
    parallel_min = cpu._ext.set_gemv_parallel_min_bytes(0)  # the setter returns the value in force: put it back
    cpu._ext.set_gemv_parallel_min_bytes(parallel_min)
    results = []
    for name, Ns, K, bits, gs in rows:
        probe = weights(Ns, K, bits, gs, dtype, 1)
        size = nbytes(probe[0])
        copies = max(1, -(-ROTATE_BYTES // size))
        ws = probe + weights(Ns, K, bits, gs, dtype, copies - 1, seed=1) if copies > 1 else probe
        flat = [t for one in ws for t in one]
        x = mx.random.normal((args.rows, K)).astype(dtype)
        mx.eval(x)
        calls = max(args.calls, copies)  # touch every copy: nothing is served from cache
        if len(Ns) == 1:
            f_ours = lambda x, one: cpu.quantized_matmul(x, *one[0], group_size=gs, bits=bits)  # noqa: E731
        else:
            f_ours = lambda x, one: cpu.quantized_matmuls(x, one, group_size=gs, bits=bits)  # noqa: E731
        f_mlx = lambda x, one: [mx.quantized_matmul(x, *t, transpose=True, group_size=gs, bits=bits)  # noqa: E731
                                for t in one]
        kernel = {isa: [] for isa in isas}
        via_mlx = {isa: [] for isa in isas}
        t_mlx, t_read = [], []
        on_threads = threads if size >= parallel_min else 1
        arrays = [a for t in flat for a in t]
        # MLX's built-in runs about BUILTIN_BATCH_S of calls per repetition (at most calls // 4): in float16 it
        # takes 15 ms-1.3 s a call here, and a quarter of the copies' rotation made one float16 table run for
        # over 15 minutes. It is compute-bound at that speed, so fewer calls lose nothing.
        builtin_calls = max(2, min(calls // 4, int(BUILTIN_BATCH_S / time_calls(f_mlx, x, ws, 2))))
        for rep in range(args.reps):
            t_read.append(cpu._ext.read_seconds(arrays, per_set=3 * len(Ns), calls=calls, threads=on_threads))
            for isa in (isas if rep % 2 == 0 else isas[::-1]):  # alternate which path runs first
                cpu._configure(isa=isa)
                kernel[isa].append(cpu._ext.kernel_seconds(x, flat, group_size=gs, bits=bits, calls=calls,
                                                           parts=len(Ns)))
                via_mlx[isa].append(time_calls(f_ours, x, ws, calls))
            t_mlx.append(time_calls(f_mlx, x, ws, builtin_calls))
        # the best repetition is each side's speed; the machine may be shared (say so with the numbers)
        results.append(Result(name, bits, gs, size, on_threads, {i: min(kernel[i]) for i in isas},
                              {i: min(via_mlx[i]) for i in isas}, min(t_mlx), min(t_read)))
        del ws
    cpu._configure(isa=isas[0])
    after = reference()
    bw = {t: max(g, after[t]) for t, g in bw.items()}
    print("read bandwidth after the table: " + ", ".join(f"{t} thread(s) {g:.1f} GB/s" for t, g in after.items())
          + " -> reference " + ", ".join(f"{t} thread(s) {g:.1f} GB/s" for t, g in bw.items()) + "\n")
    return bw, results


def share(size, sec, gbps) -> float:
    """Percent of `gbps` that reading `size` bytes in `sec` seconds achieves."""
    return 100 * size / sec / 1e9 / gbps


TARGET = 60  # issue 10: per-kernel GEMV bandwidth >= 60% of the measured read bandwidth


def verdict(what: str, shares: list) -> str:
    """One line: how many rows reach TARGET% on `shares` ([(row label, percent)]), and the lowest."""
    low_label, low = min(shares, key=lambda t: t[1])
    met = sum(p >= TARGET for _, p in shares)
    return f"- {what}: >= {TARGET}% on {met} of {len(shares)} rows (lowest {low:.0f}%, {low_label})"


def print_verdicts(isas, label, read_share, kernel_share, of_read) -> None:
    """The target checked both ways, and how far a plain read of the same bytes gets on the 512 MiB scale:
    where the read itself is under TARGET%, no kernel reading those bytes can reach it there."""
    print(f"\ntarget >= {TARGET}%{label}:")
    print(verdict("a plain read of the same bytes, of the 512 MiB read", read_share))
    for isa in isas:
        print(verdict(f"{isa} kernel, of the same-size read", of_read[isa]))
        print(verdict(f"{isa} kernel, of the 512 MiB read", kernel_share[isa]))


def print_table(bw, results, isas, threads) -> None:
    print("% = GB/s over the read bandwidth on the threads it runs on (\"thr\"); % all = over the "
          f"{threads}-thread figure; same-size read = only reading what one call reads (the same buffers, call after "
          "call, split over the same threads: `_ext.read_seconds`); % of read = the kernel's time against it\n")
    head = "| shape | bits/gs | bytes | thr | same-size read µs | % |"
    rule = "|---|---|---|---|---|---|"
    for isa in isas:
        head += f" {isa} kernel µs | % | % of read | % all | via MLX µs | % |"
        rule += "---|---|---|---|---|---|"
    print(head + " MLX built-in µs | % | kernel speed-up over MLX |")
    print(rule + "---|---|---|")
    for name, bits, gs, size, t, kern, via, m, rd in results:
        pct = lambda sec, t=t: f"{share(size, sec, bw[t]):.0f}%"  # noqa: E731
        line = f"| {name} | {bits}/{gs} | {size / 1e6:.2f} MB | {t} | {rd * 1e6:.1f} | {pct(rd)} |"
        for isa in isas:
            line += (f" {kern[isa] * 1e6:.1f} | {pct(kern[isa])} | {100 * rd / kern[isa]:.0f}% | "
                     f"{pct(kern[isa], threads)} | {via[isa] * 1e6:.1f} | {pct(via[isa])} |")
        print(line + f" {m * 1e6:.0f} | {pct(m, 1)} | {m / kern[isas[0]]:.0f}x |")
    label = lambda r: f"{r.name} {r.bits}/{r.gs}"  # noqa: E731
    print_verdicts(isas, "", [(label(r), share(r.size, r.read, bw[r.threads])) for r in results],
                   {i: [(label(r), share(r.size, r.kernel[i], bw[r.threads])) for r in results] for i in isas},
                   {i: [(label(r), 100 * r.read / r.kernel[i]) for r in results] for i in isas})


def print_summary(runs, isas) -> None:
    """Per row and ISA, the median over the runs of the two shares that matter, with each run's value: this
    VM's bandwidth moves with its neighbours' load between (and within) runs, and a median of whole runs is
    steadier than any one of them."""
    print(f"\n## median of {len(runs)} runs\n")
    print("% = of the 512 MiB read on the row's threads, taken with that run's reference; % of read = of the "
          "same-size read, timed interleaved with the kernel\n")
    print("| shape | bits/gs | thr | ISA | kernel µs | % (each run) | % | % of read (each run) | % of read |")
    print("|---|---|---|---|---|---|---|---|---|")
    each = lambda v: " ".join(f"{x:.0f}" for x in v)  # noqa: E731
    read_medians, kernel_medians, of_read_medians = [], {i: [] for i in isas}, {i: [] for i in isas}
    for i, row in enumerate(runs[0][1]):
        same_row = [(bw, results[i]) for bw, results in runs]
        label = f"{row.name} {row.bits}/{row.gs}"
        read_medians.append((label, statistics.median(share(r.size, r.read, bw[r.threads]) for bw, r in same_row)))
        for isa in isas:
            kern = [r.kernel[isa] for _, r in same_row]
            pct = [share(r.size, r.kernel[isa], bw[r.threads]) for bw, r in same_row]
            of_read = [100 * r.read / r.kernel[isa] for _, r in same_row]
            kernel_medians[isa].append((label, statistics.median(pct)))
            of_read_medians[isa].append((label, statistics.median(of_read)))
            print(f"| {row.name} | {row.bits}/{row.gs} | {row.threads} | {isa} | {statistics.median(kern) * 1e6:.1f} | "
                  f"{each(pct)} | {statistics.median(pct):.0f}% | {each(of_read)} | {statistics.median(of_read):.0f}% |")
    print_verdicts(isas, f" (medians of {len(runs)} runs)", read_medians, kernel_medians, of_read_medians)


if __name__ == "__main__":
    main()
