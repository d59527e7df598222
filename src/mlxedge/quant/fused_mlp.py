"""Route llama-style gated MLPs through mlxedge.metal.gated_mlp (one fused gate·up kernel where it pays).

`fuse_gated_mlps(model)` finds every MLP module whose forward is exactly
``down_proj(silu(gate_proj(x)) * up_proj(x))`` (mlx-lm writes it with `swiglu`) and whose gate and up
projections are quantized alike (same bits and group size, no linear bias), and swaps it for
`FusedGatedMLP`, which holds the same three children under the same names — the parameter tree, and so
weight loading and saving, are unchanged. On MLX's built-in path the output is bit-identical.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..metal import gated_mlp

# The forward expressions (x: the forward's input) that compute down(silu(gate(x)) * up(x)).
_GATED_SILU_FORWARDS = (
    "self.down_proj(swiglu(self.gate_proj({x}), self.up_proj({x})))",
    "self.down_proj(nn.silu(self.gate_proj({x})) * self.up_proj({x}))",
)


def _quantized(layer) -> bool:
    try:
        return (isinstance(layer, nn.Module) and "weight" in layer and "scales" in layer
                and layer.get("biases") is not None and layer["weight"].dtype == mx.uint32
                and "bias" not in layer and getattr(layer, "mode", "affine") == "affine"
                and isinstance(getattr(layer, "bits", None), int)
                and isinstance(getattr(layer, "group_size", None), int))
    except (AttributeError, TypeError):
        return False


def _forward_is_gated_silu(module) -> bool:
    """Read the class's __call__: a single `return <one of _GATED_SILU_FORWARDS>` (a docstring allowed)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(module).__call__)))
    except (OSError, TypeError, SyntaxError):
        return False
    fn = tree.body[0]
    if not isinstance(fn, ast.FunctionDef) or len(fn.args.args) != 2:
        return False
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if len(body) != 1 or not isinstance(body[0], ast.Return) or body[0].value is None:
        return False
    expression = ast.unparse(body[0].value)
    x = fn.args.args[1].arg
    return any(expression == form.format(x=x) for form in _GATED_SILU_FORWARDS)


def is_fusable(module) -> bool:
    """A gated-silu MLP whose gate and up projections are quantized with the same settings."""
    if isinstance(module, FusedGatedMLP) or not isinstance(module, nn.Module):
        return False
    gate, up = module.get("gate_proj"), module.get("up_proj")
    if not (_quantized(gate) and _quantized(up) and "down_proj" in module):
        return False
    if (gate.bits, gate.group_size) != (up.bits, up.group_size) or gate["weight"].shape != up["weight"].shape:
        return False
    return _forward_is_gated_silu(module)


class FusedGatedMLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)) with gate and up through `mlxedge.metal.gated_mlp`."""

    def __init__(self, gate_proj, up_proj, down_proj):
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj

    def __call__(self, x: mx.array) -> mx.array:
        g, u = self.gate_proj, self.up_proj
        h = gated_mlp(x, (g["weight"], g["scales"], g["biases"]), (u["weight"], u["scales"], u["biases"]),
                      group_size=g.group_size, bits=g.bits)
        return self.down_proj(h)


def fuse_gated_mlps(model: nn.Module) -> int:
    """Swap every fusable MLP in `model` for a FusedGatedMLP; returns how many were swapped."""
    swaps = [(path, FusedGatedMLP(m["gate_proj"], m["up_proj"], m["down_proj"]))
             for path, m in model.named_modules() if path and is_fusable(m)]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)
