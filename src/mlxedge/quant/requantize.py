"""No silent quality loss: what each module becomes when quantized weights are asked for a new grid.

A module stored quantized (a GGUF's Q4_1, an mlx-lm 4-bit file) already lost precision once. Putting it
on a coarser grid — fewer bits, or a larger group spanning groups that had their own scales — loses
more, on top, and can turn a good model into gibberish (SmolLM2's Q4_1 g32 with its 8-bit embedding,
re-quantized to 4-bit g64: "Abe no kokoro, a kokoro no kokoro…"). So:

- a coarser grid for an already-quantized module is refused (one-line QuantizationError naming the
  stored precision and the two ways on) unless `allow_requantize` is given;
- embeddings and output heads keep their stored precision when the request is coarser for them alone
  (the rest of the model is re-gridded as asked; the summary lists them);
- an equal or finer grid is fine (4-bit g32 onto 8-bit g32 is exact), and float modules are quantized
  as asked;
- with no group size given, a quantized source's own group size is used (64 for float sources).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..errors import QuantizationError
from .affine import QuantSpec, can_quantize

DEFAULT_GROUP_SIZE = 64
HEAD_NAMES = ("lm_head", "output")
EMBEDDING_NAMES = ("embed_tokens", "wte", "tok_embeddings")


def default_group_size(group_size: Optional[int], stored_quantization: Optional[dict]) -> int:
    """The group size to use: as given, else the source's own (quantized sources), else 64."""
    if group_size is not None:
        return int(group_size)
    if stored_quantization and stored_quantization.get("group_size"):
        return int(stored_quantization["group_size"])
    return DEFAULT_GROUP_SIZE


def is_coarser(requested: QuantSpec, stored: QuantSpec) -> bool:
    """Fewer bits, or a larger group at no more bits. (More bits over a larger group, e.g. 8-bit g64 over
    4-bit g32, is not: the 8-bit grid's step is ~1/17 of the 4-bit one, so every stored value lands within
    a few percent of a 4-bit step.)"""
    if requested.bits < stored.bits:
        return True
    return requested.group_size > stored.group_size and requested.bits <= stored.bits


def is_embedding_or_head(path: str, is_embedding: bool) -> bool:
    return is_embedding or path.rsplit(".", 1)[-1] in HEAD_NAMES + EMBEDDING_NAMES


def planned_target(stored: tuple, bits: Optional[int], group_size: int, path: str) -> tuple:
    """(bits, group) a module stored at `stored` ends up with at these settings, for the memory plan
    (the loader's choose_targets decides the same, by module class rather than by name)."""
    if bits is None:
        return stored
    if is_coarser(QuantSpec(bits, group_size), QuantSpec(*stored)) and is_embedding_or_head(path, False):
        return stored
    return bits, group_size


@dataclass
class Targets:
    """module path -> QuantSpec it ends up with; the float leftovers; what was kept or re-gridded coarser."""

    specs: Dict[str, QuantSpec] = field(default_factory=dict)
    unquantized: List[str] = field(default_factory=list)
    kept_stored: List[str] = field(default_factory=list)  # embeddings/heads kept at their stored precision
    requantized_coarser: List[str] = field(default_factory=list)  # only with allow_requantize


def choose_targets(modules: dict, stored: dict, requested: Optional[QuantSpec],
                   allow_requantize: bool = False) -> Targets:
    """modules: path -> (input_dims, is_embedding); stored: path -> QuantSpec of modules stored quantized."""
    out = Targets()
    if requested is None:  # keep everything as stored
        out.specs = {path: stored[path] for path in modules if path in stored}
        return out
    refused = []
    for path, (input_dims, is_embedding) in modules.items():
        source = stored.get(path)
        if source is not None and is_coarser(requested, source):
            if allow_requantize:
                out.requantized_coarser.append(path)
            elif is_embedding_or_head(path, is_embedding):
                out.specs[path] = source
                out.kept_stored.append(path)
                continue
            else:
                refused.append((path, source))
                continue
        if can_quantize(input_dims, requested):
            out.specs[path] = requested
        else:
            out.unquantized.append(path)
    if refused:
        (source, _), = Counter(spec for _, spec in refused).most_common(1)
        raise QuantizationError(
            f"{len(refused)} modules (e.g. {refused[0][0]}) are stored quantized at {source.bits}-bit group "
            f"{source.group_size}; {requested.bits}-bit group {requested.group_size} is a coarser grid and would "
            f"quantize them a second time; keep them as stored (no --bits), use --bits {max(requested.bits, source.bits)}"
            f" --group-size {source.group_size}, or pass --allow-requantize to do it and see its measured cost.")
    return out
