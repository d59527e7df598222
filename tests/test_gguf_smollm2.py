"""The real SmolLM2-135M-Instruct Q4_1 GGUF through mlxedge.load, against transformers' GGUF loader in fp32.

Reference: the `smollm2_hf` fixture, an fp32 checkpoint transformers wrote from this same GGUF with its
own dequantizer, name mapping and q/k un-permutation (none of them mlxedge's), and its tokenizer.
"""

from __future__ import annotations

import numpy as np
import pytest

import mlxedge
from mlxedge.sources.gguf import open_gguf

MIXED_TEXT = ("The quick brown fox — naïve café. 안녕하세요, 만나서 반갑습니다! 한국어 문장도 잘 처리되나요?\n"
              "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 피보나치\n"
              "<|im_start|>user\n{\"key\": [1, 2.5e-3, null]}\t\t  trailing spaces   \n<|im_end|>")


@pytest.fixture(scope="module")
def model(smollm2_gguf):
    return mlxedge.load(str(smollm2_gguf), dtype="float32")


@pytest.fixture(scope="module")
def checkpoint(smollm2_gguf):
    return open_gguf(smollm2_gguf, "smollm2")


@pytest.fixture(scope="module")
def reference_tokenizer(smollm2_hf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_hf))


@pytest.mark.slow  # one 256-token fp32 forward pass each in MLX and torch: about a minute on 2 CPU cores
def test_logits_match_transformers_gguf_loader_on_prose(model, smollm2_hf, reference_tokenizer, prose):
    import torch
    from transformers import AutoModelForCausalLM

    ids = reference_tokenizer.encode(prose)[:256]
    assert len(ids) == 256
    reference = AutoModelForCausalLM.from_pretrained(str(smollm2_hf), dtype=torch.float32)
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0].numpy()
    got = model.logits(ids)
    top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
    max_delta = float(np.abs(got - want).max())
    print(f"SmolLM2 Q4_1 vs transformers fp32: top-1 agreement {top1:.4f}, max |dlogit| {max_delta:.2e}")
    assert top1 == 1.0
    assert max_delta <= 0.05


def test_tokenizer_from_gguf_encodes_like_the_reference(model, reference_tokenizer):
    want = reference_tokenizer.encode(MIXED_TEXT)
    assert model.tokenizer.encode(MIXED_TEXT) == want
    assert model.tokenizer.decode(want) == reference_tokenizer.decode(want)
    assert "안녕하세요" in model.tokenizer.decode(want)
    assert model.tokenizer.encode("<|im_start|>", add_special_tokens=False) == [1]


def test_metadata_config_template_and_report(checkpoint, reference_tokenizer):
    ck = checkpoint
    cfg = ck.config
    assert (cfg["model_type"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == \
        ("llama", 576, 30, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["rope_theta"] == 100000.0 and cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert ck.chat_template == reference_tokenizer.chat_template
    assert ck.chat_template.startswith("{% for message in messages %}")
    # Q4_1 matrices and the Q8_0 embedding are MLX affine triplets, norms stay float
    assert ck.quantization["group_size"] == 32 and ck.quantization["bits"] == 4
    assert ck.quantization["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert ck.quantization["model.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 4}
    assert ck.tensor_infos["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576 * 4 // 32)
    assert ck.tensor_infos["model.norm.weight"].dtype == "float32"
    report = ck.info["gguf"]["block_types"]
    assert report["Q4_1"] == {"tensors": 210, "exact": 210, "mapping": "exact affine 4-bit g32", "max_abs_deviation": 0.0}
    assert report["Q8_0"]["tensors"] == report["Q8_0"]["exact"] == 1
    assert report["F32"]["tensors"] == 61


def test_model_info_reports_block_types(model):
    report = model.info["gguf"]["block_types"]
    assert set(report) == {"Q4_1", "Q8_0", "F32"}
    assert all(entry["exact"] == entry["tensors"] for entry in report.values())



def test_streaming_never_materialises_floats(checkpoint, smollm2_gguf):
    """iter_tensors works tensor by tensor from the memory map: numpy's peak stays below one float copy of the
    largest tensor (the 49152x576 embedding, 113 MB in float32) and below the file size (98 MB)."""
    import tracemalloc

    tracemalloc.start()
    try:
        count = sum(1 for _ in checkpoint.iter_tensors())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == len(checkpoint.tensor_infos)
    assert peak < min(49152 * 576 * 4, smollm2_gguf.stat().st_size) * 0.75
