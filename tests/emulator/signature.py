"""Reproduce the Metal source MLX 0.32 generates around a `mx.fast.metal_kernel` body.

Mirrors mlx/fast.cpp (`metal_kernel`, `write_signature`, `write_template`): the kernel name carries the
template values and the input/output dtypes; inputs under 8 elements live in `constant` memory, 0-d inputs
are passed by reference; `<name>_shape`, `_strides`, `_ndim` parameters appear only when the body mentions
them; Metal attributes appear, in MLX's fixed order, when the body mentions them. A test checks the result
byte for byte against what MLX itself prints with verbose=True.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.core as mx

MAX_CONSTANT_ARRAY_SIZE = 8

TYPE_STRINGS = {
    mx.bool_: "bool", mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t",
    mx.uint64: "uint64_t", mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t",
    mx.int64: "int64_t", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.float32: "float",
}

# (attribute, type) in the order MLX lists them.
METAL_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)


@dataclass(frozen=True)
class InputInfo:
    """What the signature needs to know about one input array."""

    name: str
    dtype: object
    shape: tuple

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Parameter:
    """One parameter of the generated kernel, in order."""

    kind: str  # "input", "shape", "strides", "ndim", "output", "attribute"
    name: str
    ctype: str
    input_index: int = -1
    by_reference: bool = False


def template_value(arg) -> str:
    if isinstance(arg, bool):
        return "1" if arg else "0"
    if isinstance(arg, int):
        return str(arg)
    return TYPE_STRINGS[arg]


def template_param_type(arg) -> str:
    if isinstance(arg, bool):
        return "bool"
    if isinstance(arg, int):
        return "int"
    return "typename"


def kernel_name(name: str, template: list, inputs: list[InputInfo], output_dtypes: list) -> str:
    out = "custom_kernel_" + name
    if template:
        tdef = "<" + ", ".join(template_value(v) for _, v in template) + ">"
        out += "_" + re.sub(r"<|>|(, )", "_", tdef)[:-1]
    for inp in inputs:
        out += "_" + TYPE_STRINGS[inp.dtype]
        if len(inp.shape) == 0:
            out += "s"
        elif inp.size < MAX_CONSTANT_ARRAY_SIZE:
            out += "c"
    for dt in output_dtypes:
        out += "_" + TYPE_STRINGS[dt]
    return out


def parameters(source: str, inputs: list[InputInfo], output_names, output_dtypes) -> list[Parameter]:
    params = []
    for i, inp in enumerate(inputs):
        params.append(Parameter("input", inp.name, TYPE_STRINGS[inp.dtype], i, by_reference=len(inp.shape) == 0))
        if len(inp.shape) > 0:
            for kind, suffix, ctype in (("shape", "_shape", "int"), ("strides", "_strides", "int64_t"),
                                        ("ndim", "_ndim", "int")):
                if inp.name + suffix in source:
                    params.append(Parameter(kind, inp.name + suffix, ctype, i))
    for name, dt in zip(output_names, output_dtypes):
        params.append(Parameter("output", name, TYPE_STRINGS[dt]))
    for attr, ctype in METAL_ATTRIBUTES:
        if attr in source:
            params.append(Parameter("attribute", attr, ctype))
    return params


def generate(name: str, header: str, source: str, input_names, inputs: list[InputInfo], output_names,
             output_dtypes, template: list, atomic_outputs: bool = False) -> tuple[str, str, list[Parameter]]:
    """(kernel name, full generated source, parameter list) exactly as MLX writes them."""
    assert [i.name for i in inputs] == list(input_names)
    kname = kernel_name(name, template, inputs, output_dtypes)
    params = parameters(source, inputs, output_names, output_dtypes)
    text = header
    if template:
        text += "template <" + ", ".join(f"{template_param_type(v)} {n}" for n, v in template) + ">\n"
    text += "[[kernel]] void " + kname + "(\n"
    lines = []
    index = 0
    for p in params:
        if p.kind == "attribute":
            lines.append(f"  {p.ctype} {p.name} [[{p.name}]]")
            continue
        if p.kind == "input":
            inp = inputs[p.input_index]
            location = "constant" if inp.size < MAX_CONSTANT_ARRAY_SIZE else "device"
            ref = "&" if p.by_reference else "*"
            lines.append(f"  const {location} {p.ctype}{ref} {p.name} [[buffer({index})]]")
        elif p.kind == "shape":
            lines.append(f"  const constant int* {p.name} [[buffer({index})]]")
        elif p.kind == "strides":
            lines.append(f"  const constant int64_t* {p.name} [[buffer({index})]]")
        elif p.kind == "ndim":
            lines.append(f"  const constant int& {p.name} [[buffer({index})]]")
        else:
            ctype = f"atomic<{p.ctype}>" if atomic_outputs else p.ctype
            lines.append(f"  device {ctype}* {p.name} [[buffer({index})]]")
        index += 1
    text += ",\n".join(lines) + ") {\n"
    text += source + "\n}\n"
    if template:
        tdef = kname + "<" + ", ".join(template_value(v) for _, v in template) + ">"
        text += f'\ntemplate [[host_name("{kname}")]] [[kernel]] decltype({tdef}) {tdef};\n'
    return kname, text, params
