"""Norm, rotary-embedding and attention layers bound to native kernels at load: the rest of a step.

On MLX's CPU backend `mx.fast.rms_norm`, `mx.fast.rope` and `mx.fast.scaled_dot_product_attention` are
not kernels: each expands into its reference graph (8–20 primitives; the attention's matmuls run in the
reference BLAS), so once the matmuls are native a small model's decode step is mostly per-primitive
overhead. Where the KernelChoice offers native versions (`FastOps`), `bind_fast_layers` swaps in:

- `BoundRMSNorm` for every `nn.RMSNorm` (same `weight` and `eps`);
- `BoundRoPE` for every plain `nn.RoPE` (an integer offset runs natively; an array offset — batched
  caches — runs `mx.fast.rope`);
- `BoundAttention` for the attention classes in `KNOWN_ATTENTIONS`, whose forward it restates once
  (projections, optional per-head q/k norm, rope, cache update, attention, output projection) with the
  attention bound; a numeric probe against the class's own forward (prefill and one decode step through a
  KV cache) must agree before any instance of a class is swapped. Masks other than none/"causal",
  quantized KV caches and mixed dtypes fall back to mlx-lm's attention for that call. Its q, k and v
  projections may then be bound to one call (`bind_projections`, from quant/binding.py): three small
  GEMVs (k and v are 192 rows on SmolLM2) cost more apart than as one partition of their rows.

Every swap keeps the children under the same names, so the parameter tree, loading, saving and adapters
are unchanged; `unbound()` gives the MLX / mlx-lm module back (the built-in choice swaps them back).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .architectures import classes_by_name

# mlx-lm attention classes whose forward BoundAttention restates: (module, class, per-head q/k norm)
KNOWN_ATTENTIONS = (
    ("mlx_lm.models.llama", "Attention", False),   # also mistral and smollm3's llama layers
    ("mlx_lm.models.qwen2", "Attention", False),
    ("mlx_lm.models.qwen3", "Attention", True),
)
PROBE_RTOL = 1e-4  # of max |output|, float32 probe


@dataclass(frozen=True)
class FastOps:
    """The native callables a model's norm / rope / attention layers are bound to (None: keep MLX's)."""

    backend: str
    rms_norm: Optional[Callable] = None   # (x, weight, eps)
    rope: Optional[Callable] = None       # (x, dims, *, traditional, base, scale, offset, freqs=None)
    sdpa: Optional[Callable] = None       # (q, k, v, *, scale, causal)


class BoundRMSNorm(nn.RMSNorm):
    """nn.RMSNorm whose forward is a bound kernel (same `weight` and `eps`)."""

    @classmethod
    def wrap(cls, norm: nn.RMSNorm, fn: Callable) -> "BoundRMSNorm":
        bound = cls.__new__(cls)
        nn.Module.__init__(bound)
        bound.weight = norm["weight"]
        bound.eps = norm.eps
        bound._fn = fn
        bound.train(norm.training)
        return bound

    def __call__(self, x: mx.array) -> mx.array:
        return self._fn(x, self["weight"], self.eps)

    def unbound(self) -> nn.RMSNorm:
        norm = nn.RMSNorm(self["weight"].shape[0], eps=self.eps)
        norm.weight = self["weight"]
        return norm


class BoundRoPE(nn.RoPE):
    """nn.RoPE whose integer-offset forward is a bound kernel."""

    @classmethod
    def wrap(cls, rope: nn.RoPE, fn: Callable) -> "BoundRoPE":
        bound = cls(rope.dims, traditional=rope.traditional, base=rope.base, scale=rope.scale)
        bound._fn = fn
        return bound

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        if isinstance(offset, int):
            return self._fn(x, self.dims, traditional=self.traditional, base=self.base, scale=self.scale,
                            offset=offset)
        return super().__call__(x, offset)

    def unbound(self) -> nn.RoPE:
        return nn.RoPE(self.dims, traditional=self.traditional, base=self.base, scale=self.scale)


def known_attentions() -> dict:
    """{class: has per-head q/k norm} for the KNOWN_ATTENTIONS rows that import in this mlx-lm."""
    return classes_by_name(KNOWN_ATTENTIONS)


def _mlx_lm_attention():
    from mlx_lm.models.base import scaled_dot_product_attention

    return scaled_dot_product_attention


class BoundAttention(nn.Module):
    """A known mlx-lm attention with its attention step bound to a kernel (same children and names)."""

    def __init__(self, original: nn.Module, qk_norm: bool, sdpa: Callable):
        super().__init__()
        for name, child in original.children().items():
            self[name] = child
        self.__dict__["_original"] = original  # outside the module tree
        for name, value in vars(original).items():  # n_heads, n_kv_heads, head_dim, scale, ... as plain attributes
            if isinstance(value, (int, float, bool, str)) and not name.startswith("_"):
                setattr(self, name, value)
        self._qk_norm, self._sdpa, self._fallback = qk_norm, sdpa, _mlx_lm_attention()
        self._projections, self._projections_size = None, 0
        self.train(original.training)

    def bind_projections(self, binding) -> None:
        """Run q, k and v through `binding.decode(x, parts)` (one call) for up to its decode rows; the
        projections are quantized alike (quant/binding.py checks). Beyond, each runs its own binding."""
        q = self["q_proj"]
        self._projections = binding.decode
        self._projections_size = binding.decode_rows * q["scales"].shape[1] * q.group_size

    def _project(self, x: mx.array):
        if x.size <= self._projections_size:
            parts = [(p["weight"], p["scales"], p["biases"]) for p in (self.q_proj, self.k_proj, self.v_proj)]
            return self._projections(x, parts)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def _attend(self, q, k, v, cache, mask):
        if ((mask is None or (isinstance(mask, str) and mask == "causal")) and not hasattr(cache, "bits")
                and isinstance(k, mx.array) and q.dtype == k.dtype == v.dtype):
            return self._sdpa(q, k, v, scale=self.scale, causal=mask is not None)
        return self._fallback(q, k, v, cache=cache, scale=self.scale, mask=mask)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        q, k, v = self._project(x)
        q = q.reshape(B, L, self.n_heads, -1)
        k = k.reshape(B, L, self.n_kv_heads, -1)
        if self._qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if cache is not None:
            q = self.rope(q, offset=cache.offset)
            k = self.rope(k, offset=cache.offset)
            k, v = cache.update_and_fetch(k, v)
        else:
            q, k = self.rope(q), self.rope(k)
        out = self._attend(q, k, v, cache, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def unbound(self) -> nn.Module:
        """The original attention module, holding this module's current children."""
        original = self._original
        for name, child in self.children().items():
            original[name] = child
        return original


