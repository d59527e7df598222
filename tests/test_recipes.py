"""Per-module quantization: presets follow llama.cpp's K-quant pattern and round-trip with mlx-lm, the
data-aware search packs MLX's layout exactly and lowers the weighted error, target_bpw stays in budget."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load as mlx_lm_load

import mlxedge
from mlxedge.errors import QuantizationError
from mlxedge.quant.affine import QuantSpec
from mlxedge.quant.recipes import preset, use_more_bits
from mlxedge.quant.sensitivity import allocate, mean_bpw
from mlxedge.quant.weighted import pack_bits, weighted_quantize
from tiny_models import add_tiny_tokenizer, build_tiny

IDS = [1, 5, 9, 200, 30, 40, 17, 42, 99, 123, 7, 8]


@pytest.fixture(autouse=True)
def builtin_kernels(monkeypatch):
    monkeypatch.setenv("MLXEDGE_KERNELS", "builtin")  # mlx-lm runs MLX's built-ins; compare bit for bit


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    """8 layers (so llama.cpp's use_more_bits pattern picks layers 0, 3, 6, 7), untied head, tokenizer."""
    path = build_tiny("llama", tmp_path_factory.mktemp("recipes") / "tiny8", num_hidden_layers=8,
                      rope_theta=10000.0, tie_word_embeddings=False)
    return add_tiny_tokenizer(path)


def test_use_more_bits_is_llama_cpps_pattern():
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_q4_k_m_preset_writes_mlx_lm_overrides_and_loads_identically_in_mlx_lm(tiny8, tmp_path):
    out = tmp_path / "q4km"
    summary = mlxedge.convert(tiny8, out, recipe="q4_k_m", group_size=32)
    assert summary["recipe"] == "q4_k_m"
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert (q["bits"], q["group_size"]) == (4, 32)
    six = sorted(k for k, v in q.items() if isinstance(v, dict) and v["bits"] == 6)
    expected = sorted([f"model.layers.{i}.{m}" for i in (0, 3, 6, 7) for m in ("self_attn.v_proj", "mlp.down_proj")]
                      + ["lm_head"])
    assert six == expected
    ours = mlxedge.load(out, dtype="float32")
    assert (ours.info["bits"], ours.info["group_size"]) == (4, 32)
    assert sorted(s["bits"] for s in ours.info["quantization"]) == [4, 6]
    assert {s["bits"]: s["modules"] for s in ours.info["quantization"]}[6] == len(expected)
    theirs, _ = mlx_lm_load(str(out))
    expected_logits = np.array(theirs(mx.array(IDS)[None])[0].astype(mx.float32))
    assert np.array_equal(ours.logits(IDS), expected_logits)


def test_unknown_recipe_is_one_line(tiny8, tmp_path):
    with pytest.raises(QuantizationError, match="unknown recipe 'q9'; use one of q3_k_m, q4_k_m, q6_k"):
        mlxedge.convert(tiny8, tmp_path / "x", recipe="q9")
    assert not (tmp_path / "x").exists()


def _unpack(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Independent reader of MLX's bitstream: element i at bits [i·b, (i+1)·b) of the row's words."""
    as_bits = np.unpackbits(packed.view(np.uint8), axis=1, bitorder="little")  # little-endian words
    as_bits = as_bits[:, : cols * bits].reshape(packed.shape[0], cols, bits)
    return (as_bits * (1 << np.arange(bits))).sum(-1)


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 8])
def test_pack_bits_is_mlx_layout(bits):
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, (5, 64)).astype(np.uint32)
    packed = pack_bits(q, bits)
    assert np.array_equal(_unpack(packed, bits, 64), q)
    scales, biases = mx.ones((5, 2)), mx.zeros((5, 2))
    assert np.array_equal(np.array(mx.dequantize(mx.array(packed), scales, biases, group_size=32, bits=bits)), q)


@pytest.mark.parametrize("bits,group", [(3, 32), (4, 64), (6, 128), (8, 32)])
def test_weighted_search_beats_round_to_nearest_on_the_weighted_error(bits, group):
    rng = np.random.default_rng(0)
    w = (rng.standard_t(4, (64, 256)) * 0.05).astype(np.float32)
    imp = rng.gamma(0.5, 1.0, 256).astype(np.float32)
    q, s, b = weighted_quantize(mx.array(w), imp, QuantSpec(bits, group))
    ours = np.array(mx.dequantize(q, s, b, group_size=group, bits=bits))
    # the independent reading of the same words gives the same values
    levels = _unpack(np.array(q), bits, 256).reshape(64, 256 // group, group)
    manual = (levels * np.array(s)[..., None] + np.array(b)[..., None]).reshape(64, 256)
    assert np.allclose(manual, ours, atol=1e-6)
    rq, rs, rb = mx.quantize(mx.array(w), group_size=group, bits=bits)
    rtn = np.array(mx.dequantize(rq, rs, rb, group_size=group, bits=bits))
    assert (imp * (ours - w) ** 2).sum() < 0.9 * (imp * (rtn - w) ** 2).sum()


def test_weighted_search_in_row_slices_equals_one_pass(monkeypatch):
    """Rows are searched in slices to bound memory; the slicing must not change a single level or scale."""
    import mlxedge.quant.weighted as weighted

    rng = np.random.default_rng(1)
    w = (rng.standard_t(4, (37, 128)) * 0.05).astype(np.float32)
    imp = rng.gamma(0.5, 1.0, 128).astype(np.float32)
    whole = [np.array(a) for a in weighted_quantize(mx.array(w), imp, QuantSpec(4, 32))]
    monkeypatch.setattr(weighted, "ROW_SLICE_ELEMENTS", 5 * 128)  # slices of 5 rows, the last one of 2
    sliced = [np.array(a) for a in weighted_quantize(mx.array(w), imp, QuantSpec(4, 32))]
    for a, b in zip(whole, sliced):
        assert np.array_equal(a, b)


def test_allocate_respects_the_budget_and_favours_sensitive_modules():
    shapes = {f"m{i}": (64, 256) for i in range(6)}
    impact = {p: {b: (100.0 if p == "m0" else 1.0) * 2.0 ** (-b) for b in (3, 4, 5, 6, 8)} for p in shapes}
    chosen = allocate(shapes, impact, target_bpw=5.0, group_size=64)
    assert mean_bpw(shapes, chosen) <= 5.0
    assert chosen["m0"].bits == 8
    assert mean_bpw(shapes, chosen) > 4.5  # it spends the budget
    with pytest.raises(QuantizationError, match="below the smallest mix"):
        allocate(shapes, impact, target_bpw=2.0, group_size=64)


def _kld(ref: np.ndarray, other: np.ndarray) -> float:
    lp = ref - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1, keepdims=True)) - ref.max(-1, keepdims=True)
    lq = other - np.log(np.exp(other - other.max(-1, keepdims=True)).sum(-1, keepdims=True)) - other.max(-1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def test_target_bpw_stays_within_target_and_saves_sensitivities(tiny8, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("a tiny corpus for a tiny tokenizer, with a few words " * 200)
    out = tmp_path / "target"
    summary = mlxedge.convert(tiny8, out, group_size=32, target_bpw=5.5, calibration=calib, dtype="float16")
    saved = json.loads((out / "quant_sensitivity.json").read_text())
    assert saved["target_bpw"] == 5.5 and len(saved["modules"]) == 8 * 7 + 2
    bits = [m["bits"] for m in saved["modules"].values()]
    assert len(set(bits)) > 1  # a real mix
    shapes = {}
    weights = mx.load(str(out / "model.safetensors"))
    stored = sum(v.nbytes for k, v in weights.items() if k.rsplit(".", 1)[0] in saved["modules"])
    n = sum(v.shape[0] * v.shape[1] * 32 // m["bits"] for k, v in weights.items()
            for name, m in saved["modules"].items() if k == f"{name}.weight")
    assert 8 * stored / n <= 5.5
    assert summary["recipe"].startswith("target-5.5")
    del shapes


def test_data_aware_search_lowers_the_layer_output_error_on_calibration_activations(tiny8, tmp_path):
    """What the search optimises: E‖x·(W − Ŵ)ᵀ‖² over the calibration activations, lower than min/max rounding."""
    from mlxedge.quant.weighted import collect_importance
    from mlxedge.recipe_search import calibration_chunks

    calib = "a tiny corpus for a tiny tokenizer, with a few words " * 200
    model = mlxedge.load(tiny8, dtype="float32")
    chunks = calibration_chunks(model.tokenizer, calib, n_chunks=2, ctx=64)
    importance = collect_importance(model.module, chunks)
    wins = 0
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.3.mlp.gate_proj", "model.layers.5.mlp.down_proj"):
        w = dict(model.module.named_modules())[path].weight
        spec = QuantSpec(4, 64)
        ours = mx.dequantize(*weighted_quantize(w, importance[path], spec), group_size=64, bits=4)
        rq = mx.quantize(w, group_size=64, bits=4)
        rtn = mx.dequantize(*rq, group_size=64, bits=4)
        err = lambda deq: float((np.asarray(importance[path]) * ((np.array(deq) - np.array(w)) ** 2).sum(0)).sum())
        wins += err(ours) < 0.9 * err(rtn)
    assert wins == 3


# ------------------------------------------------------------------------------------------------ GGUF export

def test_k_quant_blocks_round_trip_through_ggufs_dequantizer():
    import gguf
    from gguf import GGMLQuantizationType as Q

    from mlxedge.export.kquants import quantize_q4_k, quantize_q6_k

    rng = np.random.default_rng(0)
    x = (rng.standard_t(4, (6, 512)) * 0.05).astype(np.float32)
    d4 = gguf.quants.dequantize(quantize_q4_k(x), Q.Q4_K)
    sub = x.reshape(-1, 32)
    step4 = (sub.max(1) - np.minimum(sub.min(1), 0)) / 15  # the sub-block's grid before 6-bit scale rounding
    assert np.all(np.abs(d4 - x).reshape(-1, 32).max(1) <= 0.5 * step4 * 1.1 + 1e-3 * np.abs(x).max())
    d6 = gguf.quants.dequantize(quantize_q6_k(x), Q.Q6_K)
    sub = x.reshape(-1, 16)
    step6 = np.abs(sub).max(1) / 31
    assert np.all(np.abs(d6 - x).reshape(-1, 16).max(1) <= 0.5 * step6 * 1.1 + 1e-3 * np.abs(x).max())
    assert np.sqrt(((d6 - x) ** 2).mean()) < np.sqrt(((d4 - x) ** 2).mean()) / 3  # 6 bits are finer than 4


@pytest.mark.parametrize("gguf_type,bits,recipe", [("f16", None, None), ("q8_0", 8, None), ("q4_0", 4, None),
                                                   ("q4_k_m", None, "q4_k_m")])
def test_gguf_export_loads_back_with_its_tokenizer(tiny8, tmp_path, gguf_type, bits, recipe):
    out = tmp_path / f"tiny-{gguf_type}.gguf"
    summary = mlxedge.convert(tiny8, out, bits=bits, recipe=recipe)
    assert summary["gguf_type"] == gguf_type and out.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    back = mlxedge.load(out, dtype="float32")
    source = mlxedge.load(tiny8, dtype="float32")
    # (leading space: the tiny tokenizer adds a prefix space, which GGUF's gpt2 tokenizer model cannot say)
    assert back.tokenizer.encode(" a tiny corpus, with words") == source.tokenizer.encode(" a tiny corpus, with words")
    error = np.abs(back.logits(IDS) - source.logits(IDS)).max()
    assert error < {"f16": 0.01, "q8_0": 0.1, "q4_0": 1.5, "q4_k_m": 1.0}[gguf_type]


def test_gguf_q8_0_export_of_a_q8_0_file_is_bit_exact(tiny8, tmp_path):
    """Q8_0 maps exactly onto MLX 8-bit g32: reading our file and writing it again changes no byte of data."""
    import gguf

    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    mlxedge.convert(tiny8, first, bits=8)
    mlxedge.convert(first, second, bits=8)
    a, b = gguf.GGUFReader(str(first)), gguf.GGUFReader(str(second))
    tensors_b = {t.name: t for t in b.tensors}
    for t in a.tensors:
        assert t.tensor_type == tensors_b[t.name].tensor_type
        assert np.array_equal(np.asarray(t.data), np.asarray(tensors_b[t.name].data)), t.name


def test_gguf_export_refuses_what_it_cannot_write(tiny8, tmp_path):
    with pytest.raises(mlxedge.MlxedgeError, match="GGUF export knows the recipe q4_k_m, not 'q6_k'"):
        mlxedge.convert(tiny8, tmp_path / "x.gguf", recipe="q6_k")
    with pytest.raises(mlxedge.MlxedgeError, match="target_bpw and data-aware search apply to mlx-lm directories"):
        mlxedge.convert(tiny8, tmp_path / "x.gguf", target_bpw=5.0)
    assert not list(tmp_path.iterdir())


def test_reuse_measurements_measures_a_source_once_and_only_inside_the_block(tiny8, tmp_path, monkeypatch):
    """Several targets of one model inside reuse_measurements() share one Fisher pass; outside, every load
    measures again (nothing is kept), and the recipes are the same either way."""
    import mlxedge.recipe_search as rs

    calls = []
    real = rs.fisher_diagonal
    monkeypatch.setattr(rs, "fisher_diagonal", lambda *a, **k: calls.append(1) or real(*a, **k))
    calib = tmp_path / "calib.txt"
    calib.write_text("a tiny corpus for a tiny tokenizer, with a few words " * 200)
    specs = {}
    with rs.reuse_measurements():
        for target in (5.0, 6.0):
            m = mlxedge.load(tiny8, group_size=32, target_bpw=target, calibration=calib, dtype="float32")
            specs[target] = m.info["bits"]
    assert len(calls) == 1
    again = mlxedge.load(tiny8, group_size=32, target_bpw=5.0, calibration=calib, dtype="float32")
    assert len(calls) == 2 and rs._reused is None
    assert again.info["bits"] == specs[5.0]
