"""Quantized matmul dispatch: our custom Metal kernels where they run and win, MLX built-ins otherwise.

Imports only mlx. The rest of mlxedge calls `quantized_matmul` (and `gated_mlp`) and nothing else here.
"""

from .dispatch import gated_mlp, quantized_matmul

__all__ = ["quantized_matmul", "gated_mlp"]
