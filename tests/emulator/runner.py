"""EmulatorRunner: a drop-in for dispatch's Metal runner that runs kernels through the g++ emulator.

Same call as `mlxedge.metal.runner.MetalRunner`: (kernel, inputs, template, grid, threadgroup,
output_shapes, output_dtypes[, init_value]) -> list of mx.array. It evaluates its inputs, so it works
inside a model's forward pass but not under mx.compile.
"""

from __future__ import annotations

import numpy as np

import mlx.core as mx

from . import harness, signature

# How each dtype crosses into numpy bytes (bfloat16 travels as its uint16 bit pattern).
_NUMPY_VIEW = {mx.bfloat16: (mx.uint16, np.uint16)}
_NUMPY_DTYPES = {
    mx.bool_: np.bool_, mx.uint8: np.uint8, mx.uint16: np.uint16, mx.uint32: np.uint32, mx.uint64: np.uint64,
    mx.int8: np.int8, mx.int16: np.int16, mx.int32: np.int32, mx.int64: np.int64,
    mx.float16: np.float16, mx.float32: np.float32,
}


def _to_array(value) -> mx.array:
    if isinstance(value, mx.array):
        return value
    if isinstance(value, bool):
        return mx.array(value)
    if isinstance(value, int):
        return mx.array(value, dtype=mx.int32)
    if isinstance(value, float):
        return mx.array(value, dtype=mx.float32)
    raise TypeError(f"unsupported kernel input {type(value)}")


def _to_bytes(a: mx.array) -> bytes:
    if a.dtype in _NUMPY_VIEW:
        a = a.view(_NUMPY_VIEW[a.dtype][0])
    return np.ascontiguousarray(np.array(a)).tobytes()


def _from_bytes(data: bytes, shape, dtype) -> mx.array:
    if dtype in _NUMPY_VIEW:
        view, np_dtype = _NUMPY_VIEW[dtype]
        return mx.array(np.frombuffer(data, dtype=np_dtype).reshape(shape)).view(dtype)
    return mx.array(np.frombuffer(data, dtype=_NUMPY_DTYPES[dtype]).reshape(shape))


def _filled(shape, dtype, value) -> bytes:
    n = int(np.prod(shape)) if len(shape) else 1
    if value is None:
        return b"\xff" * (n * dtype.size)  # NaN: anything the kernel fails to write shows up
    return _to_bytes(mx.full(tuple(shape), value, dtype=dtype))


class EmulatorRunner:
    """Runs `KernelSource`s on the CPU by compiling MLX's generated source against the Metal shim."""

    device_key = "emulator"

    def __init__(self, schedule: str = "forward"):
        self.schedule = schedule  # "forward" or "reverse": the order threads run in each scheduling pass
        self.calls = []  # (kernel name, template) per launch, for tests that check routing

    def available(self) -> bool:
        return True

    def generated_source(self, kernel, inputs, template, output_dtypes) -> tuple[str, str, list]:
        arrays = [_to_array(v) for v in inputs]
        infos = [signature.InputInfo(n, a.dtype, tuple(a.shape)) for n, a in zip(kernel.input_names, arrays)]
        return signature.generate(kernel.name, kernel.header, kernel.source, kernel.input_names, infos,
                                  kernel.output_names, list(output_dtypes), list(template or []))

    def __call__(self, kernel, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes,
                 init_value=None) -> list[mx.array]:
        arrays = [_to_array(v) for v in inputs]
        mx.eval(arrays)
        kname, source, params = self.generated_source(kernel, arrays, template, output_dtypes)
        harness.check_address_spaces(source)  # what Metal's compiler would refuse, g++ below would not
        binary = harness.compile_program(harness.program(kname, source, params, list(template or []),
                                                         len(arrays), kernel.output_names))
        packed = []
        for a in arrays:
            strides, acc = [], 1
            for d in reversed(a.shape):  # inputs are made row-contiguous, as ensure_row_contiguous does
                strides.insert(0, acc)
                acc *= d
            packed.append((_to_bytes(a), tuple(a.shape), tuple(strides)))
        initial = [_filled(s, dt, init_value) for s, dt in zip(output_shapes, output_dtypes)]
        raw = harness.run_binary(binary, grid, threadgroup, packed, initial, self.schedule)
        self.calls.append((kernel.name, tuple(template or [])))
        return [_from_bytes(r, tuple(s), dt) for r, s, dt in zip(raw, output_shapes, output_dtypes)]
