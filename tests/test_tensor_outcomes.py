"""What each tensor becomes: the memory plan asks the same function the loader streams by (quant.outcome).

The plan cannot build the architecture, so it estimates the layout (kept names, quantizable modules) from
headers; here that estimate is checked against the layout the loader reads off the real mlx-lm architecture,
for every supported architecture (checkpoints saved by transformers), tied and untied, float and stored
quantized, and the two answers are compared tensor by tensor.
"""

from __future__ import annotations

import json

import pytest

import mlxedge
from mlxedge.configs import model_classes, normalize_config
from mlxedge.errors import SourceError
from mlxedge.loading import architecture_layout
from mlxedge.quant.affine import QuantSpec
from mlxedge.quant.outcome import header_layout, tensor_outcomes
from mlxedge.sources import open_source
from mlxedge.sources.checkpoint import TensorInfo
from tiny_models import ARCHITECTURES, add_tiny_tokenizer, build_tiny


def _architecture(checkpoint):
    config = normalize_config(checkpoint.config)
    model_class, args_class = model_classes(config)
    return model_class(args_class.from_dict(config))


def _compare(checkpoint, requests):
    real = architecture_layout(_architecture(checkpoint), checkpoint)
    estimate = header_layout(checkpoint.config, checkpoint.tensor_infos, checkpoint.quantization)
    assert estimate.keep == real.keep
    assert {p: dims for p, (dims, _) in estimate.modules.items()} == {p: dims for p, (dims, _) in real.modules.items()}
    for requested in requests:
        ours = tensor_outcomes(checkpoint.tensor_infos, checkpoint.quantization, requested, estimate)
        loaders = tensor_outcomes(checkpoint.tensor_infos, checkpoint.quantization, requested, real)
        assert ours.tensors == loaders.tensors, requested
        assert ours.targets.specs == loaders.targets.specs


# mlx-lm's gemma2 always reads its head off the embedding: an untied gemma2 checkpoint does not load at all
CASES = [(arch, tied) for arch in sorted(ARCHITECTURES) for tied in (True, False) if (arch, tied) != ("gemma2", False)]


@pytest.mark.parametrize("arch,tied", CASES)
def test_the_plans_header_layout_is_the_loaders_on_float_checkpoints(arch, tied, tmp_path):
    checkpoint = open_source(str(build_tiny(arch, tmp_path / arch, tie_word_embeddings=tied)))
    infos = checkpoint.tensor_infos
    if arch == "llama":  # a buffer older checkpoints carry and every architecture's sanitize drops
        infos["model.layers.0.self_attn.rotary_emb.inv_freq"] = TensorInfo((8,), "float32", 32)
    if tied and arch not in ("gemma2", "phi3"):  # (those two refuse a stored tied head: no head module)
        # transformers 5 leaves a tied head out; other writers store a copy, which llama-family sanitizers drop
        # and gemma3's keeps as a head of its own
        assert "lm_head.weight" not in infos
        infos["lm_head.weight"] = infos["model.embed_tokens.weight"]
    _compare(checkpoint, [None, QuantSpec(4, 64), QuantSpec(8, 32)])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
def test_the_plans_header_layout_is_the_loaders_on_stored_quantized_checkpoints(arch, tmp_path):
    source = add_tiny_tokenizer(build_tiny(arch, tmp_path / "float", tie_word_embeddings=False))
    mlxedge.convert(str(source), str(tmp_path / "q4"), bits=4, group_size=32)
    checkpoint = open_source(str(tmp_path / "q4"))
    assert checkpoint.quantization
    _compare(checkpoint, [None, QuantSpec(8, 32), QuantSpec(4, 64)])  # kept, finer, coarser (refused)
    # and the plan's bytes are the loaded bytes (qwen2's q/k/v biases beside stored-quantized weights included)
    for bits in (None, 8):
        planned = mlxedge.plan(str(tmp_path / "q4"), bits=bits, group_size=32, context_length=256)["weight_bytes"]
        assert planned == mlxedge.load(str(tmp_path / "q4"), bits=bits, group_size=32).info["bytes"]


def test_a_stored_module_without_its_grid_is_refused_by_the_loader_and_sized_as_stored_by_the_plan(tmp_path):
    """4-bit g64 and 8-bit g32 pack alike: without the config's entry the loader must not guess."""
    source = add_tiny_tokenizer(build_tiny("llama", tmp_path / "float"))
    mlxedge.convert(str(source), str(tmp_path / "q4"), bits=4, group_size=64)
    with_entry = mlxedge.plan(str(tmp_path / "q4"), context_length=256)
    config_path = tmp_path / "q4" / "config.json"
    config = json.loads(config_path.read_text())
    del config["quantization"]
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config))
    assert mlxedge.plan(str(tmp_path / "q4"), context_length=256)["weight_bytes"] == with_entry["weight_bytes"]
    with pytest.raises(SourceError, match=r"stored quantized .* no bits and group size"):
        mlxedge.load(str(tmp_path / "q4"))
