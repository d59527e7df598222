"""The single entry point for every quantized matmul in mlxedge: custom Metal kernel or MLX built-in.

`choose_kernel` decides per call from the mode (MLXEDGE_KERNELS=builtin|custom|auto, default auto), the
shape (only 1..8 activation rows — decode and small batches — go to the custom GEMV kernels; prefill goes
to MLX's matrix kernels), what the kernels support (4/8 bits, groups 32/64/128, float16/bfloat16/float32),
and whether the kernel runner can run here. `auto` takes the custom kernel only where a one-time
measurement on this device showed it faster (selection.py). Where Metal is absent nothing raises: every
mode ends on the built-in, unless a test installed another runner with `set_kernel_runner`.
"""

from __future__ import annotations

import os
import warnings
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .runner import MetalRunner
from .selection import Selector

MODES = ("builtin", "custom", "auto")
ENV_VAR = "MLXEDGE_KERNELS"
CUSTOM, BUILTIN = "custom", "builtin"
KERNEL_DTYPES = (mx.float16, mx.bfloat16, mx.float32)

_runner = MetalRunner()
_selector = None
_warned_modes = set()


def set_kernel_runner(runner):
    """Install what executes custom kernels (default: MetalRunner); returns the previous one."""
    global _runner
    previous, _runner = _runner, runner
    return previous


def set_selector(selector):
    """Install the per-device selection cache `auto` consults; returns the previous one."""
    global _selector
    previous, _selector = _selector, selector
    return previous


def _get_selector() -> Selector:
    global _selector
    if _selector is None:
        _selector = Selector()
    return _selector


def kernel_mode() -> str:
    """The MLXEDGE_KERNELS mode; an unknown value warns once and means auto."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        if mode not in _warned_modes:
            _warned_modes.add(mode)
            warnings.warn(f"{ENV_VAR}={mode!r} is not one of {', '.join(MODES)}; using auto")
        return "auto"
    return mode


def _supported(x: mx.array, quantized: list, group_size: int, bits: int) -> bool:
    """Whether the custom kernels handle this call (shape, dtypes, layout)."""
    if bits not in kernels.SUPPORTED_BITS or group_size not in kernels.SUPPORTED_GROUP_SIZES:
        return False
    if x.ndim < 1 or x.dtype not in KERNEL_DTYPES:
        return False
    k = x.shape[-1]
    rows = x.size // k if k else 0
    if not 1 <= rows <= kernels.MAX_ROWS or k % group_size:
        return False
    first = quantized[0][0]
    for w, scales, biases in quantized:
        if w.dtype != mx.uint32 or w.ndim != 2 or w.shape != first.shape or w.shape[1] * 32 != k * bits:
            return False
        if biases is None or scales.dtype != x.dtype or biases.dtype != x.dtype:
            return False
        if scales.shape != (w.shape[0], k // group_size) or biases.shape != scales.shape:
            return False
    return True


def _launch(kernel, x: mx.array, quantized: list, group_size: int, bits: int) -> mx.array:
    k, n = x.shape[-1], quantized[0][0].shape[0]
    rows = x.size // k
    inputs = [x.reshape(rows, k)]
    for triplet in quantized:
        inputs.extend(triplet)
    geometry = kernels.launch(kernel, n, k, bits, group_size, rows, x.dtype)
    y = _runner(kernel, inputs=inputs, output_shapes=[(rows, n)], output_dtypes=[x.dtype], **geometry)[0]
    return y.reshape(*x.shape[:-1], n)


def _selection_key(op: str, x: mx.array, w: mx.array, group_size: int, bits: int) -> str:
    k = x.shape[-1]
    return f"{op}:bits{bits}:group{group_size}:{str(x.dtype).split('.')[-1]}:rows{x.size // k}:n{w.shape[0]}:k{k}"


def choose_kernel(op: str, x: mx.array, quantized: list, *, group_size: int, bits: int, builtin_fn=None) -> str:
    """'custom' or 'builtin' for one call of `op` ('qmv' or 'gate_up'); never raises for lack of Metal.

    builtin_fn(x) -> array computes the built-in side; auto mode needs it to measure a shape on first sight
    (without it, auto only reads verdicts already measured).
    """
    mode = kernel_mode()
    if mode == BUILTIN or not _supported(x, quantized, group_size, bits):
        return BUILTIN
    try:
        if not _runner.available():
            return BUILTIN
    except Exception:
        return BUILTIN
    if mode == CUSTOM:
        return CUSTOM
    kernel = kernels.QMV if op == "qmv" else kernels.GATE_UP
    key = _selection_key(op, x, quantized[0][0], group_size, bits)
    if builtin_fn is None:
        return CUSTOM if _get_selector().lookup(_runner.device_key, key) else BUILTIN
    probe = []  # random activations of this shape, made only if a measurement runs

    def probe_x():
        if not probe:
            probe.append(mx.random.normal(x.shape, key=mx.random.key(0)).astype(x.dtype))
        return probe[0]

    prefers = _get_selector().prefers_custom(
        _runner.device_key, key,
        lambda: _launch(kernel, probe_x(), quantized, group_size, bits),
        lambda: builtin_fn(probe_x()))
    return CUSTOM if prefers else BUILTIN


def _builtin_qmv(x, w, scales, biases, group_size, bits):
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


@partial(mx.compile, shapeless=True)
def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, the same compiled graph as mlx-lm's swiglu (so the built-in path is bit-identical)."""
    return nn.silu(gate) * up


def quantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *,
                     group_size: int, bits: int) -> mx.array:
    """x @ dequantize(w).T for MLX's affine layout (w: [out, in*bits/32] uint32)."""
    triplet = [(w, scales, biases)]
    path = choose_kernel("qmv", x, triplet, group_size=group_size, bits=bits,
                         builtin_fn=lambda p: _builtin_qmv(p, w, scales, biases, group_size, bits))
    if path == CUSTOM:
        return _launch(kernels.QMV, x, triplet, group_size, bits)
    return _builtin_qmv(x, w, scales, biases, group_size, bits)


def _builtin_gated(x, gate, up, group_size, bits):
    g = quantized_matmul(x, *gate, group_size=group_size, bits=bits)
    u = quantized_matmul(x, *up, group_size=group_size, bits=bits)
    return _swiglu(g, u)


def gated_mlp(x: mx.array, gate: tuple, up: tuple, *, group_size: int, bits: int) -> mx.array:
    """silu(x @ Wg.T) * (x @ Wu.T) for two quantized weights given as (w, scales, biases) triplets."""
    pair = [tuple(gate), tuple(up)]
    path = choose_kernel("gate_up", x, pair, group_size=group_size, bits=bits,
                         builtin_fn=lambda p: _swiglu(_builtin_qmv(p, *gate, group_size, bits),
                                                      _builtin_qmv(p, *up, group_size, bits)))
    if path == CUSTOM:
        return _launch(kernels.GATE_UP, x, pair, group_size, bits)
    return _builtin_gated(x, gate, up, group_size, bits)
