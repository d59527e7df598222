"""The precisions a benchmark or an evaluation runs: `--bits 16,8,4` (with group size, dtype and
allow_requantize) parsed into `Variant`s, and checked against the source before anything runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from ..errors import MlxedgeError


@dataclass(frozen=True)
class Variant:
    """One precision to benchmark: bits None = unquantized (as stored when dtype is None too)."""

    bits: Optional[int]
    group_size: Optional[int]  # None: the source's own when it is quantized, else 64 (mlxedge.load's rule)
    dtype: Optional[str]
    allow_requantize: bool = False  # may put weights stored quantized onto a coarser grid (quant.requantize)

    @property
    def label(self) -> str:
        if self.bits is None:
            return {None: "as stored", "float32": "f32", "float16": "f16", "bfloat16": "bf16"}.get(self.dtype,
                                                                                                  str(self.dtype))
        return f"q{self.bits} g{self.group_size}" if self.group_size else f"q{self.bits}"

    def load_kwargs(self) -> dict:
        kwargs = {"bits": self.bits, "group_size": self.group_size, "dtype": self.dtype}
        if self.allow_requantize:
            kwargs["allow_requantize"] = True
        return kwargs


DTYPES = ("float32", "float16", "bfloat16")


def parse_variants(bits: Optional[str], group_size: Optional[int] = None, dtype: Optional[str] = None,
                   allow_requantize: bool = False) -> List[Variant]:
    """"16,8,4" → variants. 16 = unquantized in `dtype` (default bfloat16), 32 = float32; 4/8 quantize with
    `group_size`, computing in `dtype` (default: the loader's, float32 without Metal where half-precision
    quantized matmuls are 4-18x slower). None/"" → the model as stored. allow_requantize: quantized variants
    may re-grid weights stored quantized coarser (refused otherwise, see `check_variants`)."""
    if dtype is not None and dtype not in DTYPES:
        raise MlxedgeError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}.")
    if not bits:
        return [Variant(None, group_size, dtype)]
    out = []
    for item in str(bits).split(","):
        item = item.strip().lower()
        if not item:
            continue
        if item in ("16", "bf16", "f16", "fp16"):
            dt = {"bf16": "bfloat16", "f16": "float16", "fp16": "float16"}.get(item, dtype or "bfloat16")
            out.append(Variant(None, group_size, dt))
        elif item in ("32", "f32", "fp32"):
            out.append(Variant(None, group_size, "float32"))
        elif item.isdigit():
            from ..quant.affine import validate_settings

            validate_settings(int(item), group_size or 64)  # raises a QuantizationError naming what is allowed
            out.append(Variant(int(item), group_size, dtype, allow_requantize))
        else:
            raise MlxedgeError(f"--bits {item!r} is not a precision; use a list such as 16,8,4 (32 = float32).")
    if not out:
        raise MlxedgeError("--bits is empty; use a list such as 16,8,4.")
    return list(dict.fromkeys(out))


def check_variants(source, variants: List[Variant]) -> dict:
    """Before anything runs: label -> modules each quantized variant re-grids coarser than stored (only with
    allow_requantize). A variant that would be refused raises its one-line QuantizationError now, not after
    the variants before it have run for minutes."""
    from ..api import check_requantize

    coarser = {}
    for v in variants:
        if v.bits is not None:
            found = check_requantize(source, v.bits, v.group_size, allow_requantize=v.allow_requantize)
            if found["requantized_coarser"]:
                coarser[v.label] = found["requantized_coarser"]
    return coarser

