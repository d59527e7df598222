"""Quantization settings: what mlxedge will quantize to, and the checks that refuse anything else."""

from __future__ import annotations

from dataclasses import dataclass

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
