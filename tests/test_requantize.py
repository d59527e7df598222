"""No silent quality loss: quantized sources keep their precision by default; coarser grids are refused or measured."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import mlxedge
from mlxedge.errors import QuantizationError
from mlxedge.quant.affine import QuantSpec
from mlxedge.quant.requantize import choose_targets, default_group_size, is_coarser

Q4G32, Q8G32 = QuantSpec(4, 32), QuantSpec(8, 32)
MODULES = {"model.embed_tokens": (576, True), "model.layers.0.self_attn.q_proj": (576, False),
           "model.layers.0.mlp.down_proj": (1536, False), "lm_head": (576, False)}
STORED = {"model.embed_tokens": Q8G32, "model.layers.0.self_attn.q_proj": Q4G32,
          "model.layers.0.mlp.down_proj": Q4G32}  # lm_head float (e.g. untied)


def test_coarser_means_fewer_bits_or_a_larger_group_at_no_more_bits():
    assert is_coarser(QuantSpec(4, 64), Q4G32) and is_coarser(QuantSpec(4, 32), Q8G32)
    assert not is_coarser(Q4G32, Q4G32) and not is_coarser(Q8G32, Q4G32)
    assert not is_coarser(QuantSpec(8, 64), Q4G32)  # 8-bit steps are 1/17 of the 4-bit ones
    assert is_coarser(QuantSpec(8, 64), Q8G32)


def test_nothing_requested_keeps_everything_as_stored():
    assert choose_targets(MODULES, STORED, None).specs == STORED


def test_a_coarser_grid_is_refused_in_one_line_naming_the_ways_on():
    with pytest.raises(QuantizationError) as e:
        choose_targets(MODULES, STORED, QuantSpec(4, 64))
    message = str(e.value)
    assert "\n" not in message and "4-bit group 32" in message and "--allow-requantize" in message
    assert "--group-size 32" in message


def test_embeddings_keep_their_bits_while_the_rest_takes_the_same_grid():
    out = choose_targets(MODULES, STORED, Q4G32)
    assert out.specs["model.embed_tokens"] == Q8G32 and out.kept_stored == ["model.embed_tokens"]
    assert out.specs["model.layers.0.self_attn.q_proj"] == Q4G32
    assert out.specs["lm_head"] == Q4G32  # float in the source: quantized as asked


def test_allow_requantize_does_it_and_lists_what_it_made_coarser():
    out = choose_targets(MODULES, STORED, QuantSpec(4, 64), allow_requantize=True)
    assert set(out.requantized_coarser) == set(STORED)
    assert all(spec == QuantSpec(4, 64) for spec in out.specs.values())


def test_group_size_defaults_to_the_sources():
    assert default_group_size(None, {"bits": 4, "group_size": 32}) == 32
    assert default_group_size(None, None) == 64 and default_group_size(128, {"group_size": 32}) == 128


# ------------------------------------------------------------------------------------------------ the real model

@pytest.mark.slow
def test_default_convert_of_the_default_model_keeps_its_greedy_output(smollm2_gguf, tmp_path):
    """The issue's report: `convert smollm2 ./out` with defaults gave gibberish. Now it keeps the stored grid."""
    summary = mlxedge.convert(smollm2_gguf, tmp_path / "out")
    assert summary["bits"] == 4 and summary["group_size"] == 32 and not summary["requantized_coarser"]
    assert oct((tmp_path / "out").stat().st_mode & 0o777) != oct(0o700)  # an ordinary directory, not private
    prompt = "Write one sentence about the sea."
    source = mlxedge.load(smollm2_gguf, dtype="float32").generate(prompt, max_tokens=32)
    converted = mlxedge.load(tmp_path / "out", dtype="float32").generate(prompt, max_tokens=32)
    assert len(source.tokens) >= 16
    assert converted.tokens == source.tokens


@pytest.mark.slow
def test_a_coarser_convert_is_refused_and_with_the_flag_prints_its_measured_cost(smollm2_gguf, tmp_path):
    from mlxedge.cli import main

    refused = CliRunner().invoke(main, ["convert", str(smollm2_gguf), str(tmp_path / "g64"), "--bits", "4",
                                        "--group-size", "64"])
    assert refused.exit_code == 1 and "coarser grid" in refused.output and not (tmp_path / "g64").exists()

    done = CliRunner().invoke(main, ["convert", str(smollm2_gguf), str(tmp_path / "g64"), "--bits", "4",
                                     "--group-size", "64", "--allow-requantize", "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    cost = summary["requantization_cost"]
    assert summary["requantized_coarser"] and cost["tokens_scored"] > 100
    # the gibberish case is measurably worse than the source (KLD 0.37 / top-1 73% at ctx 256 before)
    assert cost["kld_mean"] > 0.05 and cost["top1_agreement"] < 0.95
    print(f"4-bit g64 over Q4_1 g32: mean KLD {cost['kld_mean']:.4f}, top-1 {100 * cost['top1_agreement']:.1f}%")
