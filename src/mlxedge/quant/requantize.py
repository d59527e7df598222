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
from typing import Dict, List, Mapping, Optional, Tuple

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


@dataclass
class Targets:
    """module path -> QuantSpec it ends up with; the float leftovers; what was kept or re-gridded coarser."""

    specs: Dict[str, QuantSpec] = field(default_factory=dict)
    unquantized: List[str] = field(default_factory=list)
    kept_stored: List[str] = field(default_factory=list)  # embeddings/heads kept at their stored precision
    requantized_coarser: List[str] = field(default_factory=list)  # only with allow_requantize
    refused: List[Tuple[str, QuantSpec]] = field(default_factory=list)  # (path, stored spec): coarser, not allowed


def decide_targets(modules: dict, stored: dict, requested, allow_requantize: bool = False) -> Targets:
    """What each module becomes; never raises (see `choose_targets` for the refusal).

    modules: path -> (input_dims, is_embedding); stored: path -> QuantSpec of modules stored quantized;
    requested: None (keep everything as stored), one QuantSpec for every module, or path -> QuantSpec | None
    (a recipe resolved against the modules; None keeps that module float). A module refused for a coarser grid
    is listed in `refused` and given the requested grid, the grid the request would put it on: what the memory
    plan sizes, and what the loader refuses to do.
    """
    out = Targets()
    if requested is None:  # keep everything as stored
        out.specs = {path: stored[path] for path in modules if path in stored}
        return out
    for path, (input_dims, is_embedding) in modules.items():
        spec = requested.get(path) if isinstance(requested, Mapping) else requested
        source = stored.get(path)
        if spec is None:
            if source is not None:
                out.specs[path] = source
            continue
        if source is not None and is_coarser(spec, source):
            if allow_requantize:
                out.requantized_coarser.append(path)
            elif is_embedding_or_head(path, is_embedding):
                out.specs[path] = source
                out.kept_stored.append(path)
                continue
            else:
                out.refused.append((path, source))
        if can_quantize(input_dims, spec):
            out.specs[path] = spec
        else:
            out.unquantized.append(path)
    return out


def refusal(targets: Targets, requested) -> Optional[QuantizationError]:
    """The one-line error for the modules `decide_targets` refused, or None when it refused none."""
    refused = targets.refused
    if not refused:
        return None
    if isinstance(requested, Mapping):
        requested = requested[refused[0][0]]
    (source, _), = Counter(spec for _, spec in refused).most_common(1)
    return QuantizationError(
        f"{len(refused)} modules (e.g. {refused[0][0]}) are stored quantized at {source.bits}-bit group "
        f"{source.group_size}; {requested.bits}-bit group {requested.group_size} is a coarser grid and would "
        f"quantize them a second time; keep them as stored (no --bits), use --bits {max(requested.bits, source.bits)}"
        f" --group-size {source.group_size}, or pass --allow-requantize to do it and see its measured cost.")


def choose_targets(modules: dict, stored: dict, requested: Optional[QuantSpec],
                   allow_requantize: bool = False) -> Targets:
    """`decide_targets`, raising QuantizationError when a module stored quantized would go onto a coarser grid."""
    out = decide_targets(modules, stored, requested, allow_requantize)
    error = refusal(out, requested)
    if error is not None:
        raise error
    return out
