"""Tiny GGUFs of every supported architecture, loaded with mlxedge.load, against transformers.

Two references per architecture:
  * quantized file (gguf-quantized block types, a different mix per architecture): logits equal those of
    transformers' own GGUF loader (`from_pretrained(dir, gguf_file=...)`), which dequantizes the same
    blocks with its own code — this proves names, llama's q/k un-permutation, gemma's norm shift,
    phi3's fused tensors, block decoding and the config read from metadata;
  * float file (F32): logits equal the original transformers model the file was written from.
"""

from __future__ import annotations

import numpy as np
import pytest

import mlxedge
from gguf_tiny import TINY, tiny_model, write_gguf

ARCHS = list(TINY)
SEQ = 24  # longer than gemma3's sliding window (4)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """model_type -> (original torch model, quantized GGUF path, float GGUF path)."""
    out = {}
    for model_type in ARCHS:
        model = tiny_model(model_type)
        d = tmp_path_factory.mktemp(model_type)
        out[model_type] = (model, write_gguf(model, d / "tiny-quant.gguf", TINY[model_type]["types"]),
                           write_gguf(model, d / "tiny-f32.gguf", {}))
    return out


def _ids(seed=0):
    return [int(x) for x in np.random.default_rng(seed).integers(3, 256, SEQ)]


def _torch_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("model_type", ARCHS)
def test_quantized_gguf_matches_transformers_gguf_loader(built, model_type):
    import torch
    from transformers import AutoModelForCausalLM

    _, path, _ = built[model_type]
    ids = _ids()
    ours = mlxedge.load(str(path), dtype="float32")
    got = ours.logits(ids)
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    want = _torch_logits(reference, ids)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).all()
    # every block type in the file is reported, all mapped exactly
    block_types = ours.info["gguf"]["block_types"]
    expected_types = set(TINY[model_type]["types"].values()) | {"F32"}
    if TINY[model_type]["config"].get("tie_word_embeddings", True) or model_type == "gemma3_text":
        expected_types -= {TINY[model_type]["types"].get("lm_head")}
    assert set(block_types) == expected_types - {None}
    assert all(b["exact"] == b["tensors"] and b["max_abs_deviation"] == 0.0 for b in block_types.values())


@pytest.mark.parametrize("model_type", ARCHS)
def test_float_gguf_matches_the_original_model(built, model_type):
    model, _, path = built[model_type]
    ids = _ids(1)
    got = mlxedge.load(str(path), dtype="float32").logits(ids)
    want = _torch_logits(model, ids)
    assert np.abs(got - want).max() <= 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("model_type", ARCHS)
