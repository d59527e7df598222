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


# ------------------------------------------------------------------------------------------------ bench and eval

@pytest.fixture(scope="module")
def quantized_gguf(tmp_path_factory):
    """A tiny llama GGUF stored quantized (Q4_0 attention, Q5_1 MLP, Q8_0 embedding: all group 32)."""
    from gguf_tiny import TINY, tiny_model, write_gguf

    return write_gguf(tiny_model("llama"), tmp_path_factory.mktemp("quantized") / "tiny-q.gguf",
                      TINY["llama"]["types"])


@pytest.fixture
def counted_loads(monkeypatch, tmp_path):
    """Every mlxedge.load the commands make, recorded (bench and eval load through the public API)."""
    from mlxedge.bench import device

    monkeypatch.setenv("MLXEDGE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(device, "BANDWIDTH_PROBE_BYTES", 16 << 20)
    monkeypatch.setattr(device, "BANDWIDTH_REPS", 2)
    calls, real = [], mlxedge.load
    monkeypatch.setattr(mlxedge, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    return calls


def _invoke(*args):
    from mlxedge.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


BENCH_QUICK = ["--pp", "8", "--tg", "2", "-r", "1"]


@pytest.mark.parametrize("command", ["bench", "eval"])
def test_bench_and_eval_refuse_a_coarser_grid_in_one_line_before_anything_runs(command, quantized_gguf,
                                                                                counted_loads):
    # 8-bit g64 over 4-bit g32 is fine (not coarser); the 4-bit g64 after it is refused before the 8-bit one runs
    result = _invoke(command, quantized_gguf, "--bits", "8,4", "--group-size", "64")
    assert result.exit_code == 1, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "coarser grid" in line and "--allow-requantize" in line
    assert result.stdout == "" and counted_loads == []


def test_bench_with_allow_requantize_runs_and_prints_the_measured_cost(quantized_gguf, counted_loads):
    result = _invoke("bench", quantized_gguf, "--bits", "4", "--group-size", "64", "--allow-requantize",
                     *BENCH_QUICK, "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["variants"]
    assert row["label"] == "q4 g64" and row["bits"] == 4 and row["group_size"] == 64 and row["tg_tps_mean"] > 0
    cost = row["requantization_cost"]
    assert len(row["requantized_coarser"]) > 0 and cost["tokens_scored"] > 0
    assert cost["kld_mean"] > 0 and 0 <= cost["top1_agreement"] <= 1
    assert {k.get("allow_requantize") for k in counted_loads} == {True, None}  # the variant, the source as stored

    text = _invoke("bench", quantized_gguf, "--bits", "4", "--group-size", "64", "--allow-requantize", *BENCH_QUICK)
    assert text.exit_code == 0, text.output
    assert (f"q4 g64: re-quantized {len(row['requantized_coarser'])} modules onto a coarser grid; measured cost "
            f"against the source on {cost['tokens_scored']} tokens of built-in text: mean KLD") in text.stdout


def test_eval_with_allow_requantize_reports_the_cost_it_measured_or_measures_it_apart(quantized_gguf, counted_loads):
    from mlxedge.evaluate import COST_CTX

    same_text = ["--ctx", COST_CTX, "--chunks", "1", "--json"]  # the text the cost is measured on alone
    with_reference = _invoke("eval", quantized_gguf, "--bits", "4", "--group-size", "64", "--allow-requantize",
                             *same_text)
    assert with_reference.exit_code == 0, with_reference.output
    (row,) = json.loads(with_reference.stdout)["variants"]
    cost = row["requantization_cost"]
    assert cost["kld_mean"] == row["kld_mean"] > 0 and cost["top1_agreement"] == row["top1_agreement"]

    apart = _invoke("eval", quantized_gguf, "--bits", "4", "--group-size", "64", "--allow-requantize",
                    "--no-reference", *same_text)
    assert apart.exit_code == 0, apart.output
    (alone,) = json.loads(apart.stdout)["variants"]
    assert "kld_mean" not in alone  # no reference in the eval itself: the cost was measured on its own
    assert alone["requantization_cost"]["kld_mean"] == pytest.approx(cost["kld_mean"], rel=1e-5)
    assert alone["requantization_cost"]["tokens_scored"] == cost["tokens_scored"]

    text = _invoke("eval", quantized_gguf, "--bits", "4", "--group-size", "64", "--allow-requantize",
                   "--ctx", COST_CTX, "--chunks", "1")
    assert text.exit_code == 0, text.output
    assert "q4 g64: re-quantized" in text.stdout and "top-1 agreement" in text.stdout
