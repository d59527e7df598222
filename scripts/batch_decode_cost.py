"""Would batched decoding pay on this machine? Time one decode step of the default model at batch 1 and at
batch 4 (same KV length), interleaved and repeated, and print the throughput gain of batching 4 sequences.

On Apple silicon decoding is memory-bound and a batch of 4 costs little more than 1; on the Linux CPU build
of MLX the quantized matmul is a single-threaded scalar loop, compute-bound, so batching gains ~nothing.

    python scripts/batch_decode_cost.py [MODEL]
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

import mlxedge  # noqa: E402


def main(source: str = "smollm2", steps: int = 6, repeats: int = 3) -> None:
    model = mlxedge.load(source)
    module = model.module
    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)[:24]

    def step_seconds(batch: int) -> float:
        cache = make_prompt_cache(module)
        mx.eval(module(mx.array([ids] * batch), cache=cache))
        token = mx.array([[ids[-1]]] * batch)
        started = time.perf_counter()
        for _ in range(steps):
            token = mx.argmax(module(token, cache=cache)[:, -1:, :], axis=-1)
            mx.eval(token)
        return (time.perf_counter() - started) / steps

    best = {1: float("inf"), 4: float("inf")}
    for _ in range(repeats):
        for batch in best:
            best[batch] = min(best[batch], step_seconds(batch))
    print(f"decode step: batch 1 {best[1] * 1e3:.0f} ms, batch 4 {best[4] * 1e3:.0f} ms; "
          f"tokens/s gain of batching 4 sequences: {4 * best[1] / best[4]:.2f}x")


if __name__ == "__main__":
    main(*sys.argv[1:2])
