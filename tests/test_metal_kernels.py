"""The custom Metal kernels agree with mx.dequantize + matmul; bugs planted in them are caught.

Where Metal is present the kernels run on the GPU through `mx.fast.metal_kernel` (MetalRunner); elsewhere,
and under --fake-metal, in the g++ emulator after the clang address-space check. The planted-bug tests need
the emulator (faults on out-of-bounds access, two thread orders), so they run on Linux.

Shapes cover 4 and 8 bits, groups 32/64/128, float16/bfloat16/float32, 1 to 8 activation rows, the aligned
path and both ragged edges (N not a multiple of the rows per threadgroup; K a multiple of the group but not
of the kernel's block).
"""

from __future__ import annotations

import dataclasses

import pytest

import mlx.core as mx

from emulator.cases import TOLERANCE, Case, max_relative_error, run_gate_up, run_qmv
from emulator.harness import EmulatorError
from emulator.runner import EmulatorRunner
from emulator import fake_metal
from mlxedge.metal import kernels
from mlxedge.metal.runner import MetalRunner, metal_available

f16, bf16, f32 = mx.float16, mx.bfloat16, mx.float32

QMV_CASES = [
    Case(1, 64, 512, 4, 64, f16),     # aligned decode
    Case(1, 13, 96, 4, 32, f16),      # ragged N, K below one block
    Case(2, 40, 1024, 4, 128, bf16),  # aligned, two blocks
    Case(3, 21, 640, 4, 64, f32),     # ragged N, K = block + 2 groups
    Case(4, 8, 256, 8, 32, f32),      # aligned 8-bit
    Case(5, 30, 384, 8, 128, f16),    # 8-bit, K = 1.5 blocks
    Case(6, 17, 320, 8, 64, bf16),    # 8-bit ragged both ways
    Case(7, 24, 1536, 4, 32, f32),    # aligned, 48 groups per row
    Case(8, 9, 192, 4, 64, bf16),     # 8 rows, ragged both ways
    Case(8, 16, 512, 8, 64, f16),     # 8 rows, aligned 8-bit
    Case(1, 1, 32, 4, 32, f32),       # one output, one group: w, scales and biases in `constant` memory
    Case(2, 3, 64, 8, 32, bf16),      # 3 rows x 2 groups: scales and biases in `constant`, words in `device`
    Case(2, 7, 128, 8, 128, f32),     # fewer outputs than one threadgroup
    Case(3, 64, 4096, 4, 128, f32),   # long K
]

GATE_UP_CASES = [
    Case(1, 64, 512, 4, 64, f16),     # aligned decode
    Case(2, 10, 96, 4, 32, f32),      # ragged both ways
    Case(4, 12, 256, 8, 32, bf16),    # aligned 8-bit
    Case(8, 7, 384, 8, 128, f16),     # 8 rows, ragged
    Case(3, 33, 640, 4, 64, bf16),    # ragged N, K = block + 2 groups
    Case(1, 1, 32, 8, 32, f16),       # one output: w, scales, biases of both weights in `constant` memory
]


def _real_metal() -> bool:
    return metal_available() and not fake_metal.active()


@pytest.fixture(scope="module")
def runner():
    """The GPU where there is one; the emulator otherwise (and under --fake-metal)."""
    if _real_metal():
        return MetalRunner()
    return EmulatorRunner()


@pytest.fixture(scope="module")
def reverse_runner(runner):
    """Emulator: threads run last-to-first, a second interleaving for the cross-SIMD-group exchange."""
    return EmulatorRunner(schedule="reverse") if isinstance(runner, EmulatorRunner) else runner


