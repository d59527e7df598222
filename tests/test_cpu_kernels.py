"""Native CPU kernels (mlxedge.cpu) against mx.dequantize + a float64 numpy matmul, on every ISA path.

Error bound (float32 accumulation, Higham): a dot product of length K accumulated in float32 is within
K*u*sum|x_k||w_k| of the exact one (u = 2^-24). The kernels accumulate scale*sum(q x) + bias*sum(x) per
group, so the magnitude that bounds the error is sum_k |x_k| (|s q_k| + |b|), and the reference's own
dequantisation (one float32 rounding of s*q+b) adds u*|x||w| more. We allow 2*(K+8)*u*that, plus one
rounding of the result to the output dtype (u_out*|y|). A planted bug (see test_cpu_mutations.py)
misses this bound by orders of magnitude.

The same checks (check_qmm, check_qmm_many, check_gate_up, check_matmul) drive the ctypes builds of the core in the
mutation tests: `run` callables take float32 numpy inputs.
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx
import numpy as np
import pytest

import mlxedge.cpu as cpu

U32 = 2.0**-24
U_OUT = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
TINY_OUT = {"float32": 2.0**-150, "float16": 2.0**-25, "bfloat16": 2.0**-134}  # half the smallest subnormal
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def _isas() -> list:
    """The ISA paths this machine runs: scalar everywhere; avx2 on x86-64; avx512 where the CPU has AVX-512F;
    avx512vnni where it also has AVX-512 BW, VL, VNNI and VBMI (the kernels' own cpuid check, mirrored here)."""
    if os.uname().machine not in ("x86_64", "AMD64"):
        return ["scalar"]
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    except OSError:
        flags = []
    isas = ["scalar", "avx2"] + (["avx512"] if "avx512f" in flags else [])
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi"} <= set(flags):
        isas.append("avx512vnni")
    return isas


ISAS = _isas()


# ------------------------------------------------------------------ cases and references (shared)


def make_quantized(N: int, K: int, bits: int, gs: int, seed: int, dtype=mx.float32):
    """A random [N, K] weight quantized by MLX; scales/biases cast to `dtype`."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N, K)).astype(np.float32)
    # a few rows with a large offset so the bias term matters (Q4_1-like: bias far from zero)
    w[::5] += 3.0
    wq, s, b = mx.quantize(mx.array(w), group_size=gs, bits=bits)
    return wq, s.astype(dtype), b.astype(dtype)


def make_x(M: int, K: int, seed: int, dtype=mx.float32, lead=None):
    rng = np.random.default_rng(seed + 1000)
    x = (rng.standard_normal((M, K)).astype(np.float32) + 0.25) / np.float32(np.sqrt(K))  # keeps |y| ~ 1..30
    x = mx.array(x).astype(dtype)
    return x.reshape(*lead, K) if lead else x


def _f64(a) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def dequant_parts(wq, s, b, gs, bits):
    """(w, |s q| + |b|) in float64: w from mx.dequantize (float32 scales), and the magnitude."""
    s32, b32 = s.astype(mx.float32), b.astype(mx.float32)
    w = _f64(mx.dequantize(wq, s32, b32, group_size=gs, bits=bits))
    q = _f64(mx.dequantize(wq, mx.ones_like(s32), mx.zeros_like(b32), group_size=gs, bits=bits))
    rep = lambda a: np.repeat(_f64(a), gs, axis=1)  # noqa: E731
    mag = np.abs(rep(s32) * q) + np.abs(rep(b32))
    return w, mag


def qmm_reference(x, wq, s, b, gs, bits):
    """(y, bound) for x @ deq(W).T: float64 result and the float32-accumulation error bound."""
    xd = _f64(x).reshape(-1, x.shape[-1])
    w, mag = dequant_parts(wq, s, b, gs, bits)
    K = xd.shape[1]
    y = xd @ w.T
    err = 2 * (K + 8) * U32 * (np.abs(xd) @ mag.T)
    return y, err


def assert_within(got: np.ndarray, want: np.ndarray, err: np.ndarray, out_dtype: str, what: str):
    got = np.asarray(got, dtype=np.float64).reshape(want.shape)
    bound = err + U_OUT[out_dtype] * np.abs(want) + TINY_OUT[out_dtype]
    bad = ~(np.abs(got - want) <= bound)  # NaN counts as bad
    if bad.any():
        i = np.argwhere(bad)[0]
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.size} outputs outside the float32 bound; first at {tuple(i)}: "
            f"got {got[tuple(i)]!r}, want {want[tuple(i)]!r}, bound {bound[tuple(i)]:.3g}"
        )


@functools.lru_cache(maxsize=512)
def _qmm_case(M, N, K, bits, gs, dtype, seed):
    wq, s, b = make_quantized(N, K, bits, gs, seed, DTYPES[dtype])
    x = make_x(M, K, seed, DTYPES[dtype])
    return (x, wq, s, b), qmm_reference(x, wq, s, b, gs, bits)


def check_qmm(run, M, N, K, bits, gs, dtype="float32", seed=0, what="qmm"):
    """run(x, wq, s, b, gs, bits) -> y; x/s/b in `dtype` (mx arrays)."""
    (x, wq, s, b), (want, err) = _qmm_case(M, N, K, bits, gs, dtype, seed)
    got = run(x, wq, s, b, gs, bits)
    assert_within(got, want, err, dtype, f"{what} M={M} N={N} K={K} bits={bits} gs={gs} {dtype}")


@functools.lru_cache(maxsize=128)
def _qmm_many_case(M, Ns, K, bits, gs, dtype, seed):
    parts = tuple(make_quantized(N, K, bits, gs, seed + i, DTYPES[dtype]) for i, N in enumerate(Ns))
    x = make_x(M, K, seed, DTYPES[dtype])
    return (x, parts), [qmm_reference(x, *part, gs, bits) for part in parts]


def check_qmm_many(run, M, Ns, K, bits, gs, dtype="float32", seed=0, what="qmm_many"):
    """run(x, parts, gs, bits) -> [x @ deq(W_i).T]; parts: (wq, s, b) per output, N = Ns[i] rows each."""
    (x, parts), refs = _qmm_many_case(M, tuple(Ns), K, bits, gs, dtype, seed)
    got = run(x, parts, gs, bits)
    assert len(got) == len(parts), f"{what}: {len(got)} outputs for {len(parts)} weights"
    for i, (y, (want, err)) in enumerate(zip(got, refs)):
        assert_within(y, want, err, dtype, f"{what} part {i} of {list(Ns)} M={M} K={K} bits={bits} gs={gs} {dtype}")


@functools.lru_cache(maxsize=128)
def _gate_up_case(M, N, K, bits, gs, dtype, seed):
    dt = DTYPES[dtype]
    gate = make_quantized(N, K, bits, gs, seed, dt)
    up = make_quantized(N, K, bits, gs, seed + 1, dt)
    x = make_x(M, K, seed, dt)
    g, eg = qmm_reference(x, *gate, gs, bits)
    u, eu = qmm_reference(x, *up, gs, bits)
    sig = 1 / (1 + np.exp(-g))
    silu = g * sig
    want = silu * u
    # |d silu/dg| <= 1.1; one more rounding for silu and the product
    err = 1.1 * np.abs(u) * eg + np.abs(silu) * eu + 8 * U32 * np.abs(want) + 8 * U32 * np.abs(u) * np.abs(g)
    return (x, gate, up), (want, err)


def check_gate_up(run, M, N, K, bits, gs, dtype="float32", seed=0, what="gate_up_silu"):
    """run(x, (wg, sg, bg), (wu, su, bu), gs, bits) -> silu(x Wg^T) * (x Wu^T)."""
    (x, gate, up), (want, err) = _gate_up_case(M, N, K, bits, gs, dtype, seed)
    got = run(x, gate, up, gs, bits)
    assert_within(got, want, err, dtype, f"{what} M={M} N={N} K={K} bits={bits} gs={gs} {dtype}")


@functools.lru_cache(maxsize=256)
def _matmul_case(M, N, K, x_dtype, w_dtype, seed):
    rng = np.random.default_rng(seed)
    w = mx.array(rng.standard_normal((N, K)).astype(np.float32)).astype(DTYPES[w_dtype])
    x = make_x(M, K, seed, DTYPES[x_dtype])
    xd, wd = _f64(x), _f64(w)
    want = xd @ wd.T
    err = 2 * (K + 8) * U32 * (np.abs(xd) @ np.abs(wd).T)
    out_dtype = str((mx.array(0, x.dtype) + mx.array(0, w.dtype)).dtype).split(".")[-1]
    return (x, w), (want, err, out_dtype)


def check_matmul(run, M, N, K, x_dtype="float32", w_dtype="float32", seed=0, what="matmul"):
    (x, w), (want, err, out_dtype) = _matmul_case(M, N, K, x_dtype, w_dtype, seed)
    got = run(x, w)
    assert_within(got, want, err, out_dtype, f"{what} M={M} N={N} K={K} x {x_dtype} w {w_dtype}")


# ------------------------------------------------------------------ the MLX extension

needs_ext = pytest.mark.skipif(not cpu.available(), reason=f"native CPU kernels: {cpu.describe()}")


@pytest.fixture(autouse=True, scope="module")
def every_gemv_split_over_the_pool():
    """Small GEMVs run on one thread by default; here each is split over the pool, so the partition is tested."""
    if not cpu.available():
        yield
        return
    previous = cpu._ext.set_gemv_parallel_min_bytes(0)
    yield
    cpu._ext.set_gemv_parallel_min_bytes(previous)


@pytest.fixture(params=ISAS)
def isa(request):
    cpu._configure(isa=request.param)
    yield request.param
    cpu._configure(isa=os.environ.get("MLXEDGE_CPU_ISA", "auto"))


@pytest.fixture(params=["openblas", "none"])
def gemm_backend(request):
    cpu._configure(blas=request.param)
    yield request.param
    cpu._configure(blas=os.environ.get("MLXEDGE_CPU_BLAS", "openblas"))


def ext_qmm(x, wq, s, b, gs, bits):
    y = cpu.quantized_matmul(x, wq, s, b, group_size=gs, bits=bits)
    assert y.dtype == mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=gs, bits=bits).dtype
    return _f64(y)


def ext_qmm_many(x, parts, gs, bits):
    ys = cpu.quantized_matmuls(x, parts, group_size=gs, bits=bits)
    return [_f64(y) for y in ys]


def ext_gate_up(x, gate, up, gs, bits):
    return _f64(cpu.gate_up_silu(x, gate, up, group_size=gs, bits=bits))


def ext_matmul(x, w):
    y = cpu.matmul(x, w)
    assert y.dtype == (x @ w.T).dtype
    return _f64(y)


def test_extension_builds_and_loads_here():
    """`pip install` builds the extension; on a machine with a compiler it must load and self-check."""
    if os.environ.get("MLXEDGE_SKIP_CPU_EXT") == "1":
        pytest.skip("installed with MLXEDGE_SKIP_CPU_EXT=1")
    assert cpu.available(), cpu.describe()
    assert cpu.describe().startswith("native cpu")


def test_supports_is_a_cheap_predicate():
    assert cpu.supports(mx.float32, 4, 64) and cpu.supports(mx.bfloat16, 8, 32) and cpu.supports(mx.float16, 4, 128)
    assert not cpu.supports(mx.float32, 3, 64)
    assert not cpu.supports(mx.float32, 4, 16)
    assert not cpu.supports(mx.int32, 4, 64)


def _decode_case(x_row: np.ndarray, N: int, bits: int, gs: int, seed: int):
    wq, s, b = make_quantized(N, x_row.size, bits, gs, seed)
    x = mx.array(x_row.reshape(1, -1).astype(np.float32))
    return x, wq, s, b


@needs_ext
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_decode_gemv_activations_across_magnitudes(isa, gs):
    """One activation row (decode) whose 128-element blocks span magnitudes: a 1e4 outlier beside ~0.04s, a
    block of ~1e-30s, an all-zero block, a ragged tail; then a row with a block at ~1e-37 (where a float
    path's x * 2^-shift and the digits' 2^E near the subnormals). Every output within the float32 bound, on every path; 4-bit (the digits path) and 8-bit."""
    K = 5 * 128 + max(gs, 64)  # a partial last block unless gs = 128
    base = make_x(1, K, seed=gs).astype(mx.float32)
    x = np.array(base).reshape(-1).copy()
    x[3] = 1.0e4
    x[128:256] *= np.float32(1e-30)
    x[256:384] = 0.0
    tiny = np.array(base).reshape(-1).copy()
    tiny[384:512] *= np.float32(1e-37)
    for bits in (4, 8):
        for name, row in (("outlier, tiny and zero blocks", x), ("a block near the float minimum", tiny)):
            xa, wq, s, b = _decode_case(row, 77, bits, gs, seed=bits)
            want, err = qmm_reference(xa, wq, s, b, gs, bits)
            assert_within(ext_qmm(xa, wq, s, b, gs, bits), want, err, "float32", f"qmm[{isa}] {bits}-bit: {name}")


@needs_ext
def test_decode_gemv_non_finite_activations(isa):
    """An inf or a NaN in the activation row makes every output it touches non-finite, as float arithmetic
    does (the digits path cannot hold them, so it must hand the row to the float GEMV rather than return
    finite numbers). Which of inf and NaN comes out may differ: the affine split s*sum(q x) + b*sum(x) gives
    inf - inf where the reference's dequantized weights give inf."""
    K = 256
    for bad in (np.inf, -np.inf, np.nan):
        row = np.array(make_x(1, K, seed=5)).reshape(-1).copy()
        row[130] = bad
        xa, wq, s, b = _decode_case(row, 21, 4, 64, seed=11)
        with np.errstate(invalid="ignore"):
            want, _ = qmm_reference(xa, wq, s, b, 64, 4)
        got = ext_qmm(xa, wq, s, b, 64, 4).reshape(want.shape)
        assert not np.isfinite(want).any()
        assert not np.isfinite(got).any(), f"qmm[{isa}] x has {bad}: finite outputs {got[np.isfinite(got)]}"


@needs_ext
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_matmul_ragged_shapes(isa, bits, gs, dtype):
    # N=77 is no multiple of any row chunk or tile; K=gs is one group; K=3*gs leaves a 32-element
    # tail after the 64-element AVX2 blocks (4-bit g32) and odd group counts elsewhere
    for K in (gs, 3 * gs):
        for M in (1, 2, 7, 8, 33):
            check_qmm(ext_qmm, M, 77, K, bits, gs, dtype, seed=M + K, what=f"qmm[{isa}]")


@needs_ext
@pytest.mark.parametrize("bits,gs", [(4, 32), (8, 64)])
def test_quantized_matmul_prefill_rows(isa, gemm_backend, bits, gs):
    check_qmm(ext_qmm, 512, 200, 5 * gs, bits, gs, "float32", seed=7, what=f"qmm[{isa},{gemm_backend}]")


@needs_ext
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_matmul_blocked_path_each_gemm(isa, gemm_backend, dtype):
    for M in (17, 33):  # above the GEMV row limit (16)
        check_qmm(ext_qmm, M, 130, 192, 4, 64, dtype, seed=M, what=f"qmm[{isa},{gemm_backend}]")
        check_qmm(ext_qmm, M, 130, 96, 8, 32, dtype, seed=M, what=f"qmm[{isa},{gemm_backend}]")


@needs_ext
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bits,gs", [(4, 32), (4, 64), (8, 32), (8, 128)])
@pytest.mark.parametrize("split", ["one thread", "pool"])
def test_quantized_matmuls_each_output(isa, bits, gs, dtype, split):
    """q, k and v in one call: each output equals its own matmul, with ragged row counts (77, 45, 45: no
    multiple of a chunk or of four), decode and prefill rows, on the calling thread and split over the pool."""
    previous = cpu._ext.set_gemv_parallel_min_bytes(1 << 40 if split == "one thread" else 0)
    try:
        for M in (1, 2, 7, 33):
            for K in (gs, 3 * gs):
                check_qmm_many(ext_qmm_many, M, (77, 45, 45), K, bits, gs, dtype, seed=M + K, what=f"qmm_many[{isa}]")
        check_qmm_many(ext_qmm_many, 1, (5,), 2 * gs, bits, gs, dtype, seed=3, what=f"qmm_many[{isa}] one part")
    finally:
        cpu._ext.set_gemv_parallel_min_bytes(previous)


@needs_ext
def test_quantized_matmuls_outputs_and_errors():
    """One lazy array per weight, shaped and typed like quantized_matmul's; mismatched weights are one clear error."""
    x = make_x(2, 96, 1).reshape(1, 2, 96)
    parts = [make_quantized(n, 96, 4, 32, n) for n in (64, 16)]
    ys = cpu.quantized_matmuls(x, parts, group_size=32, bits=4)
    assert [y.shape for y in ys] == [(1, 2, 64), (1, 2, 16)]
    for y, part in zip(ys, parts):
        want = mx.quantized_matmul(x, *part, transpose=True, group_size=32, bits=4)
        assert y.dtype == want.dtype
        np.testing.assert_allclose(np.array(y), np.array(want), rtol=1e-5, atol=1e-5)
    half = (parts[1][0], parts[1][1].astype(mx.float16), parts[1][2].astype(mx.float16))
    with pytest.raises(ValueError, match="same dtype"):
        cpu.quantized_matmuls(x, [parts[0], half], group_size=32, bits=4)
    with pytest.raises(ValueError, match="shapes do not match"):
        cpu.quantized_matmuls(x, [parts[0], make_quantized(16, 64, 4, 32, 0)], group_size=32, bits=4)
    with pytest.raises(ValueError, match="at least one"):
        cpu.quantized_matmuls(x, [], group_size=32, bits=4)


@needs_ext
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bits,gs", [(4, 32), (4, 64), (8, 32), (4, 128)])
def test_gate_up_silu(isa, bits, gs, dtype):
    for M in (1, 2, 7, 33):
        for K in (gs, 3 * gs):
            check_gate_up(ext_gate_up, M, 45, K, bits, gs, dtype, seed=M + K, what=f"gate_up[{isa}]")


@needs_ext
@pytest.mark.parametrize("w_dtype", list(DTYPES))
@pytest.mark.parametrize("x_dtype", list(DTYPES))
def test_float_matmul(isa, x_dtype, w_dtype):
    for M in (1, 2, 7, 8, 33):
        for K in (1, 13, 100):
            check_matmul(ext_matmul, M, 77, K, x_dtype, w_dtype, seed=M + K, what=f"matmul[{isa}]")


@needs_ext
def test_float_matmul_prefill_rows(isa, gemm_backend):
    check_matmul(ext_matmul, 512, 150, 100, "float32", "float32", seed=3, what=f"matmul[{isa},{gemm_backend}]")
    check_matmul(ext_matmul, 33, 150, 100, "float32", "bfloat16", seed=4, what=f"matmul[{isa},{gemm_backend}]")


def _exact_sums_in_half_chunks(dtype: str, seed: int):
    """float32 values s (ties of `dtype`'s rounding, its overflow edge, random bits) and, per s, three values
    of `dtype` whose sum is s exactly in float32 in any order: s's significand cut into disjoint chunks of
    the same sign, each short enough for `dtype`."""
    rng = np.random.default_rng(seed)
    keep = 16 if dtype == "bfloat16" else 13  # float32 significand bits below the half type's
    exps = rng.integers(127 - 20, 127 + 20, 3000) if dtype == "bfloat16" else rng.integers(127, 127 + 15, 3000)
    bits = (rng.integers(0, 2, 3000) << 31) | (exps << 23) | rng.integers(0, 1 << 23, 3000)
    ties = bits[:1000] & ~np.int64((1 << keep) - 1) | (1 << (keep - 1))  # exactly halfway, odd and even
    extra = [0x477FF000, 0x477FEFFF, 0x477FFFFF] if dtype == "float16" else [0x7F7FFFFF, 0x7F7F8000]
    s = np.concatenate([bits, ties, extra]).astype(np.uint32).view(np.float32)
    chunk = np.uint32(~np.uint32((1 << keep) - 1) & 0xFFFFFFFF)
    hi = (s.view(np.uint32) & chunk).view(np.float32)
    rest = s - hi
    mid = (rest.view(np.uint32) & chunk).view(np.float32)
    lo = rest - mid
    parts = np.stack([hi, mid, lo], axis=1)
    assert np.array_equal(parts.sum(axis=1, dtype=np.float32), s)
    return s, parts


@needs_ext
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_outputs_round_to_nearest_even_like_mlx(isa, dtype):
    """A half-precision result is the float32 one rounded once, to nearest even, overflow to inf, NaN kept:
    bit for bit what MLX's astype gives (row i of w sums exactly to s[i] in float32, x is ones)."""
    s, parts = _exact_sums_in_half_chunks(dtype, seed=7)
    w = mx.array(parts).astype(DTYPES[dtype])
    assert np.array_equal(np.array(w.astype(mx.float32)), parts)  # the chunks are exact in the half type
    x = mx.ones((1, 3), dtype=DTYPES[dtype])
    got = np.array(cpu.matmul(x, w).view(mx.uint16)).reshape(-1)
    want = np.array(mx.array(s).astype(DTYPES[dtype]).view(mx.uint16))
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{bad.size} of {s.size} differ; first: s={s[bad[0]]!r} got {got[bad[0]]:#06x} want {want[bad[0]]:#06x}"
    specials = mx.array([[np.inf, 0, 0], [-np.inf, 0, 0], [np.inf, -np.inf, 0]]).astype(DTYPES[dtype])
    y = np.array(cpu.matmul(x, specials).astype(mx.float32)).reshape(-1)
    assert y[0] == np.inf and y[1] == -np.inf and np.isnan(y[2]), y


@needs_ext
def test_mixed_dtypes_promote_like_mlx():
    wq, s, b = make_quantized(40, 128, 4, 64, 0, mx.bfloat16)
    x = make_x(3, 128, 0, mx.float32)
    want, err = qmm_reference(x, wq, s, b, 64, 4)
    y = cpu.quantized_matmul(x, wq, s, b, group_size=64, bits=4)
    assert y.dtype == mx.float32
    assert_within(_f64(y), want, err, "float32", "x float32, scales bfloat16")


@needs_ext
def test_leading_dims_views_and_lazy_graphs():
    wq, s, b = make_quantized(50, 128, 4, 32, 1)
    x = make_x(6, 128, 1, lead=(2, 3))
    want = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=32, bits=4)
    got = cpu.quantized_matmul(x, wq, s, b, group_size=32, bits=4)
    assert got.shape == (2, 3, 50)
    # a transposed (non-contiguous) view of x, consumed inside a larger lazy graph and async_eval
    xt = mx.swapaxes(mx.swapaxes(x, 0, 1), 0, 1) * 1.0
    xv = mx.swapaxes(mx.array(np.array(x).transpose(1, 0, 2)), 0, 1)
    out = mx.tanh(cpu.quantized_matmul(xv, wq, s, b, group_size=32, bits=4)) + cpu.quantized_matmul(
        xt, wq, s, b, group_size=32, bits=4
    )
    mx.async_eval(out)
    np.testing.assert_allclose(np.array(out), np.array(mx.tanh(want) + want), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)
    # inside mx.compile too
    f = mx.compile(lambda a: cpu.quantized_matmul(a, wq, s, b, group_size=32, bits=4) * 2)
    np.testing.assert_allclose(np.array(f(x)), 2 * np.array(want), rtol=1e-4, atol=1e-4)


@needs_ext
def test_runs_on_the_cpu_stream_even_when_asked_for_another():
    wq, s, b = make_quantized(16, 64, 4, 32, 2)
    x = make_x(1, 64, 2)
    with mx.stream(mx.cpu):
        y = cpu.quantized_matmul(x, wq, s, b, group_size=32, bits=4)
    mx.eval(y)
    if mx.metal.is_available():  # on a Mac the default device is the GPU: the op still runs on the CPU
        with mx.stream(mx.gpu):
            z = cpu.quantized_matmul(x, wq, s, b, group_size=32, bits=4)
        np.testing.assert_allclose(np.array(z), np.array(y))


@needs_ext
@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x, wq, s, b: cpu.quantized_matmul(x, wq, s, b, group_size=32, bits=3), "bits"),
        (lambda x, wq, s, b: cpu.quantized_matmul(x, wq, s, b, group_size=64, bits=4), "shapes do not match"),
        (lambda x, wq, s, b: cpu.quantized_matmul(x.astype(mx.int32), wq, s, b, group_size=32, bits=4), "float32"),
        (lambda x, wq, s, b: cpu.matmul(x, x.T), "expected x"),
    ],
)
def test_bad_input_is_one_clear_error(call, match):
    wq, s, b = make_quantized(16, 96, 4, 32, 3)
    x = make_x(2, 96, 3)
    with pytest.raises(ValueError, match=match):
        call(x, wq, s, b)


