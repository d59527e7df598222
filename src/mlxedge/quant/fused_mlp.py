"""Which MLPs compute down(silu(gate(x)) * up(x)), and `FusedGatedMLP`, which runs gate·up in one kernel.

`gated_silu(module)` decides from behaviour, never from source text: mlx-lm's MLP classes are listed in
`KNOWN_MLPS` with their activation (a test checks every row against the class's real forward), and any
other module with gate/up/down projections is probed: its forward on a random input must equal
down(silu(gate(x)) * up(x)) computed from its own children. `fusable(module)` adds that gate and up are
quantized alike (same bits, group and shapes, affine, no linear bias). quant/binding.py swaps a fusable
MLP for a `FusedGatedMLP` only where the bound path runs a fused kernel; it holds the same three children
under the same names, so the parameter tree (and loading, saving) is unchanged, and `unfused()` gives
the original module back.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..architectures import classes_by_name
from ..metal.dispatch import swiglu

# mlx-lm MLP classes with gate_proj/up_proj/down_proj -> the activation of their gate (module, class, act).
# Only "silu" rows are fused. phi3 keeps gate and up in one gate_up_proj weight: no separate gate to fuse.
KNOWN_MLPS = (
    ("mlx_lm.models.llama", "MLP", "silu"),      # also mistral and smollm3 (they reuse llama's MLP)
    ("mlx_lm.models.qwen2", "MLP", "silu"),
    ("mlx_lm.models.qwen3", "MLP", "silu"),
    ("mlx_lm.models.gemma", "MLP", "gelu"),
    ("mlx_lm.models.gemma2", "MLP", "gelu_approx"),
    ("mlx_lm.models.gemma3_text", "MLP", "gelu_approx"),
)
PROBE_RTOL = {mx.float32: 1e-4}  # of max |output|; half precision: HALF_RTOL (silu vs gelu differ by ~10%)
HALF_RTOL = 2e-2


def known_activations() -> dict:
    """{class: activation} for the KNOWN_MLPS rows whose module imports in this mlx-lm."""
    return classes_by_name(KNOWN_MLPS)


def quantized_affine(layer) -> bool:
    """An affine-quantized layer without a linear bias, with integer bits and group size."""
    try:
        return (isinstance(layer, nn.Module) and "weight" in layer and "scales" in layer
                and layer.get("biases") is not None and layer["weight"].dtype == mx.uint32
                and "bias" not in layer and getattr(layer, "mode", "affine") == "affine"
                and isinstance(getattr(layer, "bits", None), int)
                and isinstance(getattr(layer, "group_size", None), int))
    except (AttributeError, TypeError):
        return False


def triplet(layer) -> tuple:
    return layer["weight"], layer["scales"], layer["biases"]


def same_quantization(layers) -> bool:
    """Every layer affine-quantized (quantized_affine) with the same bits, group size, input width and
    scale dtype: what one kernel call over all of them needs (gate and up; q, k and v)."""
    if not all(quantized_affine(layer) for layer in layers):
        return False
    settings = {(layer.bits, layer.group_size, layer["weight"].shape[1], layer["scales"].dtype) for layer in layers}
    return len(settings) == 1


def quantized_alike(module) -> bool:
    """gate_proj and up_proj quantized with the same settings and shapes, and a down_proj to follow."""
    if not isinstance(module, nn.Module) or isinstance(module, FusedGatedMLP):
        return False
    gate, up = module.get("gate_proj"), module.get("up_proj")
    return (same_quantization((gate, up)) and isinstance(module.get("down_proj"), nn.Module)
            and gate["weight"].shape == up["weight"].shape)


def probe_gated_silu(module) -> bool:
    """Numerically: module(x) == down(silu(gate(x)) * up(x)) on a random x, with the module's own weights."""
    gate, up, down = module["gate_proj"], module["up_proj"], module["down_proj"]
    k = gate["scales"].shape[1] * gate.group_size
    x = mx.random.normal((1, k), key=mx.random.key(7)).astype(gate["scales"].dtype)
    try:
        got = module(x).astype(mx.float32)
        want = down(nn.silu(gate(x)) * up(x)).astype(mx.float32)
        scale = float(mx.max(mx.abs(want)).item()) or 1.0
        rtol = PROBE_RTOL.get(x.dtype, HALF_RTOL)
        return got.shape == want.shape and float(mx.max(mx.abs(got - want)).item()) <= rtol * scale
    except Exception:  # a forward that needs more than one input, or other shapes: not an MLP we know
        return False


def gated_silu(module, known: dict | None = None) -> bool:
    """Whether the module computes down(silu(gate(x)) * up(x)): from KNOWN_MLPS, else by a numeric probe."""
    known = known_activations() if known is None else known
    activation = known.get(type(module))
    if activation is not None:
        return activation == "silu"
    return probe_gated_silu(module)


def fusable(module, known: dict | None = None) -> bool:
    """A gated-silu MLP whose gate and up projections are quantized alike."""
    return quantized_alike(module) and gated_silu(module, known)


class FusedGatedMLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)) with gate·up through one bound fused kernel.

    Up to `_fused_size` input elements (the binding's decode rows × K) run the fused kernel; beyond, the
    gate and up projections run through their own bindings and silu(g) * u as mlx-lm computes it.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.gate_proj = original["gate_proj"]
        self.up_proj = original["up_proj"]
        self.down_proj = original["down_proj"]
        self.__dict__["_original"] = original  # an attribute, outside the module tree
        self._fused, self._fused_size, self._backend = None, 0, "builtin"
        self.train(original.training)

    def bind(self, binding) -> None:
        self._fused, self._backend = binding.decode, binding.backend
        self._fused_size = binding.decode_rows * self["gate_proj"]["scales"].shape[1] * self.gate_proj.group_size

    def unfused(self) -> nn.Module:
        """The original MLP, holding this module's current children."""
        original = self._original
        for name in ("gate_proj", "up_proj", "down_proj"):
            original[name] = self[name]
        return original

    def __call__(self, x: mx.array) -> mx.array:
        if x.size <= self._fused_size:
            h = self._fused(x, triplet(self.gate_proj), triplet(self.up_proj))
        else:
            h = swiglu(self.gate_proj(x), self.up_proj(x))
        return self.down_proj(h)
