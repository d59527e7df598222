"""Put a KernelChoice's bindings into a model's layers: every matmul layer, and gate·up fusion.

`bind_kernels(model, choice)` runs once at load (and again if the Model is given another choice):
- quantized layers (QuantizedLinear, and QuantizedEmbedding when it serves as the tied head) get the
  binding for their shape;
- float nn.Linear / a tied nn.Embedding head become BoundLinear / BoundEmbedding where their binding is not
  the built-in, and go back to the plain MLX classes where it is;
- a gated-silu MLP with gate and up quantized alike becomes a FusedGatedMLP where the bound path runs a
  fused kernel, and goes back to its original module where it does not (so the built-in path computes
  exactly what mlx-lm computes);
- an attention bound by fast_layers (BoundAttention) whose q, k and v projections are quantized alike runs
  them through one native call (`KernelChoice.projections`) where that is the choice.
It returns the layer counts per kind and backend that `info["kernels"]["layers"]` reports.
"""

from __future__ import annotations

from collections import Counter

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..fast_layers import BoundAttention, bind_fast_layers
from .fused_mlp import FusedGatedMLP, fusable, known_activations, quantized_alike, same_quantization, triplet
from .layers import BoundEmbedding, BoundLinear, QuantizedEmbedding, QuantizedLinear


def _label(binding) -> str:
    if binding.backend == binding.prefill_backend:
        return binding.backend
    return f"{binding.backend} ≤{binding.decode_rows} rows, else {binding.prefill_backend}"


def _bind_float(path, module, binding, swaps, counts, kind) -> None:
    counts[kind][_label(binding)] += 1
    if binding.backend == "builtin" and binding.prefill_backend == "builtin":
        if isinstance(module, (BoundLinear, BoundEmbedding)):
            swaps.append((path, module.unbound()))
        return
    bound = module if isinstance(module, (BoundLinear, BoundEmbedding)) else (
        BoundLinear if isinstance(module, nn.Linear) else BoundEmbedding).wrap(module)
    bound.bind(binding)
    if bound is not module:
        swaps.append((path, bound))


def _bind_layers(model: nn.Module, choice, counts: dict) -> None:
    tied = "lm_head" not in model  # mlx-lm models without an lm_head use the embedding as the head
    swaps = []
    for path, m in model.named_modules():
        if isinstance(m, QuantizedLinear) or (tied and isinstance(m, QuantizedEmbedding)):
            binding = choice.quantized(*triplet(m), group_size=m.group_size, bits=m.bits)
            m.bind(binding)
            counts["quantized"][_label(binding)] += 1
        elif type(m) in (nn.Linear, BoundLinear):
            _bind_float(path, m, choice.linear(m["weight"]), swaps, counts, "linear")
        elif tied and type(m) in (nn.Embedding, BoundEmbedding):
            _bind_float(path, m, choice.linear(m["weight"]), swaps, counts, "tied_head")
    if swaps:
        model.update_modules(tree_unflatten(swaps))


def _bind_mlps(model: nn.Module, choice, counts: dict) -> None:
    known = known_activations()
    swaps = []
    for path, m in model.named_modules():
        original = m.unfused() if isinstance(m, FusedGatedMLP) else m
        if not quantized_alike(original):
            continue
        gate, up = original["gate_proj"], original["up_proj"]
        binding = None
        if choice.candidate is not None and fusable(original, known):
            binding = choice.gate_up(triplet(gate), triplet(up), group_size=gate.group_size, bits=gate.bits)
        if binding is None:
            if original is not m:
                swaps.append((path, original))
            continue
        fused = m if isinstance(m, FusedGatedMLP) else FusedGatedMLP(original)
        fused.bind(binding)
        counts["gate_up_fused"][binding.backend] += 1
        if fused is not m:
            swaps.append((path, fused))
    if swaps:
        model.update_modules(tree_unflatten(swaps))


def _bind_projections(model: nn.Module, choice, counts: dict) -> None:
    """q, k and v in one call for each BoundAttention whose three projections are quantized alike (same
    bits, group size, input width and scale dtype); the others keep one call per projection."""
    if not hasattr(choice, "projections"):
        return
    for _, m in model.named_modules():
        if not isinstance(m, BoundAttention):
            continue
        parts = [m.get(name) for name in ("q_proj", "k_proj", "v_proj")]
        if not same_quantization(parts):
            continue
        q = parts[0]
        binding = choice.projections(tuple(triplet(p) for p in parts), group_size=q.group_size, bits=q.bits)
        if binding is not None:
            m.bind_projections(binding)
            counts["qkv_fused"][binding.backend] += 1


def _attention_shape(model: nn.Module):
    """(heads, kv_heads, head_dim) of the first attention layer that states them, else None."""
    for _, m in model.named_modules():
        heads, kv_heads = getattr(m, "n_heads", None), getattr(m, "n_kv_heads", None)
        if isinstance(heads, int) and isinstance(kv_heads, int) and "o_proj" in m:
            o = m["o_proj"]
            k = o["weight"].shape[1] * (32 // o.bits if getattr(o, "bits", None) and o["weight"].dtype == mx.uint32 else 1)
            if k % heads == 0:
                return heads, kv_heads, k // heads
    return None


def _compute_dtype(model: nn.Module):
    for _, m in model.named_modules():
        if isinstance(m, nn.RMSNorm):
            return m["weight"].dtype
    return mx.float32


def bind_kernels(model: nn.Module, choice) -> dict:
    """Bind every matmul layer of `model` to `choice`'s kernels, and its norm / rope / attention layers
    to the native ones where the choice has them (fast_layers); {kind: {backend: layer count}}."""
    counts = {"quantized": Counter(), "linear": Counter(), "tied_head": Counter(), "gate_up_fused": Counter(),
              "qkv_fused": Counter()}
    _bind_layers(model, choice, counts)
    _bind_mlps(model, choice, counts)
    shape = _attention_shape(model)
    fast = None
    if shape is not None and hasattr(choice, "fast_ops"):
        fast = choice.fast_ops(heads=shape[0], kv_heads=shape[1], head_dim=shape[2], dtype=_compute_dtype(model))
    fast_report = bind_fast_layers(model, fast)
    _bind_projections(model, choice, counts)
    report = {kind: dict(c) for kind, c in counts.items() if c}
    report.update(fast_report)
    return report
