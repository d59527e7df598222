"""The memory plan: bytes a model will take at given settings, from its config and tensor headers alone.

Pure arithmetic; no weight is read and no model is built:
- weights: what each tensor becomes is asked of quant.outcome (`tensor_outcomes`, the function the loader
  streams by), here with the layout estimated from headers; bytes follow MLX's affine layout, byte-exact;
- KV cache at the context length (mlx-lm's allocation step, sliding-window layers, a quantized cache);
- activation workspace of one prefill chunk at the end of the context;
- runtime overhead: the measured resident baseline of the runtime.
`make_plan` sums them against a budget (memory.budget) into a `MemoryPlan`; memory.fit decides what to do
when it does not fit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Optional

from ..configs import text_config
from ..errors import MlxedgeError
from ..quant.affine import QuantSpec
from ..quant.outcome import Layout, header_layout, tensor_outcomes
from .budget import Budget
from .units import format_bytes, parse_size

# Runtime overhead: the resident memory of the `mlxedge` program once it has imported MLX, an mlx-lm
# architecture and transformers and built a tokenizer, before any weight. The program keeps torch out
# (cli/startup.py), so torch being installed changes nothing here, and neither does it change the plan.
# Measured on this machine (Linux x86-64, Python 3.11, mlx 0.32.4 CPU, mlx-lm 0.32, transformers 5) as VmHWM
# after `import mlx.core`, `import_architecture("llama")` and the tokenizer of SmolLM2-135M, torch blocked:
# 140.5 MB from the Hugging Face directory, 144.4-145.4 MB from the GGUF (three runs each). Rounded up to
# the next 5 MB.
RUNTIME_BASE_BYTES = 150_000_000

DEFAULT_PREFILL_CHUNK = 512
KV_STEP = 256  # mlx-lm's KVCache grows in steps of 256 tokens
DEFAULT_CONTEXT = 4096


def runtime_overhead_bytes() -> int:
    """The measured baseline of the runtime (see RUNTIME_BASE_BYTES); the same whether or not torch is installed."""
    return RUNTIME_BASE_BYTES


def default_context_length(config: dict) -> int:
    """The context planned when none is asked for: the model's maximum, capped at DEFAULT_CONTEXT."""
    cfg = text_config(config)
    return int(min(cfg.get("max_position_embeddings") or DEFAULT_CONTEXT, DEFAULT_CONTEXT))


@dataclass
class MemoryPlan:
    """Predicted bytes of a model at given settings, against a budget. `to_dict()` gives plain types."""

    weight_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    overhead_bytes: int
    total_bytes: int
    budget_bytes: int
    budget_source: str
    fits: bool
    breakdown: dict
    settings: dict
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        s = self.settings
        bits = f"{s['bits']}-bit" if s["bits"] is not None else ("as stored" if s.get("stored_quantized") else "float")
        return (f"{bits}, context {s['context_length']}: {format_bytes(self.total_bytes)} "
                f"(weights {format_bytes(self.weight_bytes)}, KV cache {format_bytes(self.kv_cache_bytes)}, "
                f"activations {format_bytes(self.activation_bytes)}, runtime {format_bytes(self.overhead_bytes)})")


def _numel(shape) -> int:
    return math.prod(int(d) for d in shape)


