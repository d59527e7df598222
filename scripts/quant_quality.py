#!/usr/bin/env python
"""Quantization quality table for one model: bits × group size → bytes, bits per weight, perplexity, mean KLD,
top-1 agreement and decode tok/s, as markdown.

Perplexity and KLD follow llama-perplexity (mlxedge.evaluate: non-overlapping chunks of --ctx tokens, second
half scored) on the built-in English prose (or --text), against the model as stored (unquantized) as the
reference. Decode tok/s is mlxedge bench's tg test (n tokens from a one-token prompt, mean ± stdev over
--reps after a warm-up).

--dequantized-eval scores PPL/KLD in float32 with every quantized layer replaced by a dense one holding its
exact dequantized weights (bit-identical logits to the quantized layers computed in float32 on MLX's built-in
path): for CPUs where MLX's quantized prefill is very slow. Decode tok/s is always the quantized model's.

    python scripts/quant_quality.py [MODEL_DIR] [--variants 16,8:64,4:32,4:64,4:128] [--ctx 512] [--chunks N]
                                    [--decode-tokens 64] [--reps 3] [--dequantized-eval]
                                    [--out table.md]

MODEL_DIR defaults to an fp32 HF checkpoint of SmolLM2-135M-Instruct built from the default model's GGUF.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx

import mlxedge
from mlxedge.bench.timing import OursRunner, mean_stdev, prompt_ids, run_tg
from mlxedge.bench.variants import Variant, parse_variants
from mlxedge.evaluate import builtin_text, evaluate_text

DEFAULT_VARIANTS = "16,8:64,4:32,4:64,4:128"


def parse(spec: str, dtype: str) -> list:
    """"16,8:64,4:32" → Variants (bits:group; 16/32 = unquantized)."""
    out = []
    for item in spec.split(","):
        bits, _, group = item.strip().partition(":")
        out += parse_variants(bits, int(group or 64), dtype)
    return out


def dequantize_in_place(model) -> int:
    """Swap every quantized layer for a dense float32 one holding exactly its dequantized weights, and compute in
    float32: the model then differs from the float32 reference by its weights' rounding alone (no bf16
    activation noise, no quantized-matmul kernel). Returns how many layers were swapped."""
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    swaps = []
    for path, layer in model.module.named_modules():
        if not hasattr(layer, "scales") or not hasattr(layer, "bits"):
            continue
        w = mx.dequantize(layer["weight"], layer["scales"], layer["biases"], group_size=layer.group_size,
                          bits=layer.bits)
        if isinstance(layer, nn.QuantizedEmbedding):
            dense = nn.Embedding(*w.shape)
        else:
            dense = nn.Linear(w.shape[1], w.shape[0], bias="bias" in layer)
            if "bias" in layer:
                dense.bias = layer["bias"]
        dense.weight = w
        swaps.append((path, dense))
    model.module.update_modules(tree_unflatten(swaps))
    from mlxedge.quant.fused_mlp import FusedGatedMLP

    class DenseGatedMLP(nn.Module):
        def __init__(self, gate_proj, up_proj, down_proj):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

        def __call__(self, x):
            return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))

    mlps = [(path, DenseGatedMLP(m.gate_proj, m.up_proj, m.down_proj))
            for path, m in model.module.named_modules() if isinstance(m, FusedGatedMLP)]
    if mlps:
        model.module.update_modules(tree_unflatten(mlps))
    model.module.set_dtype(mx.float32)  # float32 compute: what is measured is the weights' rounding alone
    mx.eval(model.module.parameters())
    return len(swaps)


def decode_rate(model, n: int, reps: int) -> tuple:
    runner = OursRunner(model)
    ids = prompt_ids(model.tokenizer, 1)
    run_tg(runner, ids, min(n, 4))  # warm-up
    return mean_stdev([run_tg(runner, ids, n)["tg_tps"] for _ in range(reps)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--dtype", default=None,
                        help="compute dtype of every variant (default: bf16 for 16, the loader's default otherwise)")
    parser.add_argument("--text", default=None, help="UTF-8 text file (default: pydoc's topic texts)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=None)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("--dequantized-eval", action="store_true",
                        help="score PPL/KLD in float32 with each quantized layer swapped for a dense layer holding its exact "
                             "dequantized weights (for CPUs where MLX's quantized prefill is very slow); decode "
                             "tok/s is still measured on the quantized model")
    args = parser.parse_args()

    if args.model:
        source = Path(args.model)
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_decode_vs_mlx_lm import default_model_dir

        source = default_model_dir()
    variants: list[Variant] = parse(args.variants, args.dtype)
    text = Path(args.text).read_text(encoding="utf-8") if args.text else builtin_text()

    started = time.perf_counter()
    reference = mlxedge.load(source)  # as stored: the unquantized reference
    models = {v.label: mlxedge.load(source, **v.load_kwargs()) for v in variants}
    scored = models
    if args.dequantized_eval:
        scored = {}
        for v in variants:
            scored[v.label] = mlxedge.load(source, **v.load_kwargs())
            dequantize_in_place(scored[v.label])

    def progress(done, total):
        print(f"\r  forward passes {done}/{total}  {time.perf_counter() - started:.0f}s", end="", file=sys.stderr,
              flush=True)

    out = evaluate_text(scored, text, ctx=args.ctx, reference=reference, max_chunks=args.chunks, progress=progress)
    print(file=sys.stderr)
    ref_dtype = reference.info["dtype"]
    del reference, scored
    mx.clear_cache()

    s, ref = out["settings"], out["reference"]
    lines = [f"model: {source} · reference: as stored ({ref_dtype}), PPL {ref['perplexity']:.3f} ± "
             f"{ref['perplexity_error']:.3f}",
             f"text: {args.text or 'built-in pydoc_data.topics'}; ctx {s['ctx']}, {s['chunks']} chunks, "
             f"{ref['tokens_scored']} tokens scored; decode: tg{args.decode_tokens}, {args.reps} reps after a warm-up; "
             f"device: {mx.default_device()} (mlx {mx.__version__})"
             + ("; PPL/KLD scored in float32 on the exact dequantized weights" if args.dequantized_eval else ""),
             "",
             "| bits | group | bytes | bits/weight | PPL | mean KLD | top-1 agreement | decode tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for v in variants:
        model, r = models[v.label], out["results"][v.label]
        info = model.info
        tps, sd = decode_rate(model, args.decode_tokens, args.reps)
        bits = str(v.bits) if v.bits else "16" if v.dtype != "float32" else "32"
        group = str(v.group_size) if v.bits else "-"
        bpw = 8.0 * info["bytes"] / info["parameters"]
        lines.append(f"| {bits} ({v.label}) | {group} | {info['bytes'] / 1e6:.1f} MB | {bpw:.2f} | "
                     f"{r['perplexity']:.3f} ± {r['perplexity_error']:.3f} | "
                     f"{r['kld_mean']:.5f} ± {r['kld_mean_error']:.5f} | "
                     f"{100 * r['top1_agreement']:.2f}% ± {100 * r['top1_agreement_error']:.2f} | "
                     f"{tps:.1f} ± {sd:.1f} |")
        print(f"  decode {v.label}: {tps:.1f} tok/s", file=sys.stderr, flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
