"""Test data for the kernels: random packed weights in MLX's affine layout and independent references.

Weights are random uint32 words (every word is a valid packing at 4 and 8 bits), scales of both signs,
random biases; the reference dequantizes with `mx.dequantize` in float32 and multiplies in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import mlx.core as mx

from mlxedge.metal import kernels

TOLERANCE = {mx.float32: 2e-5, mx.float16: 4e-3, mx.bfloat16: 2e-2}  # relative to max |reference|


@dataclass(frozen=True)
class Case:
    """One kernel call: rows of activations M, outputs N, inputs K."""

    m: int
    n: int
    k: int
    bits: int
    group_size: int
    dtype: object

    def __str__(self):
        return f"M{self.m}-N{self.n}-K{self.k}-b{self.bits}-g{self.group_size}-{str(self.dtype).split('.')[-1]}"

    @property
    def aligned(self) -> bool:
        return self.k % kernels.block_size(self.bits) == 0


def quantized_weight(n: int, k: int, bits: int, group_size: int, dtype, seed: int):
    rng = np.random.default_rng(seed)
    w = mx.array(rng.integers(0, 2**32, size=(n, k * bits // 32), dtype=np.uint32))
    scales = mx.array(rng.uniform(-0.05, 0.05, size=(n, k // group_size)).astype(np.float32)).astype(dtype)
    biases = mx.array(rng.normal(0, 0.3, size=(n, k // group_size)).astype(np.float32)).astype(dtype)
    return w, scales, biases


def activations(case: Case, seed: int) -> mx.array:
    rng = np.random.default_rng(seed)
    return mx.array(rng.normal(0, 1, size=(case.m, case.k)).astype(np.float32)).astype(case.dtype)


def reference_matmul(x, w, scales, biases, group_size, bits) -> mx.array:
    dense = mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group_size,
                          bits=bits)
    return x.astype(mx.float32) @ dense.T


def reference_gate_up(x, gate, up, group_size, bits) -> mx.array:
    g = reference_matmul(x, *gate, group_size, bits)
    u = reference_matmul(x, *up, group_size, bits)
    return g * mx.sigmoid(g) * u


def max_relative_error(got: mx.array, want: mx.array) -> float:
    got = got.astype(mx.float32)
    if not bool(mx.all(mx.isfinite(got)).item()):
        return float("inf")
    scale = max(float(mx.max(mx.abs(want)).item()), 1e-6)
    return float(mx.max(mx.abs(got - want)).item()) / scale


def run_qmv(runner, case: Case, kernel=kernels.QMV, seed: int = 0):
    """(kernel output, reference) for one QMV case."""
    w, s, b = quantized_weight(case.n, case.k, case.bits, case.group_size, case.dtype, seed)
    x = activations(case, seed + 1)
    geometry = kernels.launch(kernels.QMV, case.n, case.k, case.bits, case.group_size, case.m, case.dtype)
    y = runner(kernel, inputs=[x, w, s, b], output_shapes=[(case.m, case.n)], output_dtypes=[case.dtype],
               **geometry)[0]
    return y, reference_matmul(x, w, s, b, case.group_size, case.bits)


def run_gate_up(runner, case: Case, kernel=kernels.GATE_UP, seed: int = 0):
    """(kernel output, reference) for one fused gate·up case."""
    gate = quantized_weight(case.n, case.k, case.bits, case.group_size, case.dtype, seed)
    up = quantized_weight(case.n, case.k, case.bits, case.group_size, case.dtype, seed + 7)
    x = activations(case, seed + 1)
    geometry = kernels.launch(kernels.GATE_UP, case.n, case.k, case.bits, case.group_size, case.m, case.dtype)
    y = runner(kernel, inputs=[x, *gate, *up], output_shapes=[(case.m, case.n)], output_dtypes=[case.dtype],
               **geometry)[0]
    return y, reference_gate_up(x, gate, up, case.group_size, case.bits)
