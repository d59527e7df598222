"""What does batched decoding cost on this machine? Time one step of the engine's DecodeBatch (the path
`mlxedge serve` takes: left-padded BatchKVCache, per-row samplers, pipelined steps) at batch 1, 2, 4 and 8,
interleaved and repeated, and print the median and least ms per step and the tokens/s gain over batch 1
(the median and the minimum: on a shared, loaded machine single steps vary a lot).

On Apple silicon decoding is memory-bound and a batch of 4 costs little more than 1. On the Linux CPU build
the native kernels (mlxedge.cpu; on by default) have a GEMV that takes up to 16 rows per weight pass, so a
batch of B reads the weights once instead of B times; MLX's built-in quantized matmul (MLXEDGE_KERNELS=builtin)
is a single-threaded scalar loop whose cost grows with B.

    python scripts/batch_decode_cost.py [MODEL] [--sizes 1,4] [--steps 8] [--repeats 3]
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import mlxedge  # noqa: E402

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Write a haiku about the sea.",
           "List three colours and one fruit of each colour, please.", "Hi", "Why is the sky blue?",
           "Explain recursion to a child in two sentences.", "What is 17 times 23?", "Name a river in Africa."]


def step_times(model, size: int, steps: int) -> list:
    """Wall time of each of `steps` DecodeBatch steps with `size` rows (prompts of different lengths)."""
    batch = model.new_batch()
    for i in range(size):
        row = model.batch_row(PROMPTS[i % len(PROMPTS)], max_tokens=steps + 8, temperature=0.0)
        row.reply.guard.min_tokens = 10 ** 9  # no row ends early on a loop: the batch size stays fixed
        while not row.ready:
            row.prefill_step()
        batch.add(row)
    batch.step()   # every row's prompt's last token; and warms the shapes up
    batch.step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        batch.step()   # pipelined: returns once the previous step's tokens are read
        times.append(time.perf_counter() - started)
    for row in list(batch.rows):
        batch.remove(row)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = mlxedge.load(args.model)
    reason = model.batching_unsupported()
    if reason is not None:
        sys.exit(f"error: {args.model} cannot batch: {reason}")
    sizes = [int(s) for s in args.sizes.split(",")]
    times = {b: [] for b in sizes}
    for _ in range(args.repeats):   # interleaved, so a burst of load on this machine hits every size alike
        for b in sizes:
            times[b] += step_times(model, b, args.steps)
    load = os.getloadavg()
    print(f"model {args.model}; kernels: {model.info['kernels']['backend']}; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    median = {b: statistics.median(t) for b, t in times.items()}
    least = {b: min(t) for b, t in times.items()}
    for b in sizes:
        line = f"  batch {b}: median {median[b] * 1e3:.1f} ms/step, min {least[b] * 1e3:.1f} ms"
        if 1 in sizes:
            line += (f"; cost vs batch 1 {median[b] / median[1]:.2f}x (min {least[b] / least[1]:.2f}x); "
                     f"tokens/s vs batch 1 {b * median[1] / median[b]:.2f}x (min {b * least[1] / least[b]:.2f}x)")
        print(line)

if __name__ == "__main__":
    main()
