"""`load(..., dequantize=True)` / `mlxedge eval --dequantize`: a quantized file read as float32 holding exactly its
weights — every GGUF block type decoded by gguf's own dequantizer (Q6_K, which has no MLX affine form,
included), mlx-lm files by mx.dequantize — so a GGUF made by another tool is scored as that tool's model."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

import mlxedge
from gguf_tiny import gguf_name, permute_for_llama_cpp, tiny_model, write_gguf

# Q6_K on the embedding (a tied-free llama: the embedding is only looked up) and FFN down; Q4_K elsewhere
K_TYPES = {"self_attn": "Q4_K", "down_proj": "Q6_K", "mlp": "Q5_K", "embed_tokens": "Q6_K", "lm_head": "Q6_K"}
IDS = [int(x) for x in np.random.default_rng(5).integers(3, 256, 20)]


@pytest.fixture(scope="module")
def k_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("dequant")
    model = tiny_model("llama", hidden_size=256, intermediate_size=512, head_dim=64)
    return model, write_gguf(model, d / "tiny-k.gguf", K_TYPES), write_gguf(model, d / "tiny-f32.gguf", {})


def _gguf_reference_weights(path) -> dict:
    """HF name -> float32 weights decoded by gguf's own reader and dequantizer, q/k rows un-permuted (an
    independent reading of the file: gguf-py, not mlxedge's reader)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    cfg = {"q_proj": 4, "k_proj": 2}  # tiny_model's heads / kv heads
    out = {}
    for hf in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.down_proj.weight",
               "model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight",
               "model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.gate_proj.weight"):
        t = by_name[gguf_name("llama", hf)]
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(x) for x in reversed(t.shape)))
        for proj, heads in cfg.items():
            if f".{proj}." in hf:  # undo llama.cpp's permute: apply its inverse on the rows
                values = _unpermute(values, heads)
        out[hf] = values.astype(np.float32)
    return out


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    back = w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(permute_for_llama_cpp(back, n_head), w)  # it is the inverse
    return back


def _module_weights(model) -> dict:
    from mlx.utils import tree_flatten

    return {name: np.array(v) for name, v in tree_flatten(model.module.parameters())}


def test_every_block_type_is_decoded_to_ggufs_values_bit_for_bit(k_gguf):
    _, path, _ = k_gguf
    model = mlxedge.load(str(path), dequantize=True)
    assert model.info["quantized_modules"] == 0 and model.info["dtype"] == "float32"
    ours = _module_weights(model)
    for name, want in _gguf_reference_weights(path).items():
        assert ours[name].dtype == np.float32
        assert np.array_equal(ours[name], want), name
    report = model.info["gguf"]["block_types"]
    assert report["Q6_K"]["exact"] == report["Q6_K"]["tensors"] == 4  # embedding, head, 2 × down_proj
    assert report["Q6_K"]["mapping"].startswith("dequantized exactly")


def test_without_dequantize_q6_k_is_only_approximated(k_gguf):
    """The contrast that makes the option necessary: the affine path holds Q6_K as 8-bit, not the file's values."""
    _, path, _ = k_gguf
    model = mlxedge.load(str(path), dtype="float32")
    assert model.info["gguf"]["block_types"]["Q6_K"]["exact"] == 0
    layer = model.module.model.layers[0].mlp.down_proj
    dense = np.array(mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=layer.group_size,
                                   bits=layer.bits))
    want = _gguf_reference_weights(path)["model.layers.0.mlp.down_proj.weight"]
    assert not np.array_equal(dense, want)


def test_dequantized_logits_equal_transformers_gguf_loader(k_gguf):
    """transformers' own GGUF loader (gguf's dequantizer, its own model code) is the reference for the logits."""
    import torch
    from transformers import AutoModelForCausalLM

    _, path, _ = k_gguf
    got = mlxedge.load(str(path), dequantize=True).logits(IDS)
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        want = reference(torch.tensor([IDS])).logits[0].float().numpy()
    assert np.abs(got - want).max() <= 1e-4


def test_mlx_directory_dequantizes_to_mx_dequantize(k_gguf, tmp_path):
    _, _, f32 = k_gguf
    out = tmp_path / "q4"
    mlxedge.convert(str(f32), out, bits=4, group_size=32)
    stored = mlxedge.load(out, dtype="float32")
    layer = stored.module.model.layers[1].self_attn.v_proj
    want = np.array(mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=32, bits=4))
    dense = mlxedge.load(out, dequantize=True)
    assert dense.info["quantized_modules"] == 0
    got = np.array(dense.module.model.layers[1].self_attn.v_proj.weight)
    assert np.array_equal(got, want)
    np.testing.assert_allclose(dense.logits(IDS), stored.logits(IDS), atol=1e-4)


def test_eval_dequantize_scores_the_files_model_and_reports_its_stored_size(k_gguf, tmp_path):
    from mlxedge.cli import main

    _, path, f32 = k_gguf
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 20)
    args = ["eval", str(path), "--reference", str(f32), "--text", str(text), "--ctx", "32", "--chunks", "3", "--json"]
    result = CliRunner().invoke(main, args + ["--dequantize"])
    assert result.exit_code == 0, result.output
    exact = json.loads(result.output)
    row = exact["variants"][0]
    assert row["label"] == "as stored (exact f32)"
    import gguf

    reader = gguf.GGUFReader(str(path))
    assert row["bytes"] == sum(int(t.n_bytes) for t in reader.tensors)
    assert row["parameters"] == sum(int(t.n_elements) for t in reader.tensors)
    # the same file scored through the affine mapping (Q6_K as 8-bit) is a different model
    approx = json.loads(CliRunner().invoke(main, args).output)["variants"][0]
    assert approx["kld_mean"] != row["kld_mean"]
    # the exact score equals one computed here from transformers' logits of the file and of the f32 reference
    assert row["kld_mean"] == pytest.approx(_transformers_kld(path, f32, text, ctx=32, chunks=3), rel=1e-3)


def _transformers_kld(path, ref_path, text_path, ctx: int, chunks: int) -> float:
    """Mean KLD(ref ‖ model) over the scored half of each chunk, from transformers' GGUF loader, in float64."""
    import torch
    from transformers import AutoModelForCausalLM

    from mlxedge.evaluate import make_chunks, tokenize_for_perplexity

    tok = mlxedge.load(str(ref_path)).tokenizer
    ids, bos = tokenize_for_perplexity(tok, text_path.read_text())
    klds = []
    models = [AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
              for p in (ref_path, path)]
    for chunk in make_chunks(ids, ctx, bos_id=bos, max_chunks=chunks):
        with torch.no_grad():
            ref, got = [m(torch.tensor([chunk])).logits[0, ctx // 2:ctx - 1].double() for m in models]
        lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
        klds.append((lp.exp() * (lp - lq)).sum(-1).numpy())
    return float(np.concatenate(klds).mean())
