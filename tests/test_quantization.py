"""Quantize-on-load: layers hold exactly what mx.quantize makes, logits follow, non-divisible layers stay float."""

import shutil

import mlx.core as mx
import numpy as np
import pytest

import mlxedge
from mlxedge.errors import MlxedgeError, QuantizationError
from tiny_models import add_tiny_tokenizer, build_tiny

IDS = list(range(3, 40))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("q") / "llama", hidden_size=128, intermediate_size=256)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantized_layers_equal_mx_quantize_of_source(tiny_llama, bits, group_size):
    fp = mlxedge.load(tiny_llama, dtype="float32")
    q = mlxedge.load(tiny_llama, bits=bits, group_size=group_size, dtype="float32")
    assert q.info["bits"] == bits and q.info["group_size"] == group_size
    source = fp.module.model.layers[0].mlp.up_proj.weight
    layer = q.module.model.layers[0].mlp.up_proj
    w, s, b = mx.quantize(source, group_size=group_size, bits=bits)
    assert mx.array_equal(layer.weight, w) and mx.array_equal(layer.scales, s) and mx.array_equal(layer.biases, b)
    # the layer's output is the reference matmul against mx.dequantize (the metal entry point's built-in path)
    x = mx.random.normal((3, source.shape[1]), key=mx.random.key(1))
    expected = x @ mx.dequantize(w, s, b, group_size=group_size, bits=bits).T
    assert np.allclose(np.array(layer(x)), np.array(expected), atol=1e-4)
    # and the whole model follows float: relative RMS logit error measured 0.02-0.03 at 8 bits and 0.35-0.39
    # at 4 bits on this random model (its Gaussian weights are harder to quantize than trained ones)
    ref = fp.logits(IDS)
    relative_rms = np.sqrt(((q.logits(IDS) - ref) ** 2).mean()) / ref.std()
    assert relative_rms < (0.05 if bits == 8 else 0.6)
    assert q.info["parameters"] == fp.info["parameters"]
    # bytes: every Linear and the embedding whose input the group divides shrink to bits/32 plus one fp32
    # scale and bias per group (at g128 the 64-wide o_proj stays float)
    from mlx.utils import tree_flatten
    expected = 0
    for name, v in tree_flatten(fp.module.parameters()):
        quantized = name.endswith(".weight") and v.ndim == 2 and v.shape[1] % group_size == 0
        expected += v.nbytes * bits // 32 + 2 * (v.size // group_size) * 4 if quantized else v.nbytes
    assert q.info["bytes"] == expected


def test_layers_the_group_does_not_divide_stay_float_and_are_reported(tmp_path):
    path = build_tiny("llama", tmp_path / "odd", hidden_size=64, intermediate_size=96)
    q = mlxedge.load(path, bits=4, group_size=64, dtype="float32")
    down = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert sorted(q.info["unquantized_modules"]) == down
    assert q.module.model.layers[0].mlp.down_proj.weight.dtype == mx.float32
    assert q.module.model.layers[0].mlp.up_proj.weight.dtype == mx.uint32


@pytest.mark.parametrize("bits,group_size,needle", [(3, 64, "bits=3"), (16, 48, None), (4, 48, "group_size=48"),
                                                     (2, 64, "bits=2")])
def test_invalid_settings_are_refused(tiny_llama, bits, group_size, needle):
    if needle is None:  # 16 bits means no quantization: the group size is irrelevant
        mlxedge.load(tiny_llama, bits=bits, group_size=group_size)
        return
    with pytest.raises(QuantizationError, match=needle):
        mlxedge.load(tiny_llama, bits=bits, group_size=group_size)
    assert issubclass(QuantizationError, MlxedgeError)


def test_progress_reaches_its_total_for_quantized_sources(tmp_path, tiny_llama):
    source = tmp_path / "src"
    shutil.copytree(tiny_llama, source)
    add_tiny_tokenizer(source)  # the mlx-lm format carries a tokenizer
    mlxedge.convert(source, tmp_path / "q4", bits=4, group_size=64)
    seen = []
    mlxedge.load(tmp_path / "q4", progress=lambda done, total: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] == len(seen)  # one step per stored tensor, triplet parts included


def test_convert_keeps_the_checkpoint_dtype_whatever_the_machine(tmp_path, tiny_llama):
    import json

    import torch
    import transformers as T
    from safetensors import safe_open

    source = tmp_path / "bf16"  # a bfloat16 copy of the float32 tiny model
    T.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(source)
    add_tiny_tokenizer(source)
    mlxedge.convert(source, tmp_path / "q4", bits=4, group_size=64)
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "q4" / "model.safetensors"), "np") as f:
        assert f.get_slice("model.layers.0.mlp.up_proj.scales").get_dtype() == "BF16"
