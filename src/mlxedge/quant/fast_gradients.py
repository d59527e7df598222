"""Backward passes through a float model on the device's fast matmul, for the calibration measurements.

Target-bpw recipes need one backward pass per calibration chunk (sensitivity.fisher_diagonal) and data-aware
scales one forward pass (weighted.collect_importance), all on the float model. On MLX's CPU build a float
GEMM runs the reference BLAS bundled in the wheel (about 2 GFLOP/s here), so Gemma 3 270M's 262k-token head
alone took minutes per chunk. `fast_gradients(model, choice)` swaps every float Linear (and a tied embedding's
head product) for one whose forward x·Wᵀ and both backward products (dx = g·W, dW = gᵀ·x) run the kernel the
KernelChoice binds for that weight — the native OpenBLAS path on a CPU, MLX's built-in where that wins — and
puts the original modules back afterwards. The parameters are the same arrays under the same names, so the
gradient tree is unchanged; the products are the same up to float summation order.
"""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten


def _differentiable(fn):
    """fn(a, b) = a·bᵀ as an MLX function with its vector-Jacobian product computed by fn too."""

    @mx.custom_function
    def linear(x, w):
        return fn(x, w)

    @linear.vjp
    def linear_vjp(primals, cotangent, output):
        x, w = primals
        g2 = cotangent.reshape(-1, cotangent.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        dx = fn(g2, mx.contiguous(w.T)).reshape(x.shape)            # g·W
        dw = fn(mx.contiguous(g2.T), mx.contiguous(x2.T))            # gᵀ·x
        return dx.astype(x.dtype), dw.astype(w.dtype)

    return linear


class GradLinear(nn.Linear):
    """nn.Linear computing x·Wᵀ (+ b) with `product`, gradients included."""

    def __call__(self, x):
        y = self._product(x, self["weight"])
        return y + self["bias"] if "bias" in self else y


class GradEmbedding(nn.Embedding):
    """nn.Embedding whose tied-head product `as_linear` runs `product`, gradients included."""

    def as_linear(self, x):
        return self._product(x, self["weight"])


def _adopt(cls, old: nn.Module, product):
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for key, value in old.items():
        new[key] = value
    new.train(old.training)
    object.__setattr__(new, "_product", product)  # a function, not a parameter or child module
    return new


@contextmanager
def fast_gradients(model: nn.Module, choice):
    """Within the block, `model`'s float Linear layers and tied head differentiate through `choice`'s kernels."""
    tied = "lm_head" not in model
    originals, swaps = [], []
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear) and not isinstance(m, nn.QuantizedLinear):
            product = _differentiable(choice.linear(m["weight"]).prefill)
            swaps.append((path, _adopt(GradLinear, m, product)))
        elif tied and isinstance(m, nn.Embedding) and not isinstance(m, nn.QuantizedEmbedding):
            product = _differentiable(choice.linear(m["weight"]).prefill)
            swaps.append((path, _adopt(GradEmbedding, m, product)))
        else:
            continue
        originals.append((path, m))
    model.update_modules(tree_unflatten(swaps))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten(originals))
