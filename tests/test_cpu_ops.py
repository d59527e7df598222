"""Native RMS norm, rope and attention (mlxedge.cpu) against float64 numpy references, on every ISA path.

Bounds (u = 2^-24, float32 accumulation; u_out = the output dtype's unit roundoff):
- rms_norm: the float32 sum of D squares is within D·u of the exact one, so the row's scale is within
  (D/2 + 2)·u; the result within that relative error plus one rounding before and one after the weight
  multiply (in the output dtype, as mx.fast.rms_norm rounds).
- rope: angles are computed in double and rounded once to float32 cos/sin; each output is a two-term sum
  of products: within 8·u·(|a| + |b|) of the exact rotation, plus one output rounding.
- sdpa: scores within (D + 8)·u·scale·|q|·|k_j| (float32 dot products); the softmax weights then within
  2·max|Δs| + (n + 16)·u + 4e-7 (the vectorised exp) relative, so the output within that times Σ p_j |v_j|.
A planted bug (tests/test_cpu_mutations.py) misses these bounds by orders of magnitude.

The `check_*` functions take `run` callables on mx arrays and drive the ctypes builds of the kernels in
the mutation tests too.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest

import mlxedge.cpu as cpu
from test_cpu_kernels import DTYPES, ISAS, TINY_OUT, U32, U_OUT, assert_within

needs_ext = pytest.mark.skipif(not cpu.available(), reason=f"native CPU kernels: {cpu.describe()}")


def _f64(a) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def _rand(shape, seed, dtype="float32", scale=1.0, shift=0.0):
    rng = np.random.default_rng(seed)
    return mx.array((rng.standard_normal(shape) * scale + shift).astype(np.float32)).astype(DTYPES[dtype])


# ------------------------------------------------------------------ references and checks (shared)


def check_rms_norm(run, M, D, dtype="float32", weight=True, seed=0, eps=1e-5, what="rms_norm"):
    x = _rand((M, D), seed, dtype, scale=2.0, shift=0.5)
    w = _rand((D,), seed + 1, dtype) if weight else None
    xd = _f64(x)
    r = 1.0 / np.sqrt(np.mean(xd * xd, axis=-1, keepdims=True) + eps)
    n = xd * r
    wd = _f64(w) if weight else np.ones(D)
    want = n * wd
    u_out = U_OUT[dtype]
    err = (D / 2 + 4) * U32 * np.abs(want) + 2 * u_out * np.abs(n * wd) + TINY_OUT[dtype]
    got = run(x, w, eps)
    assert_within(got, want, err, dtype, f"{what} M={M} D={D} {dtype} weight={weight}")


def rope_reference(xd, dims, traditional, base, scale, offset, freqs=None):
    """float64 rotary embedding of x [..., L, D] (positions offset + l)."""
    L = xd.shape[-2]
    half = dims // 2
    inv = (1.0 / np.asarray(freqs, np.float64)) if freqs is not None else base ** (-2.0 * np.arange(half) / dims)
    ang = scale * (offset + np.arange(L))[:, None] * inv[None, :]
    c, s = np.cos(ang), np.sin(ang)
    y = xd.copy()
    if traditional:
        a, b = xd[..., 0:dims:2], xd[..., 1:dims:2]
        y[..., 0:dims:2], y[..., 1:dims:2] = a * c - b * s, a * s + b * c
    else:
        a, b = xd[..., :half], xd[..., half:dims]
        y[..., :half], y[..., half:dims] = a * c - b * s, a * s + b * c
    mag = np.abs(xd).copy()
    if traditional:
        m = np.abs(xd[..., 0:dims:2]) + np.abs(xd[..., 1:dims:2])
        mag[..., 0:dims:2] = mag[..., 1:dims:2] = m
    else:
        m = np.abs(xd[..., :half]) + np.abs(xd[..., half:dims])
        mag[..., :half] = mag[..., half:dims] = m
    return y, mag


def check_rope(run, shape, dims, traditional, dtype="float32", offset=0, base=10000.0, scale=1.0,
               freqs=False, transposed=False, seed=0, what="rope"):
    x = _rand(shape, seed, dtype)
    if transposed:  # a [B, L, H, D] projection viewed as [B, H, L, D], as attention hands it over
        B, H, L, D = shape
        x = _rand((B, L, H, D), seed, dtype).transpose(0, 2, 1, 3)
    f = _rand((dims // 2,), seed + 2, "float32", scale=0.0, shift=1.0) * mx.arange(1, dims // 2 + 1) if freqs else None
    want, mag = rope_reference(_f64(x), dims, traditional, base, scale, offset,
                               np.array(f, np.float64) if freqs else None)
    err = 8 * U32 * mag
    got = run(x, dims, traditional, base, scale, offset, f)
    assert_within(got, want, err, dtype, f"{what} {shape} dims={dims} trad={traditional} off={offset} {dtype}")


def sdpa_reference(qd, kd, vd, scale, causal):
    B, Hq, Lq, D = qd.shape
    Hkv, Lk = kd.shape[1], kd.shape[2]
    g = Hq // Hkv
    out = np.zeros_like(qd)
    err = np.zeros_like(qd)
    for b in range(B):
        for h in range(Hq):
            k, v = kd[b, h // g], vd[b, h // g]
            s = scale * qd[b, h] @ k.T  # [Lq, Lk]
            sabs = scale * np.abs(qd[b, h]) @ np.abs(k).T
            for i in range(Lq):
                n = min(Lk, Lk - Lq + i + 1) if causal else Lk
                row = s[i, :n]
                p = np.exp(row - row.max())
                p /= p.sum()
                out[b, h, i] = p @ v[:n]
                ds = (D + 8) * U32 * sabs[i, :n].max()
                rel = 2 * ds + (n + 16) * U32 + 4e-7
                err[b, h, i] = rel * (p @ np.abs(v[:n])) + 4 * U32 * np.abs(out[b, h, i])
    return out, err


def check_sdpa(run, B, Hq, Hkv, Lq, Lk, D, causal, dtype="float32", strided=False, seed=0, what="sdpa"):
    q = _rand((B, Hq, Lq, D), seed, dtype)
    if strided:  # K/V as a slice of a larger preallocated cache, read in place
        k = _rand((B, Hkv, Lk + 11, D), seed + 1, dtype)[:, :, :Lk, :]
        v = _rand((B, Hkv, Lk + 11, D), seed + 2, dtype)[:, :, :Lk, :]
    else:
        k, v = _rand((B, Hkv, Lk, D), seed + 1, dtype), _rand((B, Hkv, Lk, D), seed + 2, dtype)
    scale = D ** -0.5
    want, err = sdpa_reference(_f64(q), _f64(k), _f64(v), scale, causal)
    got = run(q, k, v, scale, causal)
    assert_within(got, want, err, dtype, f"{what} B={B} Hq={Hq} Hkv={Hkv} Lq={Lq} Lk={Lk} D={D} causal={causal} {dtype}")


# ------------------------------------------------------------------ the MLX extension


@pytest.fixture(params=ISAS)
def isa(request):
    cpu._configure(isa=request.param)
    yield request.param
    cpu._configure(isa=os.environ.get("MLXEDGE_CPU_ISA", "auto"))


def ext_rms_norm(x, w, eps):
    y = cpu.rms_norm(x, w, eps)
    assert y.dtype == mx.fast.rms_norm(x, w, eps).dtype
    return _f64(y)


def ext_rope(x, dims, traditional, base, scale, offset, freqs):
    y = cpu.rope(x, dims, traditional=traditional, base=None if freqs is not None else base, scale=scale,
                 offset=offset, freqs=freqs)
    assert y.dtype == x.dtype and y.shape == x.shape
    return _f64(y)


def ext_sdpa(q, k, v, scale, causal):
    y = cpu.sdpa(q, k, v, scale=scale, causal=causal)
    assert y.dtype == q.dtype and y.shape == q.shape
    return _f64(y)


@needs_ext
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_rms_norm(isa, dtype):
    for M in (1, 2, 7, 33):
        for D in (1, 13, 64, 576):
            check_rms_norm(ext_rms_norm, M, D, dtype, weight=True, seed=M + D, what=f"rms_norm[{isa}]")
    check_rms_norm(ext_rms_norm, 3, 100, dtype, weight=False, what=f"rms_norm[{isa}]")
    check_rms_norm(ext_rms_norm, 600, 96, dtype, weight=True, what=f"rms_norm[{isa}]")  # several tasks


@needs_ext
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("traditional", [False, True])
def test_rope(isa, dtype, traditional):
    for shape, dims in (((1, 9, 1, 64), 64), ((2, 3, 7, 64), 64), ((1, 2, 5, 20), 12), ((3, 33, 48), 48)):
        for offset in (0, 1, 4093):
            check_rope(ext_rope, shape, dims, traditional, dtype, offset=offset, base=100000.0, seed=offset,
                       what=f"rope[{isa}]")
    check_rope(ext_rope, (1, 4, 6, 32), 32, traditional, dtype, offset=9, scale=0.25, transposed=True,
               what=f"rope[{isa}]")
    check_rope(ext_rope, (1, 4, 6, 32), 32, traditional, dtype, offset=9, freqs=True, what=f"rope[{isa}]")
    check_rope(ext_rope, (2, 8, 600, 16), 16, traditional, dtype, offset=3, what=f"rope[{isa}]")  # several tasks


@needs_ext
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_sdpa(isa, dtype):
    cases = [  # (B, Hq, Hkv, Lq, Lk, D)
        (1, 9, 3, 1, 1, 64), (1, 9, 3, 1, 37, 64), (2, 4, 4, 1, 20, 13), (1, 6, 2, 7, 7, 32),
        (1, 2, 1, 5, 40, 64), (2, 3, 1, 33, 33, 24), (1, 4, 2, 40, 40, 16),
    ]
    for i, (B, Hq, Hkv, Lq, Lk, D) in enumerate(cases):
        for causal in (False, True):
            check_sdpa(ext_sdpa, B, Hq, Hkv, Lq, Lk, D, causal, dtype, strided=i % 2 == 1, seed=i,
                       what=f"sdpa[{isa}]")


@needs_ext
def test_sdpa_long_context_and_many_query_blocks(isa):
    check_sdpa(ext_sdpa, 1, 3, 1, 1, 700, 64, False, strided=True, what=f"sdpa[{isa}]")
    check_sdpa(ext_sdpa, 1, 2, 2, 130, 150, 32, True, what=f"sdpa[{isa}]")


@needs_ext
def test_ops_agree_with_mlx_fast_ops():
    """The layers swap mx.fast's ops for these: same results (float32) on an attention-shaped problem."""
    x = _rand((1, 5, 576), 0)
    w = _rand((576,), 1)
    np.testing.assert_allclose(np.array(cpu.rms_norm(x, w, 1e-5)), np.array(mx.fast.rms_norm(x, w, 1e-5)),
                               rtol=1e-5, atol=1e-5)
    q = _rand((1, 5, 9, 64), 2).transpose(0, 2, 1, 3)
    for trad in (False, True):
        got = cpu.rope(q, 64, traditional=trad, base=100000.0, scale=1.0, offset=77)
        want = mx.fast.rope(q, 64, traditional=trad, base=100000.0, scale=1.0, offset=77)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)
    k, v = _rand((1, 3, 300, 64), 3)[:, :, :90], _rand((1, 3, 300, 64), 4)[:, :, :90]
    qq = _rand((1, 9, 5, 64), 5)
    for mask in (None, "causal"):
        got = cpu.sdpa(qq, k, v, scale=0.125, causal=mask is not None)
        want = mx.fast.scaled_dot_product_attention(qq, k, v, scale=0.125, mask=mask)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: cpu.rms_norm(mx.zeros((2, 8)), mx.zeros((7,)), 1e-5), "weight must be"),
        (lambda: cpu.rope(mx.zeros((2, 8)), 3, traditional=False, base=1e4, scale=1.0, offset=0), "dims"),
        (lambda: cpu.rope(mx.zeros((8,)), 8, traditional=False, base=1e4, scale=1.0, offset=0), "L, D"),
        (lambda: cpu.sdpa(mx.zeros((1, 3, 1, 8)), mx.zeros((1, 2, 4, 8)), mx.zeros((1, 2, 4, 8)),
                          scale=1.0, causal=False), "shapes do not match"),
        (lambda: cpu.sdpa(mx.zeros((1, 2, 1, 8)), mx.zeros((1, 2, 4, 8), mx.float16), mx.zeros((1, 2, 4, 8)),
                          scale=1.0, causal=False), "one dtype"),
        (lambda: cpu.rms_norm(mx.zeros((2, 8), mx.int32), None, 1e-5), "float32"),
    ],
)
def test_bad_input_is_one_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
