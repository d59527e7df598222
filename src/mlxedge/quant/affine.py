"""Quantization settings: what mlxedge will quantize to, and the checks that refuse anything else."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Optional

from ..errors import QuantizationError

LOAD_BITS = (4, 8)            # what mlxedge quantizes to while loading or converting
READ_BITS = (2, 3, 4, 5, 6, 8)  # what MLX's affine layout can hold (pre-quantized checkpoints)
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantSpec:
    """One module's quantization: bits per weight and elements per (scale, bias) group."""

    bits: int
    group_size: int

    def to_config(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits}


def validate_settings(bits, group_size) -> QuantSpec | None:
    """Check user-requested settings; None means keep float (or keep the checkpoint's quantization)."""
    if bits is None or bits in (16, 32):
        return None
    if bits not in LOAD_BITS:
        raise QuantizationError(f"bits={bits} is not supported; use 4 or 8 (or 16 for no quantization).")
    if group_size not in GROUP_SIZES:
        raise QuantizationError(f"group_size={group_size} is not supported; use 32, 64 or 128.")
    return QuantSpec(bits=int(bits), group_size=int(group_size))


def can_quantize(input_dims: int, spec: QuantSpec) -> bool:
    """MLX quantizes along the input dimension, in whole groups."""
    return input_dims % spec.group_size == 0


def packed_width(input_dims: int, bits: int) -> int:
    """uint32 words per row of a packed weight."""
    return input_dims * bits // 32


def predominant_spec(specs: Mapping[str, QuantSpec]) -> Optional[QuantSpec]:
    """The spec most modules use (a tie goes to the first module's order); None when nothing is quantized."""
    counts = Counter(specs.values()).most_common(1)
    return counts[0][0] if counts else None


def quantization_summary(specs: Mapping[str, QuantSpec]) -> dict:
    """Per-module specs in plain, fixed types, for `Model.info` and convert's summary.

    bits / group_size: the predominant spec's (int), None when nothing is quantized;
    quantization: every distinct spec with its module count, most used first ([] when nothing is quantized):
    [{"bits": 4, "group_size": 32, "modules": 210}, {"bits": 8, "group_size": 32, "modules": 1}].
    """
    main = predominant_spec(specs)
    return {"bits": main.bits if main else None, "group_size": main.group_size if main else None,
            "quantization": [{"bits": spec.bits, "group_size": spec.group_size, "modules": n}
                             for spec, n in Counter(specs.values()).most_common()]}