@needs_ext
def test_environment_picks_the_path_once_at_import_and_never_raises():
    import subprocess
    import sys

    code = "import mlxedge.cpu as c; print(c.available(), c.describe())"
    run = lambda env: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    ).stdout
    assert run({"MLXEDGE_CPU_ISA": "scalar", "MLXEDGE_CPU_THREADS": "3", "MLXEDGE_CPU_BLAS": "none"}).strip() == (
        "True native cpu (portable scalar, 3 threads, built-in gemm)"
    )
    bad = run({"MLXEDGE_CPU_ISA": "sse9"})
    assert bad.startswith("False unavailable: ValueError: MLXEDGE_CPU_ISA must be one of"), bad


@needs_ext
def test_kernel_seconds_runs_and_rejects_bad_input():
    """`_ext.kernel_seconds` (scripts/bench_cpu_kernels.py's kernel-alone timer): a positive, finite time per
    call over several weight copies, and one clear error for bad input (no timing comparison: see the bench)."""
    x = make_x(1, 512, seed=3)
    copies = [make_quantized(256, 512, 4, 64, seed=i) for i in range(3)]
    t = cpu._ext.kernel_seconds(x, copies, group_size=64, bits=4, calls=7)
    assert 0 < t < 1
    with pytest.raises(ValueError, match="at least one weight triplet"):
        cpu._ext.kernel_seconds(x, [], group_size=64, bits=4, calls=1)
    with pytest.raises(ValueError, match="shapes do not match"):
        cpu._ext.kernel_seconds(make_x(1, 256, seed=3), copies, group_size=64, bits=4, calls=1)
    # sets of three (q, k, v) through the one-call kernel
    sets = [make_quantized(n, 512, 4, 64, seed=i) for i in range(2) for n in (128, 32, 32)]
    assert 0 < cpu._ext.kernel_seconds(x, sets, group_size=64, bits=4, calls=5, parts=3) < 1
    with pytest.raises(ValueError, match="whole number of sets"):
        cpu._ext.kernel_seconds(x, sets[:4], group_size=64, bits=4, calls=1, parts=3)
    with pytest.raises(ValueError, match="same shapes"):
        cpu._ext.kernel_seconds(x, sets[:3] + sets[:2] + sets[:1], group_size=64, bits=4, calls=1, parts=3)


