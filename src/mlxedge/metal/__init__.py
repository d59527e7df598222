"""Quantized matmul dispatch: our custom Metal kernels where they run and win, MLX built-ins otherwise.

Imports only mlx. The rest of mlxedge calls `quantized_matmul` and `gated_mlp`; `choose_kernel` and
`kernel_mode` say which path a call takes; `set_kernel_runner` is the seam tests use to run the kernels in
an emulator.
"""

from .dispatch import choose_kernel, gated_mlp, kernel_mode, quantized_matmul, set_kernel_runner

__all__ = ["quantized_matmul", "gated_mlp", "choose_kernel", "kernel_mode", "set_kernel_runner"]
