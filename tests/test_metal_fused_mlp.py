"""Gate·up fusion at bind time: which MLPs become FusedGatedMLP (decided from behaviour, never from source
text), that the parameter tree is untouched, that MLX's built-in path gives bit-identical logits, and that a
built-in choice gives mlx-lm's own modules back."""

from __future__ import annotations

import importlib

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from emulator.runner import EmulatorRunner
from mlxedge.kernels import KernelChoice
from mlxedge.quant.binding import bind_kernels
from mlxedge.quant.fused_mlp import KNOWN_MLPS, FusedGatedMLP, fusable, gated_silu, known_activations, probe_gated_silu


def tiny_llama(layers=3, seed=0):
    mx.random.seed(seed)
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=layers, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=256)
    return llama.Model(args)


def custom():
    return KernelChoice("custom", metal_runner=EmulatorRunner(), cpu=None)


class GatedMLP(nn.Module):
    """Gated, quantized, with the activation given: not a class any table knows."""

    def __init__(self, activation):
        super().__init__()
        self.activation = activation
        self.gate_proj = nn.QuantizedLinear(64, 128, bias=False)
        self.up_proj = nn.QuantizedLinear(64, 128, bias=False)
        self.down_proj = nn.QuantizedLinear(128, 64, bias=False)

    def __call__(self, x):
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))


def test_fuses_every_quantized_gated_silu_mlp_and_nothing_else():
    model = tiny_llama(layers=4)
    nn.quantize(model, group_size=64, bits=4,
                class_predicate=lambda path, m: isinstance(m, nn.Linear) and "layers.1." not in path)
    # layer 2: gate and up quantized differently
    model.layers[2].mlp.up_proj = nn.QuantizedLinear(64, 128, bias=False, group_size=64, bits=8)
    report = bind_kernels(model, custom())
    assert report["gate_up_fused"] == {"metal": 2}
    kinds = [type(layer.mlp).__name__ for layer in model.layers]
    assert kinds == ["FusedGatedMLP", "MLP", "MLP", "FusedGatedMLP"]
    fused = model.layers[0].mlp
    assert bind_kernels(model, custom())["gate_up_fused"] == {"metal": 2}  # rebinding keeps the fused modules
    assert model.layers[0].mlp is fused


def test_a_builtin_choice_gives_the_original_modules_back():
    model = tiny_llama()
    nn.quantize(model, group_size=64, bits=4)
    originals = [layer.mlp for layer in model.layers]
    bind_kernels(model, custom())
    assert all(isinstance(layer.mlp, FusedGatedMLP) for layer in model.layers)
    report = bind_kernels(model, KernelChoice("builtin"))
    assert "gate_up_fused" not in report
    assert [layer.mlp for layer in model.layers] == originals and all(
        type(m) is llama.MLP for m in originals)


def test_refuses_other_activations_and_linear_biases():
    for activation in (nn.gelu, nn.gelu_approx, nn.relu):
        assert not fusable(GatedMLP(activation))
    mlp = llama.MLP(llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=1, intermediate_size=128,
                                    num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=256, mlp_bias=True))
    nn.quantize(mlp, group_size=64, bits=4)
    assert "bias" in mlp.gate_proj and not fusable(mlp)


def test_a_silu_mlp_no_table_knows_is_fused_by_its_behaviour():
    """However a forward is written, if it computes down(silu(gate) * up) the probe recognises it."""
    assert fusable(GatedMLP(nn.silu))
    assert fusable(GatedMLP(lambda g: g * mx.sigmoid(g)))
    model = nn.Module()
    model.mlp = GatedMLP(lambda g: g / (1 + mx.exp(-g)))
    assert bind_kernels(model, custom())["gate_up_fused"] == {"metal": 1}


@pytest.mark.parametrize("module_name, class_name, activation", KNOWN_MLPS)
def test_every_known_mlp_row_matches_its_class_behaviour(module_name, class_name, activation):
    """The table is data about mlx-lm's classes: each row must agree with what the class computes."""
    cls = getattr(importlib.import_module(module_name), class_name)
    assert known_activations()[cls] == activation
    if module_name.endswith(".llama"):
        mlp = cls(llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=1, intermediate_size=128,
                                  num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=256))
    else:
        mlp = cls(64, 128)
    nn.quantize(mlp, group_size=64, bits=4)
    assert probe_gated_silu(mlp) == (activation == "silu")
    assert gated_silu(mlp) == (activation == "silu")


def test_parameters_and_builtin_logits_are_unchanged():
    model = tiny_llama()
    nn.quantize(model, group_size=64, bits=4)
    tokens = mx.array([[1, 5, 9, 200, 3, 7, 8, 11, 12, 40]])  # 10 rows: past the fused kernel's 8
    before_params = tree_flatten(model.parameters())
    before = model(tokens)
    mx.eval(before)
    bind_kernels(model, custom())
    assert all(isinstance(layer.mlp, FusedGatedMLP) for layer in model.layers)
    after_params = dict(tree_flatten(model.parameters()))
    assert sorted(after_params) == sorted(k for k, _ in before_params)
    assert all(after_params[k] is v for k, v in before_params)  # the very same arrays
    assert mx.array_equal(model(tokens), before)  # prefill rows: gate and up as mlx-lm computes them
    bind_kernels(model, KernelChoice("builtin"))
    assert mx.array_equal(model(tokens[:, :1]), before[:, :1])