def probe_attention(original: nn.Module, qk_norm: bool, sdpa: Callable) -> bool:
    """Numerically: BoundAttention(original) equals original's forward over a prefill and a decode step."""
    from mlx_lm.models.cache import KVCache

    try:
        bound = BoundAttention(original, qk_norm, sdpa)
        dim = original.o_proj["weight"].shape[0]  # the hidden size (quantized or float o_proj)
        dtype = next((p.dtype for _, p in _float_params(original)), mx.float32)
        keys = mx.random.split(mx.random.key(11))
        xs = [mx.random.normal((1, 3, dim), key=keys[0]).astype(dtype),
              mx.random.normal((1, 1, dim), key=keys[1]).astype(dtype)]
        caches = (KVCache(), KVCache())
        for x, mask in zip(xs, ("causal", None)):
            want = original(x, mask=mask, cache=caches[0]).astype(mx.float32)
            got = bound(x, mask=mask, cache=caches[1]).astype(mx.float32)
            scale = float(mx.max(mx.abs(want)).item()) or 1.0
            if got.shape != want.shape or float(mx.max(mx.abs(got - want)).item()) > _rtol(dtype) * scale:
                return False
        return True
    except Exception:  # a forward this restatement does not cover
        return False


def _rtol(dtype) -> float:
    return PROBE_RTOL if dtype == mx.float32 else 2e-2


def _float_params(module):
    from mlx.utils import tree_flatten

    return [(k, v) for k, v in tree_flatten(module.parameters())
            if isinstance(v, mx.array) and v.dtype in (mx.float32, mx.float16, mx.bfloat16)]


def _bind_attentions(model: nn.Module, ops: Optional[FastOps], counts: dict) -> None:
    known = known_attentions() if ops is not None and ops.sdpa is not None else {}
    verdicts, swaps = {}, []
    for path, m in model.named_modules():
        original = m.unbound() if isinstance(m, BoundAttention) else m
        if type(original) in known:
            qk_norm = known[type(original)]
            if type(original) not in verdicts:
                verdicts[type(original)] = probe_attention(original, qk_norm, ops.sdpa)
            if verdicts[type(original)]:
                swaps.append((path, BoundAttention(original, qk_norm, ops.sdpa)))
                counts["attention"][ops.backend] += 1
                continue
        if original is not m:
            swaps.append((path, original))
        if isinstance(original, nn.Module) and "o_proj" in original and "q_proj" in original:
            counts["attention"]["builtin"] += 1
    if swaps:
        model.update_modules(tree_unflatten(swaps))


def _bind_norms_and_ropes(model: nn.Module, ops: Optional[FastOps], counts: dict) -> None:
    swaps = []
    for path, m in model.named_modules():
        if type(m) in (nn.RMSNorm, BoundRMSNorm):
            fn, kind, bound_cls = (ops.rms_norm if ops else None), "rms_norm", BoundRMSNorm
        elif type(m) in (nn.RoPE, BoundRoPE):
            fn, kind, bound_cls = (ops.rope if ops else None), "rope", BoundRoPE
        else:
            continue
        if fn is not None:
            swaps.append((path, bound_cls.wrap(m.unbound() if isinstance(m, bound_cls) else m, fn)))
            counts[kind][ops.backend] += 1
        else:
            if isinstance(m, bound_cls):
                swaps.append((path, m.unbound()))
            counts[kind]["builtin"] += 1
    if swaps:
        model.update_modules(tree_unflatten(swaps))


def bind_fast_layers(model: nn.Module, ops: Optional[FastOps]) -> dict:
    """Swap norm / rope / attention layers to `ops`' kernels (or back, for None); {kind: {backend: count}}
    (empty for None).

    Attention first, then norms and ropes (which may live inside the attention modules just swapped).
    """
    counts = {"rms_norm": Counter(), "rope": Counter(), "attention": Counter()}
    _bind_attentions(model, ops, counts)
    _bind_norms_and_ropes(model, ops, counts)
    if ops is None:  # all of MLX's own: nothing to report beside the matmul layers
        return {}
    return {kind: dict(c) for kind, c in counts.items() if c}
