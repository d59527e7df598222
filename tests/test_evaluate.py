"""mlxedge.evaluate and `mlxedge eval`: perplexity against transformers' logits, KLD against hand-computed values
and against itself (zero), llama-perplexity's chunking and error bars, the driver `run`, and the JSON schema of
`eval --json`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mlxedge.errors import MlxedgeError
from mlxedge.evaluate import (DivergenceStats, PerplexityStats, compare_rows, evaluate_chunks, evaluate_text,
                              make_chunks, run, token_nll)


# ------------------------------------------------------------------------------------------------ pure numerics

def test_perplexity_stats_error_bar_by_hand():
    stats = PerplexityStats()
    stats.add(np.array([1.0, 2.0]))
    stats.add(np.array([3.0]))
    r = stats.result()
    # mean NLL 2, mean NLL² 14/3, variance 2/3; llama-perplexity's error: PPL·sqrt(var/(N-1))
    assert r["perplexity"] == pytest.approx(math.exp(2.0), rel=1e-12)
    assert r["perplexity_error"] == pytest.approx(math.exp(2.0) * math.sqrt((2 / 3) / 2), rel=1e-12)
    assert r["tokens_scored"] == 3


def test_token_nll_by_hand():
    logits = np.array([[0.0, math.log(3.0)], [1.0, 1.0]], dtype=np.float32)
    nll = token_nll(logits, [1, 0])
    assert nll == pytest.approx([-math.log(0.75), -math.log(0.5)], rel=1e-6)


def test_kld_against_hand_computed_values():
    ref = np.array([[0.0, 0.0], [2.0, 0.0]], dtype=np.float32)          # p = (.5, .5), (e²/(1+e²), ...)
    model = np.array([[0.0, math.log(3.0)], [2.0, 0.0]], dtype=np.float32)  # q = (.25, .75), same as ref
    rows = compare_rows(ref, model, [1, 0])
    kld0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # = 0.5·ln(4/3)
    assert rows["kld"] == pytest.approx([kld0, 0.0], abs=1e-7)
    assert rows["same_top"].tolist() == [False, True]  # ref's tie resolves to token 0, model picks 1
    assert rows["delta_p"] == pytest.approx([0.75 - 0.5, 0.0], abs=1e-7)

    stats = DivergenceStats()
    stats.add(rows)
    r = stats.result()
    assert r["kld_mean"] == pytest.approx(kld0 / 2, rel=1e-6)
    assert r["kld_median"] == pytest.approx(kld0 / 2, rel=1e-6)
    assert r["kld_max"] == pytest.approx(kld0, rel=1e-6)
    assert r["top1_agreement"] == 0.5
    assert r["rms_delta_p"] == pytest.approx(math.sqrt(0.25 ** 2 / 2), rel=1e-6)
    assert r["kld_mean_error"] == pytest.approx(np.std([kld0, 0.0], ddof=1) / math.sqrt(2), rel=1e-6)


def test_kld_matches_scipy_style_formula_on_random_logits():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(70, 33)).astype(np.float32) * 3  # 70 rows: crosses the 64-row block boundary
    model = ref + rng.normal(size=ref.shape).astype(np.float32) * 0.3
    targets = rng.integers(0, 33, size=70)
    rows = compare_rows(ref, model, targets)
    p = np.exp(ref.astype(np.float64)); p /= p.sum(1, keepdims=True)
    q = np.exp(model.astype(np.float64)); q /= q.sum(1, keepdims=True)
    expected = (p * np.log(p / q)).sum(1)
    np.testing.assert_allclose(rows["kld"], expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(rows["delta_p"], q[np.arange(70), targets] - p[np.arange(70), targets], atol=1e-12)
    assert rows["same_top"].tolist() == (p.argmax(1) == q.argmax(1)).tolist()


def test_chunks_follow_llama_perplexity():
    tokens = list(range(100, 205))  # 105 tokens, ctx 10: 10 chunks, the 5-token tail dropped
    chunks = make_chunks(tokens, 10)
    assert len(chunks) == 10 and chunks[3] == list(range(130, 140))
    with_bos = make_chunks(tokens, 10, bos_id=1, max_chunks=4)
    assert len(with_bos) == 4 and all(c[0] == 1 for c in with_bos) and with_bos[1][1:] == list(range(111, 120))
    with pytest.raises(MlxedgeError, match="at least 40"):
        make_chunks(tokens[:39], 20)


# ------------------------------------------------------------------------------------------------ models

def _independent_perplexity(directory: Path, text: str, ctx: int, max_chunks: int) -> tuple:
    """llama-perplexity's recipe written out with transformers + torch (fp32 logits, float64 softmax)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    ids = tok(text, add_special_tokens=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    nlls = []
    for i in range(min(len(ids) // ctx, max_chunks)):
        chunk = ids[i * ctx:(i + 1) * ctx]
        if tok.bos_token_id is not None and ids[0] == tok.bos_token_id:
            chunk = [tok.bos_token_id] + chunk[1:]
        with torch.no_grad():
            logits = model(torch.tensor([chunk])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        for j in range(ctx // 2, ctx - 1):
            nlls.append(-float(logp[j, chunk[j + 1]]))
    nll = np.array(nlls)
    ppl = math.exp(nll.mean())
    return ppl, ppl * math.sqrt(((nll ** 2).mean() - nll.mean() ** 2) / (len(nll) - 1)), len(nll)


def test_perplexity_matches_transformers(tiny_llama_tok, prose):
    import mlxedge

    model = mlxedge.load(tiny_llama_tok)  # fp32, as stored
    out = evaluate_text({"m": model}, prose, ctx=32, max_chunks=4)
    r = out["results"]["m"]
    ppl, err, n = _independent_perplexity(tiny_llama_tok, prose, ctx=32, max_chunks=4)
    assert r["tokens_scored"] == n == 4 * 15
    assert r["perplexity"] == pytest.approx(ppl, rel=1e-3)
    assert r["perplexity_error"] == pytest.approx(err, rel=1e-3)
    assert out["settings"]["chunks"] == 4 and out["settings"]["scored_per_chunk"] == 15


def test_kld_of_a_model_against_itself_is_zero(tiny_llama_tok, prose):
    import mlxedge

    tokens = mlxedge.load(tiny_llama_tok).tokenizer.encode(prose)
    chunks = make_chunks(tokens, 16, max_chunks=3)
    reference, same = mlxedge.load(tiny_llama_tok), mlxedge.load(tiny_llama_tok)  # two independent loads
    quantized = mlxedge.load(tiny_llama_tok, bits=4, group_size=32)
    out = evaluate_chunks({"same": same, "q4": quantized}, chunks, reference=reference)
    r = out["same"]
    assert r["kld_mean"] == 0.0 and r["kld_max"] == 0.0 and r["kld_p99"] == 0.0
    assert r["top1_agreement"] == 1.0 and r["rms_delta_p"] == 0.0
    assert r["perplexity"] == out["_reference"]["perplexity"]
    assert out["q4"]["kld_mean"] > 0.0 and out["q4"]["tokens_compared"] == 3 * 7  # and the comparison is live


def test_eval_json_schema(tiny_llama_tok, prose, tmp_path):
    from click.testing import CliRunner

    from mlxedge.cli.evaluation import eval_command

    text = tmp_path / "text.txt"
    text.write_text(prose, encoding="utf-8")
    result = CliRunner().invoke(eval_command, [str(tiny_llama_tok), "--bits", "16,4", "--group-size", "32",
                                               "--text", str(text), "--ctx", "16", "--chunks", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"model", "text", "settings", "reference", "variants"}
    assert data["settings"]["ctx"] == 16 and data["settings"]["chunks"] == 2
    assert {"text_tokens", "scored_per_chunk", "bos_per_chunk"} <= set(data["settings"])
    ref = data["reference"]
    assert ref["label"] == "float32" and ref["tokens_scored"] == 14
    assert [v["label"] for v in data["variants"]] == ["bf16", "q4 g32"]
    numeric = ["perplexity", "perplexity_error", "nll_mean", "kld_mean", "kld_mean_error", "kld_median", "kld_p99",
               "kld_max", "top1_agreement", "top1_agreement_error", "rms_delta_p", "rms_delta_p_error",
               "ln_ppl_ratio", "bits_per_weight"]
    for v in data["variants"]:
        for key in numeric:
            assert isinstance(v[key], float), key
        assert isinstance(v["bytes"], int) and v["tokens_scored"] == v["tokens_compared"] == 14
        assert 0.0 <= v["top1_agreement"] <= 1.0 and v["kld_median"] <= v["kld_p99"] <= v["kld_max"]
    assert data["variants"][1]["bits"] == 4 and data["variants"][1]["group_size"] == 32


def test_eval_refuses_a_text_too_short(tiny_llama_tok, tmp_path):
    from click.testing import CliRunner

    from mlxedge.cli.evaluation import eval_command

    text = tmp_path / "short.txt"
    text.write_text("Too short to evaluate.", encoding="utf-8")
    result = CliRunner().invoke(eval_command, [str(tiny_llama_tok), "--text", str(text), "--ctx", "64"])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "needs at least 128" in lines[0]


def test_run_loads_each_variant_and_the_reference_and_returns_what_evaluate_text_measures(tiny_llama_tok, prose):
    import mlxedge
    from mlxedge.bench.variants import parse_variants

    loaded = []

    def load(source, **kwargs):
        loaded.append((source, kwargs))
        return mlxedge.load(source, **kwargs)

    variants = parse_variants("32,4", group_size=32)
    result = run(str(tiny_llama_tok), variants, prose, "prose", ctx=16, chunks=2, reference=str(tiny_llama_tok),
                 load=load, describe=lambda info: f"described {info['dtype']}")
    assert loaded == [(str(tiny_llama_tok), v.load_kwargs()) for v in variants] + [(str(tiny_llama_tok), {})]
    expected = evaluate_text({v.label: mlxedge.load(tiny_llama_tok, **v.load_kwargs()) for v in variants}, prose,
                             ctx=16, max_chunks=2, reference=mlxedge.load(tiny_llama_tok))
    assert result["model"] == str(tiny_llama_tok) and result["text"] == "prose"
    assert result["settings"] == expected["settings"]
    assert list(result["reference"])[:3] == ["source", "label", "bytes"]
    assert result["reference"]["label"] == "described float32"
    assert {k: result["reference"][k] for k in expected["reference"]} == expected["reference"]
    for v, row in zip(variants, result["variants"]):
        assert row["label"] == v.label
        assert {k: row[k] for k in expected["results"][v.label]} == expected["results"][v.label]
        assert row["ln_ppl_ratio"] == row["nll_mean"] - expected["reference"]["nll_mean"]
    assert result["variants"][1]["bits"] == 4 and result["variants"][1]["group_size"] == 32

    plain = run(str(tiny_llama_tok), variants[:1], prose, "prose", ctx=16, chunks=2)  # mlxedge.load, no reference
    assert plain["reference"] is None and "ln_ppl_ratio" not in plain["variants"][0]
    assert plain["variants"][0]["perplexity"] == result["variants"][0]["perplexity"]