def quantized_bytes(shape, bits: int, group_size: int, scale_bytes: int) -> int:
    """Bytes of one tensor in MLX's affine layout: packed uint32 words + a scale and a bias per group.

    MLX packs along the last (input) dimension: rows × (in·bits/32) uint32 words; scales and biases are
    rows × (in/group) in the compute dtype. 4-bit, group 64, fp16 → 4.5 bits per weight.
    """
    rows, cols = _numel(shape[:-1]), int(shape[-1])
    if cols % group_size:
        raise MlxedgeError(f"input dimension {cols} is not divisible by group size {group_size}.")
    return rows * (cols * bits // 32) * 4 + 2 * rows * (cols // group_size) * scale_bytes


def weight_plan(config: dict, tensor_infos: Mapping, *, bits: Optional[int], group_size: int, dtype_bytes: int,
                quantized: Optional[dict] = None, keep: Optional[set] = None) -> dict:
    """Bytes of every weight once loaded: what `quant.outcome.tensor_outcomes` says each tensor becomes.

    bits=None keeps the checkpoint's precision, bits=b asks for b-bit at group_size; the layout is the header
    estimate (`header_layout`), narrowed to `keep` (the names the architecture's sanitize keeps) when the
    caller knows them. A stored-quantized module is counted at its weight (its scales and biases with it);
    float tensors at dtype_bytes, other tensors as stored. A module the policy would refuse to put on a
    coarser grid is counted at the asked grid (the loader refuses it; the plan sizes the request).
    Returns totals and counts: {"bytes", "quantized_bytes", "float_bytes", "quantized_tensors",
    "float_tensors", "parameters", "stored_quantized"}.
    """
    layout = header_layout(config, tensor_infos, quantized)
    if keep is not None:
        layout = Layout(layout.keep & frozenset(keep), layout.modules)
    requested = QuantSpec(int(bits), int(group_size)) if bits is not None else None
    outcomes = tensor_outcomes(tensor_infos, quantized, requested, layout)
    out = {"bytes": 0, "quantized_bytes": 0, "float_bytes": 0, "quantized_tensors": 0, "float_tensors": 0,
           "parameters": 0, "stored_quantized": any(name.endswith(".scales") for name in tensor_infos)}
    for name, outcome in outcomes.tensors.items():
        if outcome.kind == "stored" and not name.endswith(".weight"):
            continue  # scales and biases are counted with their weight
        out["parameters"] += _numel(outcome.shape)
        if outcome.spec is not None:
            nbytes = quantized_bytes(outcome.shape, outcome.spec.bits, outcome.spec.group_size, dtype_bytes)
            out["quantized_bytes"] += nbytes
            out["quantized_tensors"] += 1
        else:
            nbytes = _numel(outcome.shape) * dtype_bytes if outcome.floating else int(tensor_infos[name].nbytes)
            out["float_bytes"] += nbytes
            out["float_tensors"] += 1
        out["bytes"] += nbytes
    return out


def kv_cache_plan(config: dict, context_length: int, dtype_bytes: int,
                  prefill_chunk: int = DEFAULT_PREFILL_CHUNK, kv_bits: Optional[int] = None) -> dict:
    """Peak KV cache bytes at `context_length`: 2 (K and V) × kv_heads × head_dim × tokens × dtype_bytes per layer.

    Tokens per layer: the context rounded up to mlx-lm's 256-token allocation step. A layer that attends to a
    sliding window keeps the window, but mlx-lm's RotatingKVCache holds window − 1 + chunk tokens while a
    prefill chunk goes through (measured), so that is its peak. Sliding layers are read from `layer_types` ("sliding_attention")
    or, failing that, gemma3's `sliding_window_pattern` (every pattern-th layer is global). Anything else is
    taken as full attention on every layer: an upper bound (e.g. gemma2 configs without `layer_types`, for
    which mlx-lm allocates full caches anyway).
    kv_bits (4 or 8): full layers hold mlx-lm's QuantizedKVCache — packed values plus a scale and a bias (compute
    dtype) per group of 64 (32 when head_dim is not a multiple of 64) — while sliding layers stay float.
    """
    cfg = text_config(config)
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    full_tokens = -(-int(context_length) // KV_STEP) * KV_STEP
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    pattern = cfg.get("sliding_window_pattern")
    sliding = 0  # counted, not listed per layer: the arithmetic stays instant for any layer count
    if window:
        if isinstance(layer_types, list) and len(layer_types) == layers:
            sliding = sum(t == "sliding_attention" for t in layer_types)
        elif isinstance(pattern, int) and pattern > 0:
            sliding = layers - layers // pattern
    per_token = 2 * kv_heads * head_dim * dtype_bytes
    full_per_token = per_token
    if kv_bits:
        group = 64 if head_dim % 64 == 0 else 32
        full_per_token = 2 * kv_heads * (head_dim * int(kv_bits) // 8 + 2 * (head_dim // group) * dtype_bytes)
    chunk = min(int(prefill_chunk), int(context_length))
    sliding_tokens = min(full_tokens, int(window) - 1 + chunk) if sliding else 0
    total = sliding * sliding_tokens * per_token + (layers - sliding) * full_tokens * full_per_token
    return {"bytes": total, "layers": layers, "sliding_layers": sliding, "kv_bits": kv_bits,
            "kv_heads": kv_heads, "head_dim": head_dim, "tokens_per_full_layer": full_tokens,
            "bytes_per_token_per_layer": per_token}


def activation_plan(config: dict, context_length: int, dtype_bytes: int,
                    prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> dict:
    """Transient bytes of one prefill chunk at the end of the context.

    residual stream (input, normed input, output of a layer) + the larger of the attention transient
    (q, k, v, output and the fp32 scores of the chunk against the whole context) and the MLP transient
    (gate, up and their product) + the fp32 logits of the chunk (vocab × chunk × 4).
    """
    cfg = text_config(config)
    chunk = min(int(prefill_chunk), int(context_length))
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    inter = int(cfg.get("intermediate_size") or 4 * hidden)
    vocab = int(cfg["vocab_size"])
    residual = 3 * chunk * hidden * dtype_bytes
    scores = heads * chunk * int(context_length) * 4
    attention = chunk * (2 * heads + 2 * kv_heads) * head_dim * dtype_bytes + scores
    mlp = 3 * chunk * inter * dtype_bytes
    logits = vocab * chunk * 4
    return {"bytes": residual + max(attention, mlp) + logits, "chunk": chunk, "residual": residual,
            "attention_scores": scores, "attention": attention, "mlp": mlp, "logits": logits}


def make_plan(config: dict, tensor_infos: Mapping, *, bits: Optional[int], group_size: int, dtype_bytes: int,
              context_length: int, budget, quantized: Optional[dict] = None, keep: Optional[set] = None,
              prefill_chunk: int = DEFAULT_PREFILL_CHUNK, overhead_bytes: Optional[int] = None,
              kv_bits: Optional[int] = None) -> MemoryPlan:
    """The memory plan of a checkpoint (config + tensor headers) at the given settings; reads no weight.

    bits:           None keeps the checkpoint's precision; 4 or 8 quantizes (see `weight_plan`).
    dtype_bytes:    bytes per element of the compute dtype (unquantized tensors, scales/biases, KV cache).
    budget:         a Budget, or bytes / a size string.
    quantized:      the checkpoint's mlx-lm quantization dict, for checkpoints stored quantized.
    keep:           names the architecture keeps (the loader knows them after sanitize), optional.
    overhead_bytes: runtime baseline; default `runtime_overhead_bytes()`.
    kv_bits:        4 or 8 for a quantized KV cache (see `kv_cache_plan`).
    """
    if not isinstance(budget, Budget):
        budget = Budget(parse_size(budget), "override")
    weights = weight_plan(config, tensor_infos, bits=bits, group_size=group_size, dtype_bytes=dtype_bytes,
                          quantized=quantized, keep=keep)
    kv = kv_cache_plan(config, context_length, dtype_bytes, prefill_chunk, kv_bits=kv_bits)
    act = activation_plan(config, context_length, dtype_bytes, prefill_chunk)
    overhead = runtime_overhead_bytes() if overhead_bytes is None else int(overhead_bytes)
    total = weights["bytes"] + kv["bytes"] + act["bytes"] + overhead
    settings = {"bits": bits, "group_size": group_size, "dtype_bytes": dtype_bytes,
                "context_length": int(context_length), "prefill_chunk": int(prefill_chunk),
                "stored_quantized": weights["stored_quantized"]}
    if kv_bits:
        settings["kv_bits"] = kv_bits
    return MemoryPlan(weight_bytes=weights["bytes"], kv_cache_bytes=kv["bytes"], activation_bytes=act["bytes"],
                      overhead_bytes=overhead, total_bytes=total, budget_bytes=budget.bytes,
                      budget_source=budget.source, fits=total <= budget.bytes,
                      breakdown={"weights": weights, "kv_cache": kv, "activations": act}, settings=settings)
