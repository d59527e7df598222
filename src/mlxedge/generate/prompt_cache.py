"""A KV cache that knows which tokens it holds: reuse across calls, trimming, and cache files.

`PromptCache` pairs mlx-lm's per-layer caches with the token ids whose keys and values they hold
(`tokens`; for a rotating window, every token that went through, of which the window keeps the latest).
`reuse(prompt_ids)` keeps the longest common prefix of `tokens` and the new prompt, trims the rest away and
returns how many prompt tokens need no prefill. Trimming is exact for full and quantized caches and for a
rotating window that has not wrapped yet; a cache that cannot be trimmed (a wrapped window, gemma3's
sliding layers past their window) is emptied and the prompt prefilled from the start — slower, never wrong.

Cache files are safetensors: every layer's arrays (mlx-lm's `save_prompt_cache` layout) plus metadata
holding the tokens, the mlxedge file kind and the fingerprint of the model the cache was computed with
(`model_fingerprint`). Loading a file into a model with another fingerprint is a SourceError.

The fingerprint: sha256 over the normalized config (sorted JSON), every parameter's name, shape and dtype,
and 16 evenly spaced elements of every parameter (a few KB in all; no weight file is re-read). Two loads of
the same checkpoint at the same settings agree; another checkpoint, a fine-tune, or the same checkpoint at
other bits or dtype (whose keys and values differ) do not.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from ..errors import SourceError

FORMAT = "mlxedge-kv-cache/1"
SAMPLES_PER_TENSOR = 16


def model_fingerprint(module, config: dict) -> str:
    """A short stable id of a loaded model's config and weights (see the module docstring)."""
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, value in sorted(tree_flatten(module.parameters()), key=lambda kv: kv[0]):
        h.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        flat = value.reshape(-1)
        step = max(1, flat.size // SAMPLES_PER_TENSOR)
        sample = flat[::step][:SAMPLES_PER_TENSOR]
        if sample.dtype == mx.bfloat16:
            sample = sample.astype(mx.float32)
        h.update(np.array(sample).tobytes())
    return h.hexdigest()[:32]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PromptCache:
    """Per-layer KV caches plus the token ids they hold (see the module docstring)."""

    def __init__(self, caches: List, make=None):
        self.caches = caches
        self.tokens: List[int] = []
        self.make = make  # builds fresh caches of the same kinds, for `clear`

    # ------------------------------------------------------------------ state

    @property
    def trimmable(self) -> bool:
        return all(c.is_trimmable() for c in self.caches)

    def clear(self) -> None:
        if self.make is None:
            raise RuntimeError("this PromptCache cannot rebuild its caches")
        self.caches = self.make()
        self.tokens = []

    def trim_to(self, n: int) -> bool:
        """Keep the first n tokens; False (and nothing changed) when a layer cannot be trimmed."""
        if n >= len(self.tokens):
            return True
        if not self.trimmable:
            return False
        for c in self.caches:
            c.trim(c.offset - n)
        self.tokens = self.tokens[:n]
        return True

    def repair(self) -> None:
        """Bring every layer back to `len(tokens)` after an interrupted forward pass (or empty the cache)."""
        n = len(self.tokens)
        if all(c.offset == n for c in self.caches):
            return
        if all(c.offset >= n for c in self.caches) and self.trimmable:
            for c in self.caches:
                c.trim(c.offset - n)
        else:
            self.clear()

    def reuse(self, prompt_ids: Sequence[int]) -> int:
        """Trim to the longest common prefix with `prompt_ids` (leaving at least one prompt token to feed,
        whose logits give the first new token); return how many prompt tokens the cache already holds."""
        keep = min(common_prefix(self.tokens, prompt_ids), len(prompt_ids) - 1)
        if keep < len(self.tokens) and not self.trim_to(keep):
            self.clear()
            return 0
        return keep

    @property
    def nbytes(self) -> int:
        return sum(int(getattr(c, "nbytes", 0)) for c in self.caches)

    # ------------------------------------------------------------------ files

    def save(self, path, *, fingerprint: str, kind: str, extra: Optional[dict] = None) -> None:
        """Write the cache and its metadata to `path` (a .safetensors file), atomically."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise SourceError(f"{path}: cache files are safetensors; give the file name a .safetensors suffix.")
        metadata = {"format": FORMAT, "kind": kind, "model_fingerprint": fingerprint,
                    "tokens": json.dumps(self.tokens), "extra": json.dumps(extra or {})}
        mx.eval([c.state for c in self.caches if not c.empty()])
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        try:
            if any(c.empty() for c in self.caches):
                raise SourceError("nothing to save: the cache is empty (generate or send a message first).")
            save_prompt_cache(tmp, self.caches, metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path, *, fingerprint: str, kind: str):
        """(PromptCache, extra metadata) from a file written by `save`; SourceError for another model or kind."""
        path = Path(path)
        if not path.is_file():
            raise SourceError(f"{path}: no such cache file.")
        try:
            caches, metadata = load_prompt_cache(str(path), return_metadata=True)
        except Exception as e:  # not safetensors, or not a cache layout
            raise SourceError(f"{path} is not an mlxedge cache file ({type(e).__name__}: {e}).") from None
        if metadata.get("format") != FORMAT:
            raise SourceError(f"{path} is not an mlxedge cache file (format {metadata.get('format')!r}).")
        if metadata.get("kind") != kind:
            raise SourceError(f"{path} holds a {metadata.get('kind')} cache, not a {kind}; "
                              f"use the command that made it.")
        if metadata.get("model_fingerprint") != fingerprint:
            raise SourceError(f"{path} was saved with another model (fingerprint {metadata.get('model_fingerprint')}, "
                              f"this model is {fingerprint}); load the model it was made with "
                              "(same checkpoint, bits and dtype).")
        for c in caches:  # quantized layers come back as lists; mlx-lm builds them as tuples
            if isinstance(getattr(c, "keys", None), list):
                c.keys, c.values = tuple(c.keys), tuple(c.values)
        cache = cls(caches)
        cache.tokens = [int(t) for t in json.loads(metadata["tokens"])]
        if any(c.offset != len(cache.tokens) for c in caches):
            raise SourceError(f"{path} is inconsistent: its layers do not hold {len(cache.tokens)} tokens.")
        return cache, json.loads(metadata.get("extra") or "{}")
