"""Test helper: tiny random transformers models written as GGUF files the way llama.cpp's converter does.

Conventions reproduced from llama.cpp's convert_hf_to_gguf.py (independently of mlxedge's reader):
tensor names per architecture, llama's q/k row permutation for its rotary layout, gemma3's RMSNorm
weights stored as `w + 1`, phi3's fused qkv / gate_up kept fused. Block types come from gguf's own
quantizer. Files are cached under the test cache directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

ARCH_OF = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3", "phi3": "phi3"}

# per model_type: extra transformers config and, for matrices, a block type per name fragment
TINY = {
    "llama": dict(config=dict(rope_theta=50000.0, tie_word_embeddings=False),
                  types={"self_attn": "Q4_0", "mlp": "Q5_1", "embed_tokens": "Q8_0", "lm_head": "F16"}),
    "qwen2": dict(config=dict(rope_theta=20000.0, tie_word_embeddings=True),
                  types={"self_attn": "Q4_1", "mlp": "Q5_0", "embed_tokens": "F16"}),
    "qwen3": dict(config=dict(rope_theta=30000.0, head_dim=128, tie_word_embeddings=True),
                  types={"self_attn": "Q8_0", "mlp": "F16", "embed_tokens": "Q4_0"}),
    "gemma3_text": dict(config=dict(num_hidden_layers=7, head_dim=256, num_attention_heads=2, num_key_value_heads=1,
                                    sliding_window=4, rope_theta=500000.0, query_pre_attn_scalar=256, rms_norm_eps=1e-6),
                        types={"self_attn": "Q4_0", "mlp": "BF16", "embed_tokens": "Q8_0"}),
    "phi3": dict(config=dict(rope_theta=3000.0, tie_word_embeddings=False, num_key_value_heads=4,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2),
                 types={"self_attn": "Q5_0", "mlp": "Q4_1", "embed_tokens": "F32", "lm_head": "Q8_0"}),
}

_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
          "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}
_GEMMA3_LAYER = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                 "post_feedforward_layernorm": "post_ffw_norm"}
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def tiny_model(model_type: str, seed: int = 0):
    """A small random transformers causal LM (hidden 64, 2 layers unless overridden), weights at a sane scale."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    cfg = AutoConfig.for_model(model_type, **{**common, **TINY[model_type]["config"]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # gemma norms are used as (1 + w): keep the effective gain near 1 as well
                p.copy_(torch.rand_like(p) * 0.5 + (-0.25 if model_type == "gemma3_text" else 0.75))
            else:
                p.normal_(0.0, 0.08)
    return model.eval()


def gguf_name(model_type: str, hf: str) -> str:
    module, _, kind = hf.rpartition(".")
    if module in _GLOBAL:
        return f"{_GLOBAL[module]}.{kind}"
    _, _, layer, rest = module.split(".", 3)
    table = {**_LAYER, **(_GEMMA3_LAYER if model_type == "gemma3_text" else {})}
    return f"blk.{layer}.{table[rest]}.{kind}"


def permute_for_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permute: within each head, rows [first half; second half] -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_vocab() -> list:
    """GPT-2's byte-level alphabet: one printable character per byte value, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + \
        list(range(ord("\u00ae"), ord("\u00ff") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def add_byte_tokenizer(w) -> None:
    """A 256-token byte-level BPE (no merges) in GGUF tokenizer metadata, enough for transformers to build it."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(byte_vocab())
    w.add_token_types([1] * 256)
    w.add_token_scores([0.0] * 256)
    w.add_token_merges([])


def write_gguf(model, path: Path, types: Dict[str, str], arch: str | None = None) -> Path:
    """Write `model` as a GGUF with llama.cpp's naming and layout; `types` maps name fragments to block types."""
    import gguf
    from gguf import GGMLQuantizationType as T

    cfg = model.config
    model_type = cfg.model_type
    arch = arch or ARCH_OF[model_type]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{model_type}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope)  # gemma3: global layers carry the file's rope theta
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_vocab_size(cfg.vocab_size)
    add_byte_tokenizer(w)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    if model_type in ("qwen3", "gemma3_text"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if model_type in ("llama", "phi3"):
        w.add_rope_dimension_count(head_dim)
    if model_type == "gemma3_text":
        w.add_sliding_window(cfg.sliding_window)
    if model_type == "phi3":
        w.add_uint32("phi3.rope.scaling.original_context_length", cfg.max_position_embeddings)

    tied = getattr(cfg, "tie_word_embeddings", False)
    for hf, tensor in model.state_dict().items():
        if tied and hf == "lm_head.weight":
            continue
        data = tensor.detach().numpy().astype(np.float32)
        if model_type == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            data = permute_for_llama_cpp(data, cfg.num_attention_heads if ".q_proj." in hf
                                         else cfg.num_key_value_heads)
        if model_type == "gemma3_text" and hf.endswith("norm.weight"):
            data = data + 1.0
        qtype = T.F32
        if data.ndim == 2:
            qtype = T[next((t for frag, t in types.items() if frag in hf), "F32")]
        if qtype == T.F32:
            w.add_tensor(gguf_name(model_type, hf), data)
        elif qtype == T.F16:
            w.add_tensor(gguf_name(model_type, hf), data.astype(np.float16))
        else:
            w.add_tensor(gguf_name(model_type, hf), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
