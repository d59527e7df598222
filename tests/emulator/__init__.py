"""A CPU emulator for the Metal kernels mlxedge passes to `mx.fast.metal_kernel` (see README.md).

signature.py writes the source MLX would compile; harness.py compiles it with g++ against metal_shim.h and
runs it on guarded buffers; runner.py is handed to `mlxedge.kernels.KernelChoice(metal_runner=...)`; cases.py
holds random affine-quantized test data and float32 references.
"""
