#!/usr/bin/env python
"""Decode speed of mlxedge vs mlx-lm on the same model and bits, run side by side, reported as ratios.

For each precision (bf16, 8-bit, 4-bit): mlx-lm loads its own `convert`ed copy of the checkpoint and decodes
with its stream_generate; mlxedge loads the source and quantizes while loading. Both sides use the same
compute dtype: bf16 for the 16-bit row; for the quantized rows --dtype (default: bfloat16 with Metal,
float32 without, since MLX's CPU quantized matmul is 4x slower with bf16 scales). Runs are interleaved
(ours, theirs, ours, ...) so machine load affects both alike; the same greedy prompt and token count are
used, and decode tok/s is measured the same way for both: tokens after the first / time after the first.

    python scripts/bench_decode_vs_mlx_lm.py [MODEL_DIR] [--tokens 128] [--reps 5]

MODEL_DIR defaults to an fp32 HF checkpoint of SmolLM2-135M-Instruct built from the default model's GGUF.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

import mlxedge
from mlxedge.bench.timing import MlxLmRunner, OursRunner, time_tokens

PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."


def decode_rate(runner, ids, max_tokens) -> tuple[float, int]:
    """Tokens after the first / time after the first, and the token count (mlxedge.bench's shared timing)."""
    timing = time_tokens(runner.tokens(ids, max_tokens))
    return timing["rate"], timing["tokens"]


def default_model_dir() -> Path:
    """An fp32 HF checkpoint of the default model (built once from its GGUF with transformers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlxedge.paths import cache_root
    from mlxedge.sources.registry import resolve_alias

    target = cache_root() / "bench" / "smollm2-hf-fp32"
    if not (target / "config.json").exists():
        gguf = resolve_alias("smollm2")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--bits", default="16,8,4")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16" if mx.metal.is_available() else "float32",
                        help="compute dtype of the quantized rows (scales, activations)")
    args = parser.parse_args()
    from mlx_lm import convert as mlx_lm_convert

    source = Path(args.model) if args.model else default_model_dir()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in [int(b) for b in args.bits.split(",")]:
            quantize = bits != 16
            dtype = args.dtype if quantize else "bfloat16"
            theirs_dir = Path(tmp) / f"mlx-lm-{bits}"
            mlx_lm_convert(str(source), mlx_path=str(theirs_dir), quantize=quantize, q_bits=bits if quantize else 4,
                           q_group_size=args.group_size, dtype=dtype)
            theirs = MlxLmRunner(theirs_dir)
            ours = OursRunner(mlxedge.load(source, bits=bits if quantize else None, group_size=args.group_size,
                                           dtype=dtype))
            ids = ours.model.tokenizer.encode(PROMPT)
            decode_rate(ours, ids, 8)  # warm-up both
            decode_rate(theirs, ids, 8)
            ours_rates, their_rates = [], []
            for _ in range(args.reps):  # interleaved, so machine load falls on both alike
                rate, n_ours = decode_rate(ours, ids, args.tokens)
                ours_rates.append(rate)
                rate, n_theirs = decode_rate(theirs, ids, args.tokens)
                their_rates.append(rate)
            label = "bf16" if not quantize else f"{bits}-bit g{args.group_size} ({dtype})"
            ratios = [a / b for a, b in zip(ours_rates, their_rates)]
            rows.append((label, statistics.median(ours_rates), statistics.median(their_rates),
                         statistics.median(ratios), min(ratios), n_ours, n_theirs))
            del ours, theirs
            mx.clear_cache()
    print(f"model: {source}  tokens: {args.tokens}  reps: {args.reps}  device: {mx.default_device()}")
    print("| precision | mlxedge tok/s | mlx-lm tok/s | ratio (median of paired) | min ratio | tokens ours/theirs |")
    print("|---|---|---|---|---|---|")
    for label, o, t, r, rmin, no, nt in rows:
        print(f"| {label} | {o:.1f} | {t:.1f} | {r:.3f} | {rmin:.3f} | {no}/{nt} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
