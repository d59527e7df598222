"""Quantization recipes: which bits and group size each module gets, instead of one setting for all.

A `Recipe` maps module paths to `QuantSpec`s (None: keep float). It is resolved against the model's
modules once they are built (`assign`), so rules can look at layer indices and shapes. Presets follow
llama.cpp's K-quant mixes (llama-quant.cpp's `llama_tensor_get_type`): the output head (or a tied
embedding) and, on `use_more_bits` layers, attention values and FFN down projections get more bits.
Recipes are written to config.json as mlx-lm's per-module overrides (convert's `_write_config`), so mlx-lm
loads the files and we load theirs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..errors import QuantizationError
from .affine import QuantSpec

PRESETS = ("q3_k_m", "q4_k_m", "q6_k")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's layer pattern for the extra-precision tensors: the first and last eighth, and every
    third layer in between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def layer_index(path: str) -> Optional[int]:
    match = _LAYER.search(path)
    return int(match.group(1)) if match else None


def is_head(path: str, tied: bool) -> bool:
    """The output projection: lm_head, or the token embedding when the head is tied to it."""
    leaf = path.rsplit(".", 1)[-1]
    return leaf == "lm_head" or (tied and leaf in ("embed_tokens", "wte", "tok_embeddings"))


@dataclass
class Recipe:
    """Per-module settings. `rule(path, n_layers, tied) -> QuantSpec | None` decides each module, or
    `specs` lists them outright (e.g. from a sensitivity search). `quantizer`, when set, replaces
    mx.quantize for the modules it knows (data-aware quantization)."""

    name: str
    rule: Optional[Callable] = None
    specs: dict = field(default_factory=dict)
    quantizer: Optional[object] = None
    notes: dict = field(default_factory=dict)

    def assign(self, modules: dict, n_layers: int, tied: bool) -> dict:
        """module path -> QuantSpec or None, for every quantizable module of the built model."""
        if self.rule is None:
            missing = [p for p in modules if p not in self.specs]
            if missing:
                raise QuantizationError(f"recipe {self.name} does not cover module {missing[0]}; it was made for "
                                        "another model.")
            return {p: self.specs[p] for p in modules}
        return {p: self.rule(p, n_layers, tied) for p in modules}

    def max_bits(self) -> int:
        """Highest bits any module may get (the memory plan's conservative setting)."""
        if self.specs:
            return max((s.bits for s in self.specs.values() if s is not None), default=8)
        return max(self.notes.get("bits_used", (8,)))


def _k_mix(base: int, more: int, head: int, group_size: int, value_more: Optional[int] = None):
    """base bits everywhere; `more` for attention values / FFN down on use_more_bits layers; `head` for the
    output; value projections on the other layers get value_more (Q3_K_M raises them a step)."""

    def rule(path: str, n_layers: int, tied: bool) -> QuantSpec:
        if is_head(path, tied):
            return QuantSpec(head, group_size)
        leaf = path.rsplit(".", 1)[-1]
        layer = layer_index(path)
        if layer is not None and leaf in ("v_proj", "down_proj"):
            if use_more_bits(layer, n_layers):
                return QuantSpec(more, group_size)
            if leaf == "v_proj" and value_more:
                return QuantSpec(value_more, group_size)
        return QuantSpec(base, group_size)

    return rule


def preset(name: str, group_size: int = 64) -> Recipe:
    """A named preset: q4_k_m (4-bit, 6-bit values/down on the pattern and head), q3_k_m (3-bit, 5-bit on
    the pattern, 4-bit other values, 6-bit head), q6_k (6-bit, 8-bit head)."""
    key = name.strip().lower().replace("-", "_")
    if key == "q4_k_m":
        return Recipe(key, _k_mix(4, 6, 6, group_size), notes={"bits_used": (4, 6)})
    if key == "q3_k_m":
        return Recipe(key, _k_mix(3, 5, 6, group_size, value_more=4), notes={"bits_used": (3, 4, 5, 6)})
    if key == "q6_k":
        return Recipe(key, _k_mix(6, 6, 8, group_size), notes={"bits_used": (6, 8)})
    raise QuantizationError(f"unknown recipe {name!r}; use one of {', '.join(PRESETS)} (or target_bpw=...).")