@needs_ext
def test_read_bandwidth_reference_runs_and_rejects_bad_input():
    """`_ext.read_bandwidth` (the bench's native read reference): a positive, finite figure on one thread
    and on two, and one clear error for a buffer too small to mean anything."""
    for threads in (1, 2):
        assert 0 < cpu._ext.read_bandwidth(8 << 20, threads, 1) < float("inf")
    with pytest.raises(ValueError, match="nbytes >= 1 MiB"):
        cpu._ext.read_bandwidth(1000, 1, 1)


@needs_ext
@pytest.mark.parametrize("ahead", [False, True], ids=["plain", "prefetching"])
def test_same_size_read_reads_every_byte(ahead):
    """`_ext.read_seconds`' reads (the bench's same-size reference, here through `_ext.read_or`, the same split
    and loops) cover every byte of every buffer, on every thread count the pool has: one set bit anywhere — the
    first byte, a middle one, the last, in buffers that are not a whole number of lines, slices or kilobytes —
    shows in the OR, and all-zero buffers give 0. A slice boundary or a tail loop that skipped bytes would make
    the reference read less than the kernel does."""
    pad = [mx.zeros((5,), dtype=mx.uint8), mx.zeros((3,), dtype=mx.float32)]
    for threads in range(1, cpu._ext.threads() + 1):
        for n in (1, 63, 64, 65, 1000, 4097, 70001):
            assert cpu._ext.read_or([pad[0], mx.zeros((n,), dtype=mx.uint8), pad[1]], threads=threads, ahead=ahead) == 0
            for pos in sorted({0, n // 2, n - 1}):
                a = np.zeros(n, dtype=np.uint8)
                a[pos] = 1 << (pos % 8)
                got = cpu._ext.read_or([pad[0], mx.array(a), pad[1]], threads=threads, ahead=ahead)
                assert got != 0, f"byte {pos} of {n} unread on {threads} thread(s)"


@needs_ext
def test_same_size_read_seconds_runs_and_rejects_bad_input():
    """`_ext.read_seconds`: a positive, finite time per call for one-buffer and three-buffer sets, and one clear
    error for sets that do not divide the list, a thread count the pool does not have, or no calls."""
    arrays = [mx.full((4096,), i, dtype=mx.uint32) for i in range(6)]
    for threads in range(1, cpu._ext.threads() + 1):
        for per_set in (1, 3):
            assert 0 < cpu._ext.read_seconds(arrays, per_set=per_set, calls=4, threads=threads) < 1
    with pytest.raises(ValueError, match="whole number of sets"):
        cpu._ext.read_seconds(arrays[:4], per_set=3, calls=1, threads=1)
    with pytest.raises(ValueError, match="threads must be between 1 and"):
        cpu._ext.read_seconds(arrays, per_set=1, calls=1, threads=cpu._ext.threads() + 1)
    with pytest.raises(ValueError, match="calls >= 1"):
        cpu._ext.read_seconds(arrays, per_set=1, calls=0, threads=1)
