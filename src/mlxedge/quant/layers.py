"""Quantized Linear and Embedding layers whose matmuls go through mlxedge.metal's single entry point.

They subclass MLX's quantized layers so mlx-lm code that checks for them (tied embeddings' `as_linear`,
parameter counting) keeps working, and they hold the same parameters (weight, scales, biases[, bias]) so
files round-trip with mlx-lm.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..metal import quantized_matmul
from .affine import QuantSpec, packed_width


class QuantizedLinear(nn.QuantizedLinear):
    """y = x @ dequantize(W).T (+ bias), with W in MLX's affine layout."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool, spec: QuantSpec, dtype=mx.float16):
        nn.Module.__init__(self)  # parameters are assigned by the loader; no random init to quantize
        self.group_size, self.bits, self.mode = spec.group_size, spec.bits, "affine"
        groups = input_dims // spec.group_size
        self.weight = mx.zeros((output_dims, packed_width(input_dims, spec.bits)), dtype=mx.uint32)
        self.scales = mx.zeros((output_dims, groups), dtype=dtype)
        self.biases = mx.zeros((output_dims, groups), dtype=dtype)
        if bias:
            self.bias = mx.zeros((output_dims,), dtype=dtype)
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_matmul(x, self["weight"], self["scales"], self["biases"],
                             group_size=self.group_size, bits=self.bits)
        if "bias" in self:
            y = y + self["bias"]
        return y


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """Token embedding stored quantized; rows are dequantized on lookup, `as_linear` serves tied heads."""

    def __init__(self, num_embeddings: int, dims: int, spec: QuantSpec, dtype=mx.float16):
        nn.Module.__init__(self)
        self.group_size, self.bits, self.mode = spec.group_size, spec.bits, "affine"
        self.num_embeddings, self.dims = num_embeddings, dims
        groups = dims // spec.group_size
        self.weight = mx.zeros((num_embeddings, packed_width(dims, spec.bits)), dtype=mx.uint32)
        self.scales = mx.zeros((num_embeddings, groups), dtype=dtype)
        self.biases = mx.zeros((num_embeddings, groups), dtype=dtype)
        self.freeze()

    def __call__(self, ids: mx.array) -> mx.array:
        return mx.dequantize(self["weight"][ids], self["scales"][ids], self["biases"][ids],
                             group_size=self.group_size, bits=self.bits)

    def as_linear(self, x: mx.array) -> mx.array:
        return quantized_matmul(x, self["weight"], self["scales"], self["biases"],
                                group_size=self.group_size, bits=self.bits)
