"""The Metal emulator itself: it compiles what MLX would compile, and it notices what it claims to notice.

- The generated kernel source equals, byte for byte, what MLX 0.32 prints for our kernels (MLX generates
  it without Metal while exporting a function, and prints it with verbose=True).
- simd_sum and threadgroup_barrier behave as on a GPU for correct code; threadgroup memory starts as NaN;
  writes and reads outside a buffer, and a barrier some threads skip, are reported as errors.
- Address spaces are type-checked as Metal does: a `constant` pointer (MLX's declaration of an input under
  8 elements) handed to a `device` parameter, or a `thread` pointer to a `device` one, fails to compile.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import mlx.core as mx

from emulator import harness, signature
from emulator.harness import EmulatorError
from emulator.runner import EmulatorRunner
from mlxedge.metal import kernels

# Runs in a child process (MLX writes the generated source to the C++ stdout); imports only mlx.
MLX_GENERATED_SOURCE = textwrap.dedent("""
    import json, sys
    import mlx.core as mx
    for spec in json.loads(sys.stdin.read()):
        k = mx.fast.metal_kernel(name=spec["name"], input_names=spec["input_names"],
                                 output_names=spec["output_names"], source=spec["source"], header=spec["header"])
        dtypes = [getattr(mx, d) for d in spec["dtypes"]]
        template = [(n, getattr(mx, v) if isinstance(v, str) else v) for n, v in spec["template"]]
        def run(*inputs):
            return k(inputs=list(inputs), template=template, grid=(64, 1, 1), threadgroup=(64, 1, 1),
                     output_shapes=[(spec["rows"], spec["shapes"][1][0])], output_dtypes=[dtypes[0]],
                     verbose=True)[0]
        mx.export_function(sys.argv[1] + spec["name"] + str(spec["rows"]), run,
                           *[mx.zeros(tuple(s), dtype=d) for s, d in zip(spec["shapes"], dtypes)])
        sys.stdout.flush()
""")

SIGNATURE_CASES = [
    # kernel, input shapes, input dtypes, template (dtypes by name), rows
    ("QMV", [(1, 512), (16, 64), (16, 8), (16, 8)], ["float16", "uint32", "float16", "float16"],
     [("T", "float16"), ("BITS", 4), ("GS", 64), ("M", 1), ("ALIGNED", True)], 1),
    ("QMV", [(3, 32), (1, 4), (1, 1), (1, 1)], ["bfloat16", "uint32", "bfloat16", "bfloat16"],  # tiny: constant
     [("T", "bfloat16"), ("BITS", 4), ("GS", 32), ("M", 3), ("ALIGNED", False)], 3),
    ("GATE_UP", [(2, 256), (8, 64), (8, 2), (8, 2), (8, 64), (8, 2), (8, 2)],
     ["float32", "uint32", "float32", "float32", "uint32", "float32", "float32"],
     [("T", "float32"), ("BITS", 8), ("GS", 128), ("M", 2), ("ALIGNED", False)], 2),
]


@pytest.fixture(scope="module")
def mlx_sources(tmp_path_factory) -> list:
    """The source MLX itself generates for each SIGNATURE_CASES entry (one child process for all)."""
    specs = []
    for kernel_attr, shapes, dtypes, template, rows in SIGNATURE_CASES:
        kernel = getattr(kernels, kernel_attr)
        specs.append({"name": kernel.name, "input_names": list(kernel.input_names),
                      "output_names": list(kernel.output_names), "source": kernel.source,
                      "header": kernel.header, "shapes": shapes, "dtypes": dtypes, "template": template,
                      "rows": rows})
    out = tmp_path_factory.mktemp("export")
    proc = subprocess.run([sys.executable, "-c", MLX_GENERATED_SOURCE, str(out / "f")], input=json.dumps(specs),
                          capture_output=True, text=True, check=True)
    sources, text = [], proc.stdout
    while "```\n" in text:
        start = text.index("```\n") + 4
        end = text.index("\n```", start)
        sources.append(text[start:end])
        text = text[end + 4:]
    assert len(sources) == len(SIGNATURE_CASES)
    return sources


@pytest.mark.parametrize("index", range(len(SIGNATURE_CASES)),
                         ids=[f"{c[0]}-{c[2][0]}-M{c[4]}" for c in SIGNATURE_CASES])
def test_generated_source_is_what_mlx_generates(index, mlx_sources):
    kernel_attr, shapes, dtypes, template, rows = SIGNATURE_CASES[index]
    kernel = getattr(kernels, kernel_attr)
    mx_template = [(n, getattr(mx, v) if isinstance(v, str) else v) for n, v in template]
    infos = [signature.InputInfo(n, getattr(mx, d), tuple(s)) for n, s, d in zip(kernel.input_names, shapes, dtypes)]
    kname, ours, _ = signature.generate(kernel.name, kernel.header, kernel.source, kernel.input_names, infos,
                                        kernel.output_names, [getattr(mx, dtypes[0])], mx_template)
    theirs = mlx_sources[index]
    assert kname in theirs
    assert ours.strip() == theirs.strip()


def toy(name: str, source: str, inputs=("x",), header: str = "") -> kernels.KernelSource:
    return kernels.KernelSource(name=name, input_names=tuple(inputs), output_names=("y",), source=source,
                                header=header)


def run_toy(kernel, x, n_out, threads=64, schedule="forward"):
    return EmulatorRunner(schedule)(kernel, inputs=[x], template=[], grid=(threads, 1, 1),
                                     threadgroup=(64, 1, 1), output_shapes=[(n_out,)],
                                     output_dtypes=[mx.float32])[0]


SIMD_AND_BARRIER = toy("emu_simd_barrier", """
    threadgroup float shared[64];
    const uint t = thread_index_in_threadgroup;
    const float lane_total = metal::simd_sum(x[thread_position_in_grid.x]);
    shared[t] = lane_total + float(simdgroup_index_in_threadgroup);
    metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
    y[thread_position_in_grid.x] = shared[63 - t];
