"""fuse_gated_mlps: which MLPs it swaps, that the parameter tree is untouched, and that MLX's built-in path
gives bit-identical logits afterwards."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from mlxedge.quant.fused_mlp import FusedGatedMLP, fuse_gated_mlps, is_fusable


def tiny_llama(layers=3, seed=0):
    mx.random.seed(seed)
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=layers, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=256)
    return llama.Model(args)


class GeluMLP(nn.Module):
    """Gated, but with GELU: must not be fused into a silu kernel."""

    def __init__(self):
        super().__init__()
        self.gate_proj = nn.QuantizedLinear(64, 128, bias=False)
        self.up_proj = nn.QuantizedLinear(64, 128, bias=False)
        self.down_proj = nn.QuantizedLinear(128, 64, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.gelu(self.gate_proj(x)) * self.up_proj(x))


def test_fuses_every_quantized_gated_silu_mlp_and_nothing_else():
    model = tiny_llama(layers=4)
    nn.quantize(model, group_size=64, bits=4,
                class_predicate=lambda path, m: isinstance(m, nn.Linear) and "layers.1." not in path)
    # layer 2: gate and up quantized differently
    model.layers[2].mlp.up_proj = nn.QuantizedLinear(64, 128, bias=False, group_size=64, bits=8)
    assert fuse_gated_mlps(model) == 2
    kinds = [type(layer.mlp).__name__ for layer in model.layers]
    assert kinds == ["FusedGatedMLP", "MLP", "MLP", "FusedGatedMLP"]
    assert fuse_gated_mlps(model) == 0  # idempotent


def test_refuses_other_activations_and_linear_biases():
    assert not is_fusable(GeluMLP())
    mlp = llama.MLP(llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=1, intermediate_size=128,
                                    num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=256, mlp_bias=True))
    nn.quantize(mlp, group_size=64, bits=4)
    assert "bias" in mlp.gate_proj and not is_fusable(mlp)


def test_parameters_and_builtin_logits_are_unchanged(monkeypatch):
    monkeypatch.setenv("MLXEDGE_KERNELS", "builtin")
    model = tiny_llama()
    nn.quantize(model, group_size=64, bits=4)
    tokens = mx.array([[1, 5, 9, 200, 3]])
    before_params = tree_flatten(model.parameters())
    before = model(tokens)
    mx.eval(before)
    assert fuse_gated_mlps(model) == 3
    assert all(isinstance(layer.mlp, FusedGatedMLP) for layer in model.layers)
    after_params = dict(tree_flatten(model.parameters()))
    assert sorted(after_params) == sorted(k for k, _ in before_params)
    assert all(after_params[k] is v for k, v in before_params)  # the very same arrays
    assert mx.array_equal(model(tokens), before)
    assert mx.array_equal(model(tokens[:, :1]), before[:, :1])
