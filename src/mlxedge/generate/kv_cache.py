"""Per-layer KV caches for generation: full, rotating (a window of the latest tokens) or quantized.

mlx-lm's `make_prompt_cache(model, max_kv_size=...)` ignores `max_kv_size` for any architecture with its own
`make_cache` (llama, mistral, gemma3), so a "rotating" window silently stayed unbounded there. This module
builds the caches itself, starting from what the architecture asks for and changing each layer:

- a full-attention layer (KVCache) becomes RotatingKVCache(max_kv_size, keep=0) for a window, or
  QuantizedKVCache(kv_group_size, kv_bits) for a quantized cache;
- a sliding-window layer (RotatingKVCache of its own window) keeps its kind; a window shorter than the
  layer's own shrinks it to the window;
- any other kind of layer state (recurrent states, chunked caches) is kept as the architecture made it, and
  a window or quantization asked for it is refused with UnsupportedError.

keep=0 means a plain sliding window: every token attends to the `max_kv_size` latest tokens (itself
included), at their absolute positions — the semantics of transformers' `sliding_window` attention, which
the tests use as the reference. (mlx-lm keeps 4 "sink" tokens; its chunked prefill masks those away
inconsistently, so a rotating cache here does not.) Quantized caches cannot rotate (mlx-lm has no rotating
quantized cache), and architectures with their own attention code (gemma2) cannot read them.
"""

from __future__ import annotations

from typing import List, Optional

from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

from ..errors import UnsupportedError

KV_BITS = (4, 8)
# architectures whose attention goes through mlx-lm's scaled_dot_product_attention, which reads quantized caches
_QUANTIZED_KV_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")


def kv_group_size(head_dim: int) -> int:
    """The quantization group of a quantized KV cache: 64 when the head dimension allows, else 32."""
    for group in (64, 32):
        if head_dim % group == 0:
            return group
    raise UnsupportedError(f"a quantized KV cache needs a head dimension divisible by 32; this model's is {head_dim}. "
                           "Leave kv_bits unset.")


def validate_kv_bits(kv_bits: Optional[int]) -> Optional[int]:
    if kv_bits is None:
        return None
    if isinstance(kv_bits, bool) or kv_bits not in KV_BITS:
        raise UnsupportedError(f"kv_bits must be 4 or 8 (or None for a float KV cache), got {kv_bits!r}.")
    return int(kv_bits)


def _head_dim(model) -> int:
    args = getattr(model, "args", None)
    head_dim = getattr(args, "head_dim", None)
    if not head_dim:
        head_dim = args.hidden_size // args.num_attention_heads
    return int(head_dim)


def make_cache(model, *, max_kv_size: Optional[int] = None, kv_bits: Optional[int] = None,
               model_type: Optional[str] = None) -> List:
    """The per-layer caches of `model` (an mlx-lm module); see the module docstring for the rules."""
    kv_bits = validate_kv_bits(kv_bits)
    if max_kv_size is not None and int(max_kv_size) < 1:
        raise UnsupportedError(f"a rotating KV window needs at least one token, got {max_kv_size}.")
    if kv_bits is not None and max_kv_size is not None:
        raise UnsupportedError("a quantized KV cache (kv_bits) cannot also be a rotating window; "
                               "drop kv_bits or the rotating window (kv_overflow='rotate').")
    model_type = model_type or getattr(getattr(model, "args", None), "model_type", None)
    if kv_bits is not None and model_type not in _QUANTIZED_KV_ARCHS:
        raise UnsupportedError(f"a quantized KV cache (kv_bits) is not supported for {model_type} models "
                               "(their attention reads only float caches); leave kv_bits unset.")
    base = model.make_cache() if hasattr(model, "make_cache") else [KVCache() for _ in model.layers]
    group = kv_group_size(_head_dim(model)) if kv_bits is not None else None
    caches = []
    for i, cache in enumerate(base):
        kind = type(cache)
        if kind is KVCache:
            if max_kv_size is not None:
                cache = RotatingKVCache(max_size=int(max_kv_size), keep=0)
            elif kv_bits is not None:
                cache = QuantizedKVCache(group_size=group, bits=kv_bits)
        elif kind is RotatingKVCache:
            if max_kv_size is not None and int(max_kv_size) < cache.max_size:
                cache = RotatingKVCache(max_size=int(max_kv_size), keep=cache.keep)
        elif max_kv_size is not None or kv_bits is not None:
            raise UnsupportedError(f"layer {i} of this {model_type} model keeps a {kind.__name__}, which mlxedge "
                                   "cannot turn into a rotating or quantized KV cache.")
        caches.append(cache)
    return caches


def describe(caches: List) -> List[dict]:
    """kind, tokens held and window (rotating) of every layer: what tests and `--debug` output look at."""
    out = []
    for c in caches:
        entry = {"kind": type(c).__name__, "offset": int(c.offset),
                 "held": 0 if c.keys is None else int((c.keys[0] if isinstance(c.keys, (tuple, list)) else c.keys).shape[2])}
        if isinstance(c, RotatingKVCache):
            entry["window"] = int(c.max_size)
        if isinstance(c, QuantizedKVCache):
            entry["bits"] = int(c.bits)
        out.append(entry)
    return out