""")


@pytest.mark.requires_emulator
@pytest.mark.parametrize("schedule", ["forward", "reverse"])
def test_simd_sum_and_barrier_match_gpu_semantics(schedule):
    x = mx.arange(128, dtype=mx.float32)
    y = np.array(run_toy(SIMD_AND_BARRIER, x, 128, threads=128, schedule=schedule))
    sums = np.array(x).reshape(4, 32).sum(axis=1)  # one sum per SIMD-group (two per threadgroup)
    want = np.concatenate([np.full(32, sums[1] + 1), np.full(32, sums[0]), np.full(32, sums[3] + 1),
                           np.full(32, sums[2])])
    np.testing.assert_array_equal(y, want)


@pytest.mark.requires_emulator
def test_threadgroup_memory_starts_as_nan():
    kernel = toy("emu_poison", """
        threadgroup float never_written[64];
        y[thread_position_in_grid.x] = never_written[thread_index_in_threadgroup] + x[0];
    """)
    assert np.isnan(np.array(run_toy(kernel, mx.zeros((64,)), 64))).all()


@pytest.mark.requires_emulator
def test_unwritten_outputs_read_as_nan():
    kernel = toy("emu_skip", "if (thread_position_in_grid.x % 2 == 0) { y[thread_position_in_grid.x] = x[0]; }")
    y = np.array(run_toy(kernel, mx.ones((64,)), 64))
    assert (y[0::2] == 1).all() and np.isnan(y[1::2]).all()


@pytest.mark.requires_emulator
@pytest.mark.parametrize("body, message", [
    ("y[thread_position_in_grid.x + 1] = x[0];", "outside"),          # writes one past the end
    ("if (thread_position_in_grid.x == 0) { y[-1] = x[0]; }", "before the start"),
    ("y[thread_position_in_grid.x] = x[thread_position_in_grid.x + 64];", "outside"),  # reads past the end
])
def test_out_of_bounds_access_is_reported(body, message):
    with pytest.raises(EmulatorError, match=message):
        run_toy(toy("emu_oob", body), mx.ones((64,)), 64)


@pytest.mark.requires_emulator
def test_barrier_skipped_by_some_threads_is_reported():
    kernel = toy("emu_divergent_barrier", """
        if (thread_index_in_simdgroup < 16) {
          metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
        }
        y[thread_position_in_grid.x] = x[0];
    """)
    with pytest.raises(EmulatorError, match="barrier"):
        run_toy(kernel, mx.ones((64,)), 64)


# ---- Address spaces: what Metal's compiler refuses, the emulator refuses. ----------------------------------

DEVICE_HELPER = "inline float first(const device float* p) { return p[0]; }\n"
GENERIC_HELPER = "template <typename P> inline float first(P p) { return p[0]; }\n"


def _source(kernel, size=64) -> str:
    return EmulatorRunner().generated_source(kernel, [mx.ones((size,))], [], [mx.float32])[1]


@pytest.mark.parametrize("size, location", [(64, "device"), (4, "constant")])
def test_constant_pointer_passed_as_device_fails_to_compile(size, location):
    """MLX declares an input under 8 elements `const constant`; a `const device` helper parameter rejects it."""
    body = "y[thread_position_in_grid.x] = first(x);"
    source = _source(toy(f"emu_as_{location}", body, header=DEVICE_HELPER), size)
    assert f"const {location} float* x" in source
    if location == "device":
        harness.check_address_spaces(source)
    else:
        with pytest.raises(EmulatorError, match="address spaces"):
            harness.check_address_spaces(source)
        # the same body with a helper generic over the pointer type is accepted
        harness.check_address_spaces(_source(toy("emu_as_generic", body, header=GENERIC_HELPER), size))


@pytest.mark.requires_emulator
def test_address_space_check_runs_before_every_emulated_launch():
    kernel = toy("emu_as_launch", "y[thread_position_in_grid.x] = first(x);", header=DEVICE_HELPER)
    assert (np.array(run_toy(kernel, mx.ones((64,)), 64)) == 1).all()
    with pytest.raises(EmulatorError, match="address spaces"):
        run_toy(kernel, mx.ones((4,)), 64)


@pytest.mark.parametrize("helper, body", [
    (DEVICE_HELPER, "float local[4] = {0, 0, 0, 0}; y[thread_position_in_grid.x] = first(local);"),
    (DEVICE_HELPER, "threadgroup float shared[4]; y[thread_position_in_grid.x] = first(shared);"),
    ("inline float first(const thread float* p) { return p[0]; }\n", "y[thread_position_in_grid.x] = first(x);"),
    ("inline float first(const constant float* p) { return p[0]; }\n", "y[thread_position_in_grid.x] = first(x);"),
], ids=["thread-as-device", "threadgroup-as-device", "device-as-thread", "device-as-constant"])
def test_every_other_address_space_mismatch_fails_to_compile(helper, body):
    with pytest.raises(EmulatorError, match="address spaces"):
        harness.check_address_spaces(_source(toy("emu_as_mismatch", body, header=helper)))


def test_missing_clang_is_a_clear_failure_not_a_skip(monkeypatch):
    monkeypatch.setenv(harness.CLANG_ENV, "/nonexistent/clang++")
    with pytest.raises(EmulatorError, match="address-space check"):
        harness.check_address_spaces(_source(toy("emu_as_noclang", "y[thread_position_in_grid.x] = x[0] + 1.0f;")))
