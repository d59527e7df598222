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


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A small random transformers causal LM (hidden 64, 2 layers unless overridden), weights at a sane scale."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    cfg = AutoConfig.for_model(model_type, **{**common, **TINY[model_type]["config"], **overrides})
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


def _k_scales_pack(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes from 8 six-bit scales and 8 six-bit mins per super-block."""
    lo = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    mid = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return np.concatenate([lo, mid, hi], axis=1).astype(np.uint8)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def quantize_k(w: np.ndarray, qtype: str) -> np.ndarray:
    """A plain encoder for Q4_K, Q5_K and Q6_K (gguf-py has none): min/max per sub-block, no search.

    Layouts follow ggml's block_q4_K / block_q5_K / block_q6_K; the result is checked against gguf's
    dequantizer in the tests, so a layout mistake here cannot pass silently.
    """
    rows, cols = w.shape
    if qtype in ("Q4_K", "Q5_K"):
        levels = 15 if qtype == "Q4_K" else 31
        x = w.astype(np.float32).reshape(-1, 8, 32)
        lo = np.minimum(x.min(-1), 0.0)
        scale, mins = (x.max(-1) - lo) / levels, -lo
        d = (scale.max(-1, keepdims=True) / 63).astype(np.float16).astype(np.float32)
        dmin = (mins.max(-1, keepdims=True) / 63).astype(np.float16).astype(np.float32)
        sc = np.clip(np.rint(scale / np.where(d == 0, 1, d)), 0, 63).astype(np.uint8)
        mn = np.clip(np.rint(mins / np.where(dmin == 0, 1, dmin)), 0, 63).astype(np.uint8)
        step, offset = d * sc, dmin * mn
        q = np.clip(np.rint((x + offset[..., None]) / np.where(step == 0, 1, step)[..., None]), 0, levels)
        q = q.astype(np.uint8)  # [n, 8 sub-blocks, 32]
        low = (q[:, 0::2] & 15) | ((q[:, 1::2] & 15) << 4)  # chunk c: sub-block 2c low, 2c+1 high
        parts = [_f16_bytes(d), _f16_bytes(dmin), _k_scales_pack(sc, mn)]
        if qtype == "Q5_K":
            high = ((q >> 4) & 1) << np.arange(8, dtype=np.uint8)[None, :, None]
            parts.append(high.sum(axis=1).astype(np.uint8))
        parts.append(low.reshape(-1, 128))
    elif qtype == "Q6_K":
        x = w.astype(np.float32).reshape(-1, 16, 16)
        s = np.abs(x).max(-1) / 31
        d = (s.max(-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
        sc = np.clip(np.rint(s / np.where(d == 0, 1, d)), -128, 127).astype(np.int8)
        step = d * sc
        q = np.clip(np.rint(x / np.where(step == 0, 1, step)[..., None]) + 32, 0, 63).astype(np.uint8)
        q = q.reshape(-1, 2, 128)  # two halves of 128
        ql = (q[:, :, :64] & 15) | ((q[:, :, 64:] & 15) << 4)
        qh = sum(((q[:, :, 32 * k:32 * k + 32] >> 4) & 3) << (2 * k) for k in range(4))
        parts = [ql.reshape(-1, 128), qh.reshape(-1, 64).astype(np.uint8), sc.view(np.uint8), _f16_bytes(d)]
    else:
        raise ValueError(qtype)
    return np.concatenate(parts, axis=1).reshape(rows, -1)


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


def llama_cpp_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for Llama 3.1-style scaling, frequency by frequency."""
    import math

    base, factor = rope["rope_theta"], rope["factor"]
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings", 8192)
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < context / high:
            out.append(1.0)
        elif wavelen > context / low:
            out.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(model, path: Path, types: Dict[str, str], arch: str | None = None, llama3_rope: bool = True,
               extra: Dict[str, np.ndarray] | None = None) -> Path:
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
        if rope.get("rope_type") == "linear":  # Gemma 3 4B and up: linear scaling on the global layers
            w.add_string("gemma3.rope.scaling.type", "linear")
            w.add_float32("gemma3.rope.scaling.factor", float(rope["factor"]))
    if model_type == "phi3":
        w.add_uint32("phi3.rope.scaling.original_context_length", cfg.max_position_embeddings)

    if model_type == "llama" and rope.get("rope_type") == "llama3" and llama3_rope:
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(rope, head_dim))

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
        if qtype.name in ("Q4_K", "Q5_K", "Q6_K"):
            w.add_tensor(gguf_name(model_type, hf), quantize_k(data, qtype.name), raw_dtype=qtype)
        elif qtype == T.F32:
            w.add_tensor(gguf_name(model_type, hf), data)
        elif qtype == T.F16:
            w.add_tensor(gguf_name(model_type, hf), data.astype(np.float16))
        else:
            w.add_tensor(gguf_name(model_type, hf), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    for name, data in (extra or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
