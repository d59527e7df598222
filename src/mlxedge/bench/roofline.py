"""Bytes a decode step reads per token (weights as a decode step reads them, plus the KV cache per context
position) and the roofline they set: generation rate as a share of measured bandwidth ÷ bytes per token."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx


def weight_bytes_per_token(module) -> int:
    """Bytes of weights one decode step reads: all parameters, but only one row of an embedding table that is
    not also the output projection (a tied table is read whole by the lm_head)."""
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(module.parameters()))
    total = sum(int(v.nbytes) for v in params.values())
    tied = not hasattr(module, "lm_head")
    if not tied:
        for name, value in params.items():
            parts = name.split(".")
            if any(p in ("embed_tokens", "wte", "tok_embeddings", "word_embeddings") for p in parts):
                rows = value.shape[0] if value.ndim >= 1 and value.shape[0] > 0 else 1
                total -= int(value.nbytes) - int(value.nbytes) // rows
    return total


def kv_bytes_per_position(config: dict, dtype_bytes: int) -> int:
    """KV-cache bytes per context position, all layers (keys and values)."""
    layers = int(config.get("num_hidden_layers") or 0)
    heads = int(config.get("num_attention_heads") or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = config.get("head_dim") or (int(config.get("hidden_size") or 0) // heads)
    return 2 * layers * kv_heads * int(head_dim) * dtype_bytes


def compute_dtype(module):
    """The dtype a model computes in: that of its floating-point parameters (norms, scales, float weights)."""
    from mlx.utils import tree_flatten

    for _, v in tree_flatten(module.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return v.dtype
    return None


def kv_dtype_bytes(module) -> int:
    dtype = compute_dtype(module)
    return dtype.size if dtype is not None else 2


def dtype_name(dtype) -> Optional[str]:
    return None if dtype is None else str(dtype).split(".")[-1]


def roofline_fields(tps: float, bytes_per_token: int, bandwidth: Optional[float]) -> dict:
    if not bandwidth or not bytes_per_token:
        return {"roofline_tps": None, "roofline_pct": None}
    limit = bandwidth / bytes_per_token
    return {"roofline_tps": limit, "roofline_pct": 100.0 * tps / limit}

