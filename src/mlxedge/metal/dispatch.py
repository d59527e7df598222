"""The single entry point for every quantized matmul in mlxedge.

Today both functions call MLX's built-ins; the custom-kernel choice (per device and shape, with the
MLXEDGE_KERNELS override) plugs in here and nowhere else.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def quantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *,
                     group_size: int, bits: int) -> mx.array:
    """x @ dequantize(w).T for MLX's affine layout (w: [out, in*bits/32] uint32)."""
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


def gated_mlp(x: mx.array, gate: tuple, up: tuple, *, group_size: int, bits: int) -> mx.array:
    """silu(x @ Wg.T) * (x @ Wu.T) for two quantized weights given as (w, scales, biases) triplets."""
    g = quantized_matmul(x, *gate, group_size=group_size, bits=bits)
    u = quantized_matmul(x, *up, group_size=group_size, bits=bits)
    return nn.silu(g) * u
