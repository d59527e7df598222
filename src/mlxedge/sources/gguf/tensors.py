"""One GGUF tensor's route into the Checkpoint: its Hugging Face name, how it is converted, what it yields.

NaN or infinite scales, biases and float weights are refused by loading.py, for every source alike.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np
from gguf import GGMLQuantizationType as T

from ...errors import UnsupportedError
from ..checkpoint import TensorInfo
from . import blocks as gb
from .names import check_permutable, permuted_heads, unpermute_rows
from .reader import GGUFTensor, quote


def check_type(t: GGUFTensor, file_name: str) -> None:
    """Refuse, naming the tensor, any block type mlxedge cannot read."""
    if t.qtype not in gb.SUPPORTED_TYPES:
        raise UnsupportedError(f"tensor {quote(t.name)} in {file_name} has block type {t.qtype.name}, which mlxedge "
                               f"cannot read; supported: {', '.join(x.name for x in gb.SUPPORTED_TYPES)}")


class TensorPlan:
    """How one GGUF tensor becomes Checkpoint tensors (a float array, or an MLX affine triplet)."""

    def __init__(self, tensor: GGUFTensor, name: str, arch: str, cfg: dict, dequantize: bool = False):
        """dequantize: yield every tensor as float32 decoded by gguf's own dequantizer (exact for every block
        type, Q6_K/Q3_K/Q2_K included) instead of an MLX affine triplet."""
        self.tensor = tensor
        self.name = name
        self.qtype = tensor.qtype
        self.rows_first = tensor.rows_first
        self.permute_heads = permuted_heads(arch, tensor.name, cfg)
        if self.permute_heads is not None:
            check_permutable(tensor.name, self.rows_first[0], self.permute_heads)
        self.norm_shift = arch == "gemma3" and tensor.name.endswith("norm.weight")
        self.dequantize = dequantize
        self.affine = (not dequantize and self.qtype not in gb.FLOAT_TYPES and len(self.rows_first) == 2
                       and name.endswith(".weight"))
        self.module = name[: -len(".weight")] if name.endswith(".weight") else None

    @property
    def exact(self) -> bool:
        """Whether the yielded values equal gguf's dequantizer (float types, exact affine types, rare 1-D quants)."""
        return not (self.affine and self.qtype in gb.REQUANT_TYPES)

    def bits(self) -> int:
        return gb.EXACT_BITS.get(self.qtype, gb.REQUANT_BITS)

    def float_dtype(self) -> str:
        if self.norm_shift or self.qtype not in gb.FLOAT_TYPES:
            return "float32"
        return {T.F32: "float32", T.F16: "float16", T.BF16: "bfloat16"}[self.qtype]

    def infos(self) -> List[Tuple[str, TensorInfo]]:
        if self.affine:
            rows, cols = self.rows_first
            groups = cols // gb.GROUP
            words = cols * self.bits() // 32
            return [(f"{self.module}.weight", TensorInfo((rows, words), "uint32", rows * words * 4)),
                    (f"{self.module}.scales", TensorInfo((rows, groups), "float32", rows * groups * 4)),
                    (f"{self.module}.biases", TensorInfo((rows, groups), "float32", rows * groups * 4))]
        dtype = self.float_dtype()
        n = int(np.prod(self.rows_first))
        return [(self.name, TensorInfo(self.rows_first, dtype, n * np.dtype(
            "uint16" if dtype == "bfloat16" else dtype).itemsize))]

    def produce(self) -> Tuple[List[Tuple[str, Any]], Optional[float]]:
        """The tensors to yield, and the largest deviation from gguf's dequantizer (None when exact)."""
        import mlx.core as mx
        from gguf.quants import dequantize

        data = self.tensor.data
        if self.affine:
            if self.permute_heads:
                data = unpermute_rows(data, self.permute_heads)
            with np.errstate(all="ignore"):
                a = gb.to_affine(data, self.qtype)
            return ([(f"{self.module}.weight", mx.array(a.weight)), (f"{self.module}.scales", mx.array(a.scales)),
                     (f"{self.module}.biases", mx.array(a.biases))], None if a.exact else a.max_abs_deviation)
        if self.qtype == T.BF16:
            values = (np.asarray(data).astype(np.uint32) << 16).view(np.float32)
        elif self.qtype in (T.F32, T.F16):
            values = np.asarray(data)
        else:  # dequantizing on request, or a quantized non-matrix (rare): gguf's own dequantizer, as float32
            with np.errstate(all="ignore"):
                values = dequantize(np.asarray(data), self.qtype).reshape(self.rows_first)
        if self.permute_heads:
            values = unpermute_rows(values, self.permute_heads)
        if self.norm_shift:
            values = values.astype(np.float32) - 1.0
        arr = mx.array(np.ascontiguousarray(values))
        if self.qtype == T.BF16 and not self.norm_shift:
            arr = arr.astype(mx.bfloat16)
        return [(self.name, arr)], None
