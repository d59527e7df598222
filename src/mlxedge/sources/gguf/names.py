"""GGUF tensor names -> Hugging Face / mlx-lm names, per architecture, and llama's q/k row un-permutation."""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

from ...errors import SourceError
from .reader import quote

# GGUF architecture -> (HF model_type, HF architectures class, default rope theta)
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM", 10000.0),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", 1000000.0),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", 1000000.0),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM", 1000000.0),
    "phi3": ("phi3", "Phi3ForCausalLM", 10000.0),
}

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

_LAYER_OVERRIDES = {
    "gemma3": {
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
}

# tensors llama.cpp adds that carry configuration, not weights (consumed by config.py)
CONFIG_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}

# multimodal GGUFs (e.g. Ollama's gemma3) carry the vision tower as v.* / mm.* tensors: text use skips them
VISION_PREFIXES = ("v.", "mm.")

_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
_PERMUTED = re.compile(r"\.attn_[qk]\.(weight|bias)$")


def hf_name(arch: str, gguf_name: str) -> Optional[str]:
    """The Hugging Face / mlx-lm name of a GGUF tensor, or None when the name is not one we know."""
    m = _BLOCK.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        table = {**_LAYER_NAMES, **_LAYER_OVERRIDES.get(arch, {})}
        return f"model.layers.{layer}.{table[part]}.{kind}" if part in table else None
    base, _, kind = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES and kind in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[base]}.{kind}"
    return None


def permuted_heads(arch: str, gguf_name: str, cfg: dict) -> Optional[int]:
    """How many heads llama.cpp's converter permuted this tensor's rows for (llama q/k only), else None."""
    if arch != "llama" or not _PERMUTED.search(gguf_name):
        return None
    return cfg["num_attention_heads"] if ".attn_q." in gguf_name else cfg["num_key_value_heads"]


def check_permutable(name: str, rows: int, n_head: int) -> None:
    """Refuse, naming the tensor, a q/k tensor whose rows do not split into n_head heads of pairs."""
    if n_head <= 0 or rows % n_head or (rows // n_head) % 2:
        raise SourceError(f"tensor {quote(name)} has {rows} rows, which do not split into {n_head} rotary heads of "
                          "row pairs; its shape and the file's head counts disagree")


def unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation along axis 0 (per head: interleaved pairs -> two halves)."""
    head_rows = rows.shape[0] // n_head
    return rows.reshape(n_head, head_rows // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
