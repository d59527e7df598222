"""Custom Metal kernels for quantized matmuls: their sources, runners and per-shape launchers.

Imports only mlx and knows nothing about models. mlxedge.kernels decides, once per layer at load, whether
a layer runs a launcher from here (`QMVLauncher`, `GateUpLauncher`) or MLX's built-in; `supported` says
which weights the kernels handle. A runner (`MetalRunner`, or a test's emulator) executes the kernels.
"""

from .dispatch import GateUpLauncher, QMVLauncher, builtin_qmv, supported, swiglu
from .runner import MetalRunner, metal_available

__all__ = ["QMVLauncher", "GateUpLauncher", "supported", "builtin_qmv", "swiglu", "MetalRunner",
           "metal_available"]
