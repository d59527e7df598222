"""Group-wise affine quantization: settings validation, quantized layers, and the per-module recipe."""

from .affine import QuantSpec, validate_settings
from .layers import QuantizedEmbedding, QuantizedLinear

__all__ = ["QuantSpec", "validate_settings", "QuantizedLinear", "QuantizedEmbedding"]
