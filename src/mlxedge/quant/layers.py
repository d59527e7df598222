"""The matmul layers whose kernel is bound at load: quantized Linear and Embedding, and float wrappers.

Each holds, besides its parameters, the callables a `kernels.Binding` gave it: `_decode` for inputs of at
most `_decode_size` elements (the binding's decode rows × K) and `_prefill` beyond — so a call is one
integer compare and one call. Unbound, they run MLX's built-ins. The quantized ones subclass MLX's
quantized layers so mlx-lm code that checks for them (tied embeddings' `as_linear`, parameter counting)
keeps working, and hold the same parameters (weight, scales, biases[, bias]) so files round-trip with
mlx-lm. `BoundLinear` / `BoundEmbedding` stand in for nn.Linear / nn.Embedding only where a float layer is
bound to a kernel other than the built-in (quant/binding.py swaps them in and out).
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from .affine import QuantSpec, packed_width


def _bind(layer, binding, k: int) -> None:
    layer._decode, layer._prefill = binding.decode, binding.prefill
    layer._decode_size = binding.decode_rows * k
    layer._backends = (binding.backend, binding.prefill_backend)


def _bind_builtin_quantized(layer) -> None:
    builtin = partial(mx.quantized_matmul, transpose=True, group_size=layer.group_size, bits=layer.bits)
    layer._decode = layer._prefill = builtin
    layer._decode_size = 0
    layer._backends = ("builtin", "builtin")


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
        _bind_builtin_quantized(self)

    def bind(self, binding) -> None:
        _bind(self, binding, self["weight"].shape[1] * 32 // self.bits)

    def __call__(self, x: mx.array) -> mx.array:
        fn = self._decode if x.size <= self._decode_size else self._prefill
        y = fn(x, self["weight"], self["scales"], self["biases"])
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
        _bind_builtin_quantized(self)

    def bind(self, binding) -> None:
        _bind(self, binding, self.dims)

    def __call__(self, ids: mx.array) -> mx.array:
        return mx.dequantize(self["weight"][ids], self["scales"][ids], self["biases"][ids],
                             group_size=self.group_size, bits=self.bits)

    def as_linear(self, x: mx.array) -> mx.array:
        fn = self._decode if x.size <= self._decode_size else self._prefill
        return fn(x, self["weight"], self["scales"], self["biases"])


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """`new` takes `old`'s parameters (the same arrays), training flag and frozen set."""
    for key, value in old.items():
        new[key] = value
    new.train(old.training)
    new._no_grad = set(old._no_grad)
    return new


class _FloatBound:
    """wrap / unbound / bind shared by the float stand-ins; `base` is the MLX class they stand in for."""

    base = nn.Module

    @classmethod
    def wrap(cls, layer: nn.Module):
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        return _adopt(new, layer)

    def unbound(self) -> nn.Module:
        plain = self.base.__new__(self.base)
        nn.Module.__init__(plain)
        return _adopt(plain, self)

    def bind(self, binding) -> None:
        _bind(self, binding, self["weight"].shape[1])


class BoundLinear(_FloatBound, nn.Linear):
    """nn.Linear whose x @ W.T runs a bound kernel; `unbound()` gives back a plain nn.Linear."""

    base = nn.Linear

    def __call__(self, x: mx.array) -> mx.array:
        fn = self._decode if x.size <= self._decode_size else self._prefill
        y = fn(x, self["weight"])
        if "bias" in self:
            y = y + self["bias"]
        return y


class BoundEmbedding(_FloatBound, nn.Embedding):
    """nn.Embedding whose `as_linear` (a tied float head) runs a bound kernel."""

    base = nn.Embedding

    def as_linear(self, x: mx.array) -> mx.array:
        fn = self._decode if x.size <= self._decode_size else self._prefill
        return fn(x, self["weight"])