def test_cases_cover_every_supported_setting():
    cases = QMV_CASES + GATE_UP_CASES
    assert {c.bits for c in cases} == set(kernels.SUPPORTED_BITS)
    assert {c.group_size for c in cases} == set(kernels.SUPPORTED_GROUP_SIZES)
    assert {c.dtype for c in cases} == {f16, bf16, f32}
    assert {c.m for c in QMV_CASES} == set(range(1, kernels.MAX_ROWS + 1))
    assert any(c.n % kernels.QMV_ROWS_PER_THREADGROUP for c in QMV_CASES)
    assert any(not c.aligned for c in QMV_CASES) and any(c.aligned and c.k % c.group_size == 0 for c in QMV_CASES)
    assert any(c.n % kernels.GATE_UP_ROWS_PER_THREADGROUP for c in GATE_UP_CASES)
    assert any(not c.aligned for c in GATE_UP_CASES)


@pytest.mark.parametrize("case", QMV_CASES, ids=str)
def test_qmv_matches_dequantize_matmul(runner, case):
    y, ref = run_qmv(runner, case)
    assert y.dtype == case.dtype and y.shape == (case.m, case.n)
    assert max_relative_error(y, ref) <= TOLERANCE[case.dtype]


@pytest.mark.parametrize("case", GATE_UP_CASES, ids=str)
def test_gate_up_matches_silu_gate_times_up(runner, reverse_runner, case):
    for r in (runner, reverse_runner):
        y, ref = run_gate_up(r, case)
        assert y.dtype == case.dtype and y.shape == (case.m, case.n)
        assert max_relative_error(y, ref) <= 2 * TOLERANCE[case.dtype]


# ---- Mutation test: bugs planted in the exact kernel source must make the checks above fail. ----------

# (name, which source, text to find, replacement). Each text must occur exactly once in its source.
MUTATIONS = [
    ("nibble mask wrong", "header", "q & 0x00f0", "q & 0x00f8"),
    ("nibble pre-scale wrong (a shift by 3, not 4)", "header", "c * (1.0f / 256.0f)", "c * (1.0f / 128.0f)"),
    ("8-bit mask drops the top bit", "header", "(word >> (8 * b)) & 0xffu", "(word >> (8 * b)) & 0x7fu"),
    ("upper half-word misplaced", "header", "(word >> 16)", "(word >> 12)"),
    ("group index wrong", "header", "k / GS", "k / (2 * GS)"),
    ("bias term missing", "header", "s * dot[m] + b * xsum[m]", "s * dot[m]"),
    ("row clamp missing (reads past the last row)", "header", "metal::min(row0 + r, N - 1)", "row0 + r"),
    ("K bound check missing", "header", "if (!ALIGNED && k >= K) {", "if (false) {"),
    ("off-by-one first row", "qmv", "int(threadgroup_position_in_grid.y) * (2 * R) +",
     "int(threadgroup_position_in_grid.y) * (2 * R) + 1 +"),
    ("off-by-one row guard on write", "qmv", "(ALIGNED || row0 + r < N)", "(ALIGNED || row0 + r <= N)"),
    ("barrier dropped", "gate_up", "metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);", ""),
    ("up sums written by every lane of the gate SIMD-group too", "gate_up", "if (is_up && lane == 0) {",
     "if (lane == 0) {"),
    # MLX declares inputs under 8 elements `const constant`; Metal will not pass them as `const device`
    ("weight words taken as device memory only (a one-row weight's are constant)", "header",
     "template <int BITS, int VPT, int M, typename WPtr>\ninline void mlxe_qdot(WPtr w,",
     "template <int BITS, int VPT, int M>\ninline void mlxe_qdot(const device uint32_t* w,"),
]

# (kernel, case, schedule): the fused case runs under both thread orders, so a race either way shows.
MUTATION_CASES = [
    ("qmv", Case(3, 13, 192, 4, 64, f32), "forward"),      # ragged N, 3 groups, K below one block
    ("qmv", Case(2, 13, 320, 8, 32, f32), "forward"),      # 8-bit, ragged both ways
    ("gate_up", Case(2, 10, 192, 4, 64, f32), "forward"),  # fused, ragged both ways
    ("gate_up", Case(2, 10, 192, 4, 64, f32), "reverse"),
    ("qmv", Case(1, 1, 32, 4, 32, f32), "forward"),        # one output, one group: scales in `constant`
]


