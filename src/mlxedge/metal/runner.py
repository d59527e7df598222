"""Kernel runners: the one seam between dispatch and whatever executes a `KernelSource`.

A runner is called as ``runner(kernel, inputs=..., template=..., grid=..., threadgroup=...,
output_shapes=..., output_dtypes=...)`` and returns the output arrays, exactly like a
`mx.fast.metal_kernel` object. `MetalRunner` is the production one: it builds each kernel once with
`mx.fast.metal_kernel` and caches it. Tests hand an emulator with the same call to
`mlxedge.kernels.KernelChoice(metal_runner=...)`; production code never imports tests.
"""

from __future__ import annotations

import mlx.core as mx


def metal_available() -> bool:
    """True where MLX has a Metal back-end (never raises)."""
    try:
        return bool(mx.metal.is_available())
    except Exception:
        return False


class MetalRunner:
    """Runs kernels on the GPU through `mx.fast.metal_kernel`, each built once per process."""

    def __init__(self):
        self._built = {}
        self._device_key = None

    def available(self) -> bool:
        return metal_available()

    @property
    def device_key(self) -> str:
        """Names the GPU, so measured choices are kept per device."""
        if self._device_key is None:
            try:
                info = mx.metal.device_info()
                self._device_key = str(info.get("device_name") or info.get("architecture") or "metal")
            except Exception:
                self._device_key = "metal"
        return self._device_key

    def build(self, kernel):
        fn = self._built.get(kernel)
        if fn is None:
            fn = mx.fast.metal_kernel(name=kernel.name, input_names=list(kernel.input_names),
                                      output_names=list(kernel.output_names), source=kernel.source,
                                      header=kernel.header)
            self._built[kernel] = fn
        return fn

    def __call__(self, kernel, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes,
                 init_value=None) -> list:
        return self.build(kernel)(inputs=inputs, template=template, grid=grid, threadgroup=threadgroup,
                                  output_shapes=output_shapes, output_dtypes=output_dtypes,
                                  init_value=init_value)
