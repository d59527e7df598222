"""Every GGML block type mlxedge reads, decoded through MLX, against gguf's own dequantizer.

Reference: `gguf.quants.dequantize` (llama.cpp's Python reference). Synthetic blocks come from gguf's
quantizer where it has one (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and are crafted byte by byte otherwise
(random payload bytes, so every nibble, high bit and 6-bit scale/min code occurs, with sane float16
super-block scales). The MLX side is `mx.dequantize`, an independent decoder of MLX's layout.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from mlxedge.sources.gguf import blocks as gb

ROWS, COLS = 48, 512
QUANTIZABLE = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
CRAFTED_EXACT = [T.Q4_K, T.Q5_K]


def _crafted(qtype: T, rows: int = ROWS, cols: int = COLS, seed: int = 0) -> np.ndarray:
    """Random K-quant blocks with float16 d (and dmin) in a realistic range; raw bytes [rows, row_bytes]."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    n = blocks.shape[0]

    def f16(lo, hi):
        return rng.uniform(lo, hi, n).astype(np.float16).view(np.uint8).reshape(n, 2)

    if qtype in (T.Q4_K, T.Q5_K):  # d, dmin first
        blocks[:, 0:2], blocks[:, 2:4] = f16(1e-4, 2e-3), f16(1e-4, 2e-3)
    elif qtype == T.Q2_K:  # scales, qs, then d, dmin last
        blocks[:, -4:-2], blocks[:, -2:] = f16(1e-3, 1e-2), f16(1e-3, 1e-2)
    else:  # Q3_K, Q6_K: d last
        blocks[:, -2:] = f16(1e-4, 2e-3)
    return blocks.reshape(rows, -1)


def _mlx_dequant(a: gb.AffineTensor, scale_dtype=mx.float32) -> np.ndarray:
    out = mx.dequantize(mx.array(a.weight), mx.array(a.scales).astype(scale_dtype),
                        mx.array(a.biases).astype(scale_dtype), group_size=a.group_size, bits=a.bits)
    return np.array(out.astype(mx.float32))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_bits_matches_mlx_layout(bits):
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, size=(6, 128), dtype=np.uint8)
    packed = gb.pack_bits(q, bits)
    assert packed.dtype == np.uint32 and packed.shape == (6, 128 * bits // 32)
    ones, zeros = mx.ones((6, 4)), mx.zeros((6, 4))
    decoded = np.array(mx.dequantize(mx.array(packed), ones, zeros, group_size=32, bits=bits))
    np.testing.assert_array_equal(decoded, q.astype(np.float32))


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_exact_types_from_gguf_quantizer(qtype):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((ROWS, COLS)) * rng.uniform(0.01, 2.0, (ROWS, 1))).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block (d == 0)
    raw = quantize(w, qtype)
    ref = dequantize(raw, qtype)
    a = gb.to_affine(raw, qtype)
    assert a.exact and a.max_abs_deviation == 0.0 and a.group_size == 32 and a.bits == gb.EXACT_BITS[qtype]
    np.testing.assert_array_equal(_mlx_dequant(a), ref)  # bit for bit with float32 scales
    # with float16 scales/biases (a model stored in fp16): these types' scales are float16 values already
    np.testing.assert_allclose(_mlx_dequant(a, mx.float16), ref, rtol=2e-3, atol=1e-3 * np.abs(ref).max())


@pytest.mark.parametrize("qtype", CRAFTED_EXACT, ids=lambda t: t.name)
def test_exact_k_types_from_crafted_blocks(qtype):
    raw = _crafted(qtype)
    ref = dequantize(raw, qtype)
    a = gb.to_affine(raw, qtype)
    assert a.exact and a.bits == gb.EXACT_BITS[qtype]
    np.testing.assert_array_equal(_mlx_dequant(a), ref)
    # fp16 scales round d·sc (17 significant bits) to 11: relative error about 2^-11 per factor
    err16 = np.abs(_mlx_dequant(a, mx.float16) - ref).max()
    assert err16 <= 4e-3 * np.abs(ref).max()


@pytest.mark.parametrize("qtype", list(gb.REQUANT_TYPES), ids=lambda t: t.name)
def test_requantized_types_report_their_deviation(qtype):
    raw = _crafted(qtype)
    ref = dequantize(raw, qtype)
    a = gb.to_affine(raw, qtype)
    assert not a.exact and a.bits == 8 and a.group_size == 32
    got = _mlx_dequant(a)
    actual = np.abs(got - ref).max()
    assert actual == pytest.approx(a.max_abs_deviation, rel=1e-6, abs=1e-12)
    # min/max 8-bit: every value within half of its group's step, and the step barely above range/255
    groups = ref.reshape(ROWS, -1, 32)
    err = np.abs(got - ref).reshape(ROWS, -1, 32).max(-1)
    assert (err <= a.scales / 2 * (1 + 1e-5) + 1e-9).all()
    step_floor = (groups.max(-1) - groups.min(-1)) / 255
    bias_ulp = np.abs(groups).max(-1) * 2 ** -10  # the bias is the minimum rounded down to float16
    assert (a.scales <= step_floor * (1 + 2 ** -9) + 2 * bias_ulp / 255 + 2 ** -24).all()
    # scales and biases are float16 values, so a model in fp16 loses nothing more on them
    np.testing.assert_array_equal(a.scales, a.scales.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(a.biases, a.biases.astype(np.float16).astype(np.float32))


def test_q4_0_nibble_order_on_a_hand_made_block():
    """Byte j's low nibble is element j and its high nibble element j+16 (not 2j, 2j+1)."""
    block = np.zeros((1, 18), dtype=np.uint8)
    block[0, 0:2] = np.array([1.0], dtype=np.float16).view(np.uint8)  # d = 1
    block[0, 2] = 0x9A  # element 0 -> 0xA - 8 = 2, element 16 -> 0x9 - 8 = 1
    block[0, 3:] = 0x88  # everything else 0
    a = gb.to_affine(block, T.Q4_0)
    values = _mlx_dequant(a)[0]
    assert values[0] == 2.0 and values[16] == 1.0 and values[1] == 0.0
    np.testing.assert_array_equal(values, dequantize(block, T.Q4_0)[0])


def test_unsupported_type_is_refused():
    with pytest.raises(ValueError, match="IQ2_XXS"):
        gb.to_affine(np.zeros((1, 66), dtype=np.uint8), T.IQ2_XXS)


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
def test_row_slicing_gives_the_same_result(qtype, monkeypatch):
    """Large tensors are converted in row slices; slicing (uneven last slice included) changes nothing."""
    raw = quantize(np.random.default_rng(5).standard_normal((37, 512)).astype(np.float32), qtype) \
        if qtype == T.Q4_1 else _crafted(qtype, rows=37)
    whole = gb.to_affine(raw, qtype)
    monkeypatch.setattr(gb, "CHUNK_ELEMENTS", 3 * 512)
    sliced = gb.to_affine(raw, qtype)
    for field in ("weight", "scales", "biases"):
        np.testing.assert_array_equal(getattr(sliced, field), getattr(whole, field))
    assert sliced.max_abs_deviation == whole.max_abs_deviation