def _mutated(where: str, find: str, replace: str):
    source = {"header": kernels.HEADER, "qmv": kernels.QMV_BODY, "gate_up": kernels.GATE_UP_BODY}[where]
    assert source.count(find) == 1, f"mutation target {find!r} not found exactly once"
    mutated = source.replace(find, replace)
    if where == "header":
        return (dataclasses.replace(kernels.QMV, header=mutated), dataclasses.replace(kernels.GATE_UP, header=mutated))
    if where == "qmv":
        return dataclasses.replace(kernels.QMV, source=mutated), kernels.GATE_UP
    return kernels.QMV, dataclasses.replace(kernels.GATE_UP, source=mutated)


def _suite_passes(qmv_kernel, gate_up_kernel) -> bool:
    """The mutation suite: every case agrees with its reference and the emulator saw nothing wrong."""
    for op, case, schedule in MUTATION_CASES:
        runner = EmulatorRunner(schedule=schedule)
        try:
            if op == "qmv":
                y, ref = run_qmv(runner, case, kernel=qmv_kernel)
            else:
                y, ref = run_gate_up(runner, case, kernel=gate_up_kernel)
        except EmulatorError:
            return False
        if max_relative_error(y, ref) > 2 * TOLERANCE[case.dtype]:
            return False
    return True


@pytest.mark.requires_emulator
def test_mutation_suite_passes_on_the_real_kernels():
    assert _suite_passes(kernels.QMV, kernels.GATE_UP)


@pytest.mark.slow
@pytest.mark.requires_emulator
@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_planted_bug_is_caught(mutation):
    _, where, find, replace = mutation
    qmv_kernel, gate_up_kernel = _mutated(where, find, replace)
    assert not _suite_passes(qmv_kernel, gate_up_kernel)


# ---- Through the dispatch, custom mode forced, against MLX's built-in path (a Mac's GPU, or --fake-metal). ----

DISPATCH_CASES = [Case(1, 64, 512, 4, 64, f16), Case(4, 24, 256, 8, 32, bf16), Case(1, 1, 32, 4, 32, f32)]


@pytest.mark.requires_metal
@pytest.mark.parametrize("case", DISPATCH_CASES, ids=str)
def test_forced_custom_kernels_match_the_builtin_path(case):
    """Custom mode forced through the per-layer kernel choice: on a Mac the real GPU kernels (under
    --fake-metal the emulator) against MLX's built-in matmuls."""
    from emulator.cases import activations, quantized_weight
    from mlxedge.kernels import KernelChoice
    from mlxedge.metal.dispatch import builtin_qmv, swiglu

    gate = quantized_weight(case.n, case.k, case.bits, case.group_size, case.dtype, seed=5)
    up = quantized_weight(case.n, case.k, case.bits, case.group_size, case.dtype, seed=6)
    x = activations(case, seed=7)
    kw = dict(group_size=case.group_size, bits=case.bits)
    choice = KernelChoice("metal", cpu=None)
    qmv, fused = choice.quantized(*gate, **kw), choice.gate_up(gate, up, **kw)
    assert qmv.backend == "metal" and fused is not None and fused.backend == "metal"
    y, h = qmv.decode(x, *gate), fused.decode(x, gate, up)
    y_ref = builtin_qmv(x, *gate, case.group_size, case.bits)
    h_ref = swiglu(builtin_qmv(x, *gate, case.group_size, case.bits), builtin_qmv(x, *up, case.group_size, case.bits))
    assert y.dtype == case.dtype and h.dtype == case.dtype
    # both sides round to the same half dtype; twice the kernel tolerance leaves room for the built-in's own
    assert max_relative_error(y, y_ref.astype(mx.float32)) <= 2 * TOLERANCE[case.dtype]
    assert max_relative_error(h, h_ref.astype(mx.float32)) <= 4 * TOLERANCE[case.dtype]