def test_config_read_from_metadata(built, model_type):
    from mlxedge.sources.gguf import open_gguf

    model, path, _ = built[model_type]
    ck = open_gguf(path, str(path))
    cfg, hf = ck.config, model.config
    assert cfg["model_type"] == model_type
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings"):
        assert cfg[key] == getattr(hf, key), key
    assert cfg["head_dim"] == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert cfg["rope_theta"] == pytest.approx(TINY[model_type]["config"]["rope_theta"])
    assert cfg["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps)
    assert cfg["tie_word_embeddings"] == ("output.weight" not in {t for t in _gguf_names(path)})
    # the tensor headers describe exactly what the stream yields
    yielded = {name: (tuple(a.shape), str(a.dtype).split(".")[-1]) for name, a in ck.iter_tensors()}
    assert yielded == {name: (i.shape, i.dtype) for name, i in ck.tensor_infos.items()}
    # every quantized module the stream yields is listed with its bits; float matrices are listed as False
    for name, info in ck.tensor_infos.items():
        if name.endswith(".scales"):
            assert isinstance(ck.quantization[name[: -len(".scales")]], dict)


def _gguf_names(path):
    from gguf import GGUFReader

    return [t.name for t in GGUFReader(path).tensors]


@pytest.mark.parametrize("model_type", ARCHS)
def test_convert_writes_what_mlx_lm_loads_identically(built, model_type, tmp_path, monkeypatch):
    """mlxedge.convert(gguf) keeps the exact GGUF triplets; mlx-lm's own loader reads the result identically."""
    import json

    monkeypatch.setenv("MLXEDGE_KERNELS", "builtin")  # bit-identical only on the same (MLX's built-in) kernels

    import mlx.core as mx
    from mlx_lm import load as mlx_lm_load

    _, path, _ = built[model_type]
    ids = _ids(2)
    want = mlxedge.load(str(path), dtype="float32").logits(ids)
    out = tmp_path / "converted"
    mlxedge.convert(str(path), out, bits=None, dtype="float32")
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    assert quantization["group_size"] == 32
    model, _ = mlx_lm_load(str(out))
    got = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    np.testing.assert_array_equal(got, want)


K_TYPES = {"self_attn": "Q4_K", "down_proj": "Q6_K", "mlp": "Q5_K", "embed_tokens": "Q6_K", "lm_head": "Q4_K"}


def test_k_quant_encoder_agrees_with_gguf_dequantizer():
    """The test's own Q4_K/Q5_K/Q6_K encoder writes blocks gguf decodes to the encoded values (checks the helper)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize
    from gguf_tiny import quantize_k

    w = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32) * 0.1
    for name, tolerance in (("Q4_K", 0.03), ("Q5_K", 0.015), ("Q6_K", 0.008)):
        back = dequantize(quantize_k(w, name), T[name])
        assert np.abs(back - w).max() < tolerance, name


def test_k_quant_llama_matches_transformers_gguf_loader(tmp_path):
    """Q4_K/Q5_K exact, Q6_K (embedding, down_proj) requantized to 8-bit: close to transformers, deviation reported."""
    import torch
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", hidden_size=256, intermediate_size=512, head_dim=64)
    path = write_gguf(model, tmp_path / "tiny-k.gguf", K_TYPES)
    ids = _ids(3)
    ours = mlxedge.load(str(path), dtype="float32")
    got = ours.logits(ids)
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    want = _torch_logits(reference, ids)
    delta = np.abs(got - want).max()
    assert delta <= 0.02 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    report = ours.info["gguf"]["block_types"]
    assert report["Q4_K"]["exact"] == report["Q4_K"]["tensors"] == 9  # 4 attention x 2 layers + lm_head
    assert report["Q5_K"]["exact"] == report["Q5_K"]["tensors"] == 4
    assert report["Q6_K"]["tensors"] == 3 and report["Q6_K"]["exact"] == 0
    deviation = report["Q6_K"]["max_abs_deviation"]
    print(f"K-quant llama vs transformers: max |dlogit| {delta:.2e}, Q6_K max deviation {deviation:.2e}")
    assert 0.0 < deviation < 2e-3  # weights ~N(0, 0.08): about half an 8-bit step of a group's range
    assert report["Q6_K"]["mapping"] == "requantized affine 8-bit g32"


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    """Llama 3.1-style rope scaling survives only as llama.cpp's rope_freqs tensor; positions must still match."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = tiny_model("llama", rope_parameters=rope)
    path = write_gguf(model, tmp_path / "llama3.gguf", {})
    ours = mlxedge.load(str(path), dtype="float32")
    ids = _ids(4)
    want = _torch_logits(model, ids)
    assert np.abs(ours.logits(ids) - want).max() <= 1e-4
    # the same weights without the rope_freqs tensor drift away, so the check above has teeth
    plain = write_gguf(model, tmp_path / "plain.gguf", {}, llama3_rope=False)
    assert np.abs(mlxedge.load(str(plain), dtype="float32").logits(ids) - want).max() > 1e-3


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_reader_agrees_with_stock_reader(built, model_type):
    """mlxedge's validating reader sees what gguf's own GGUFReader sees: tensors (names, types, shapes,
    offsets, bytes) and every metadata value (string arrays by length only)."""
    from gguf import GGUFReader, GGUFValueType

    from mlxedge.sources.gguf import read_gguf
    from mlxedge.sources.gguf.reader import StringArray

    path = built[model_type][1]  # carries string arrays (vocabulary) and numeric ones (scores, types)
    ours, stock = read_gguf(path), GGUFReader(path)
    assert [(t.name, int(t.qtype), list(t.dims), t.offset, t.nbytes) for t in ours.tensors] == \
        [(t.name, int(t.tensor_type), t.shape.tolist(), int(t.data_offset), int(t.n_bytes)) for t in stock.tensors]
    assert ours.data_offset == stock.data_offset
    assert list(ours.fields) == [k for k in stock.fields if not k.startswith("GGUF.")]
    for key, value in ours.fields.items():
        field = stock.fields[key]
        if isinstance(value, StringArray):
            assert field.types == [GGUFValueType.ARRAY, GGUFValueType.STRING] and value.count == len(field.data), key
        elif isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, np.array(field.contents()), err_msg=key)
        else:
            assert value == field.contents(), key
    for t_ours, t_stock in zip(ours.tensors, stock.tensors):
        np.testing.assert_array_equal(np.asarray(t_ours.data).view(np.uint8).reshape(-1),
                                      np.asarray(t_stock.data).view(np.uint8).reshape(-1), err_msg=t_ours.name)


def test_bundled_vision_tensors_are_skipped(built, tmp_path):
    """Multimodal GGUFs (Ollama's gemma3) carry v.* / mm.* tensors; text use ignores them and says so."""
    model, path, _ = built["gemma3_text"]
    extra = {"v.blk.0.attn_q.weight": np.ones((32, 32), np.float32), "mm.input_projection.weight": np.ones(32, np.float32)}
    bundled = write_gguf(model, tmp_path / "bundled.gguf", TINY["gemma3_text"]["types"], extra=extra)
    ids = _ids(5)
    with_vision = mlxedge.load(str(bundled), dtype="float32")
    assert with_vision.info["gguf"]["skipped_vision_tensors"] == 2
    np.testing.assert_array_equal(with_vision.logits(ids), mlxedge.load(str(path), dtype="float32").logits(ids))


def test_gemma3_linear_rope_scaling_matches_the_original(tmp_path):
    """Gemma 3 4B+ scales global-layer positions linearly (rope.scaling.* metadata); sliding layers are unscaled."""
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 500000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    model = tiny_model("gemma3_text", rope_parameters=rope)
    path = write_gguf(model, tmp_path / "gemma3-linear.gguf", {})
    ids = _ids(6)
    want = _torch_logits(model, ids)
    assert np.abs(mlxedge.load(str(path), dtype="float32").logits(ids) - want).max() <= 1e-4
    # same weights (same seed) without the scaling metadata: far off, so the check above has teeth
    plain = write_gguf(tiny_model("gemma3_text"), tmp_path / "gemma3-plain.gguf", {})
    assert np.abs(mlxedge.load(str(plain), dtype="float32").logits(ids) - want).max() > 1e-2
