"""Launchers: callables that run the custom Metal kernels for one layer's shape, built once at load.

Imports only mlx. `supported(...)` says whether the kernels handle a layer (4/8 bits, groups 32/64/128,
float16/bfloat16/float32 scales, MLX's affine layout); `QMVLauncher` and `GateUpLauncher` are built for one
(N, K, bits, group, dtype) with the launch geometry of every row count 1..MAX_ROWS computed up front, so a
call only indexes a list and calls the runner. Which layer uses a launcher, and for how many rows, is the
kernel choice's business (mlxedge.kernels); this module knows nothing about models. `builtin_qmv` and
`swiglu` are MLX's built-in equivalents, bit-identical to what mlx-lm computes.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from . import kernels

KERNEL_DTYPES = (mx.float16, mx.bfloat16, mx.float32)


def supported(bits: int, group_size: int, w: mx.array, scales: mx.array, biases) -> bool:
    """Whether the custom kernels handle a quantized weight (layout, bits, group, scale dtype)."""
    if bits not in kernels.SUPPORTED_BITS or group_size not in kernels.SUPPORTED_GROUP_SIZES:
        return False
    if biases is None or w.dtype != mx.uint32 or w.ndim != 2 or scales.dtype not in KERNEL_DTYPES:
        return False
    k = w.shape[1] * 32 // bits
    if w.shape[1] * 32 != k * bits or k % group_size:
        return False
    return scales.shape == (w.shape[0], k // group_size) and biases.shape == scales.shape \
        and biases.dtype == scales.dtype


def builtin_qmv(x, w, scales, biases, group_size, bits):
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, the same compiled graph as mlx-lm's swiglu (so the built-in path is bit-identical)."""
    return nn.silu(gate) * up


class _Launcher:
    """Shared state of a launcher: the runner, the shape, and the geometry per activation row count."""

    kernel = None  # a kernels.KernelSource

    def __init__(self, runner, n: int, k: int, bits: int, group_size: int, dtype):
        self.runner, self.n, self.k, self.bits, self.group_size, self.dtype = runner, n, k, bits, group_size, dtype
        # index = rows; entry 0 unused. Template, grid and threadgroup as kernels.launch gives them.
        self.geometry = [None] + [kernels.launch(self.kernel, n, k, bits, group_size, rows, dtype)
                                  for rows in range(1, kernels.MAX_ROWS + 1)]

    def _run(self, x: mx.array, inputs: list) -> mx.array:
        rows = x.size // self.k
        y = self.runner(self.kernel, inputs=[x.reshape(rows, self.k), *inputs], output_shapes=[(rows, self.n)],
                        output_dtypes=[x.dtype], **self.geometry[rows])[0]
        return y.reshape(*x.shape[:-1], self.n)


class QMVLauncher(_Launcher):
    """x @ dequantize(w).T through the QMV kernel, for 1..MAX_ROWS activation rows of the bound dtype."""

    kernel = kernels.QMV

    def __call__(self, x, w, scales, biases):
        if x.dtype != self.dtype:  # the kernel reads activations and scales as one type
            return builtin_qmv(x, w, scales, biases, self.group_size, self.bits)
        return self._run(x, [w, scales, biases])


class GateUpLauncher(_Launcher):
    """silu(x @ Wg.T) * (x @ Wu.T) in one kernel; gate and up are (w, scales, biases) triplets."""

    kernel = kernels.GATE_UP

    def __call__(self, x, gate, up):
        if x.dtype != self.dtype:
            return swiglu(builtin_qmv(x, *gate, self.group_size, self.bits),
                          builtin_qmv(x, *up, self.group_size, self.bits))
        return self._run(x, [*gate, *up])
