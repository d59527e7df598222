"""GGML block types -> MLX affine triplets (packed uint32 weights, scales, biases), in vectorized numpy.

Pure functions: raw GGUF block bytes in, MLX's quantized layout out. No file access, no MLX calls.

MLX affine quantization dequantizes as ``w = scale * q + bias`` per group of ``group_size`` elements,
q in [0, 2**bits), packed as a little-endian bitstream (element i at bits [i*b, (i+1)*b)) in uint32
words. Several GGML block types are exactly that with group 32:

    type   bits  scale       bias          q
    Q4_0   4     d           -8·d          nibble (0-15 low nibbles, 16-31 high nibbles)
    Q4_1   4     d           m             nibble
    Q5_0   5     d           -16·d         nibble | qh bit << 4
    Q5_1   5     d           m             nibble | qh bit << 4
    Q8_0   8     d           -128·d        int8 + 128
    Q4_K   4     d·sc[j]     -dmin·m[j]    per 32-element sub-block j of a 256 super-block
    Q5_K   5     d·sc[j]     -dmin·m[j]    idem, plus one high bit per element

Scales and biases are returned in float32, where these products are exact; MLX then reproduces gguf's
own dequantizer bit for bit (or to fp16 rounding of the scales, when a model stores them in fp16).

Q2_K, Q3_K and Q6_K use 16-element sub-blocks with their own scales, which MLX groups (32/64/128)
cannot hold. Decision: they are dequantized with gguf's reference dequantizer and re-quantized to MLX
8-bit affine with group 32 (min/max; scales and biases rounded to float16 first so a later cast to
fp16 is lossless). 8 bits is more than any of them carries (2.6/3.4/6.6 bits per weight), the memory
cost stays near Q8_0, and `requantize_affine` reports the largest absolute deviation from gguf's
dequantized values, which the GGUF source surfaces in `Model.info`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

GROUP = 32  # every exact mapping uses MLX group size 32
REQUANT_BITS = 8  # bits used for the block types MLX cannot hold exactly

FLOAT_TYPES = (T.F32, T.F16, T.BF16)
EXACT_BITS = {T.Q4_0: 4, T.Q4_1: 4, T.Q5_0: 5, T.Q5_1: 5, T.Q8_0: 8, T.Q4_K: 4, T.Q5_K: 5}
REQUANT_TYPES = (T.Q2_K, T.Q3_K, T.Q6_K)
SUPPORTED_TYPES = FLOAT_TYPES + tuple(EXACT_BITS) + REQUANT_TYPES


@dataclass
class AffineTensor:
    """An MLX affine-quantized matrix: weight uint32 [rows, cols*bits/32], scales/biases [rows, cols/group]."""

    weight: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int
    group_size: int
    exact: bool
    max_abs_deviation: float  # vs gguf's dequantizer, with float32 scales; 0.0 for exact mappings


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack integers q (uint8, last axis a multiple of 32) into MLX's little-endian bitstream of uint32 words."""
    *lead, n = q.shape
    if n % 32:
        raise ValueError(f"last axis {n} is not a multiple of 32")
    # the two widths every start-up converts (Q4_*, Q8_0) pack byte by byte: a few times faster
    if bits == 8:
        return np.ascontiguousarray(q, dtype=np.uint8).view(np.uint32)
    if bits == 4:
        q = q.astype(np.uint8, copy=False)
        return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4)).view(np.uint32)
    eight = q.reshape(*lead, n // 8, 8)
    acc = np.zeros(eight.shape[:-1], dtype=np.uint64)
    for k in range(8):  # 8 elements of b bits = b bytes, so every run of 8 ends on a byte boundary
        acc |= eight[..., k].astype(np.uint64) << np.uint64(bits * k)
    as_bytes = acc[..., None].view(np.uint8).reshape(*acc.shape, 8)[..., :bits]
    return np.ascontiguousarray(as_bytes).reshape(*lead, n * bits // 8).view(np.uint32)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 stored at byte offset `start` of every block, as float32 column [n, 1]."""
    return np.ascontiguousarray(blocks[:, start:start + 2]).view(np.float16).astype(np.float32)


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 four-bit values: low nibbles are elements 0-15, high nibbles 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits32(qh: np.ndarray) -> np.ndarray:
    """4 bytes (a little-endian uint32) -> 32 single bits, element j = bit j."""
    bits = np.unpackbits(qh, axis=-1, bitorder="little")
    return bits


def _k_scale_min(packed: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Unpack Q4_K/Q5_K's 12 bytes of 6-bit sub-block scales and mins -> ([n, 8], [n, 8]) uint8."""
    lo, mid, hi = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc, mn


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> 256 nibbles: each 32-byte chunk c gives sub-block 2c (low) then 2c+1 (high)."""
    n = qs.shape[0]
    chunks = qs.reshape(n, 4, 1, 32)
    return np.concatenate([chunks & 0x0F, chunks >> 4], axis=2).reshape(n, 256)


def decode_exact(blocks: np.ndarray, qtype: T) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split blocks [n, type_size] (uint8) into q [n, block_size] and scales, biases [n, block_size/32]."""
    n = blocks.shape[0]
    if qtype == T.Q4_0:
        d = _f16(blocks, 0)
        return _nibbles32(blocks[:, 2:18]), d, -8.0 * d
    if qtype == T.Q4_1:
        return _nibbles32(blocks[:, 4:20]), _f16(blocks, 0), _f16(blocks, 2)
    if qtype == T.Q5_0:
        d = _f16(blocks, 0)
        q = _nibbles32(blocks[:, 6:22]) | (_high_bits32(blocks[:, 2:6]) << 4)
        return q, d, -16.0 * d
    if qtype == T.Q5_1:
        q = _nibbles32(blocks[:, 8:24]) | (_high_bits32(blocks[:, 4:8]) << 4)
        return q, _f16(blocks, 0), _f16(blocks, 2)
    if qtype == T.Q8_0:
        d = _f16(blocks, 0)
        return blocks[:, 2:34] ^ np.uint8(0x80), d, -128.0 * d  # int8 x -> x + 128
    if qtype in (T.Q4_K, T.Q5_K):
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        sc, mn = _k_scale_min(blocks[:, 4:16])
        if qtype == T.Q4_K:
            q = _k_low_nibbles(blocks[:, 16:144])
        else:
            qh = blocks[:, 16:48]  # bit i of byte l is the high bit of element l of sub-block i
            high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
            q = _k_low_nibbles(blocks[:, 48:176]) | (high.reshape(n, 256) << 4)
        return q, d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))
    raise ValueError(f"{qtype.name} has no exact MLX affine form")


def as_blocks(data: np.ndarray, qtype: T) -> np.ndarray:
    """View a quantized tensor's bytes [rows, row_bytes] as blocks [rows * blocks_per_row, type_size]."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    return np.ascontiguousarray(data).view(np.uint8).reshape(-1, type_size)


CHUNK_ELEMENTS = 1 << 22  # rows are converted in slices of about this many weights, to bound temporaries


def to_affine(data: np.ndarray, qtype: T) -> AffineTensor:
    """Convert a quantized GGUF matrix (uint8 [rows, row_bytes]) into an MLX affine triplet.

    Works through the rows in slices, so temporary memory stays a few times CHUNK_ELEMENTS bytes
    whatever the tensor's size (a 128k-token embedding included).
    """
    if qtype not in EXACT_BITS and qtype not in REQUANT_TYPES:
        raise ValueError(f"{qtype.name} is not a quantized type mlxedge maps to MLX affine")
    rows = data.shape[0]
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    cols = data.shape[1] // type_size * block_size
    bits = EXACT_BITS.get(qtype, REQUANT_BITS)
    weight = np.empty((rows, cols * bits // 32), dtype=np.uint32)
    scales = np.empty((rows, cols // GROUP), dtype=np.float32)
    biases = np.empty((rows, cols // GROUP), dtype=np.float32)
    deviation = 0.0
    step = max(1, CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        part = _affine_rows(data[start:start + step], qtype, cols)
        weight[start:start + step], scales[start:start + step], biases[start:start + step] = \
            part.weight, part.scales, part.biases
        deviation = max(deviation, part.max_abs_deviation)
    return AffineTensor(weight, scales, biases, bits, GROUP, qtype in EXACT_BITS, deviation)


def _affine_rows(data: np.ndarray, qtype: T, cols: int) -> AffineTensor:
    rows = data.shape[0]
    blocks = as_blocks(data, qtype)
    if qtype in EXACT_BITS:
        bits = EXACT_BITS[qtype]
        q, scales, biases = decode_exact(blocks, qtype)
        return AffineTensor(pack_bits(q.reshape(rows, cols), bits), scales.reshape(rows, cols // GROUP),
                            biases.reshape(rows, cols // GROUP), bits, GROUP, True, 0.0)
    values = gguf_dequantize(blocks, qtype).reshape(rows, cols)
    return requantize_affine(values, REQUANT_BITS, GROUP)


def _next_f16(x: np.ndarray, direction: float) -> np.ndarray:
    return np.nextafter(x.astype(np.float16), np.float16(direction)).astype(np.float32)


def _f16_toward(x: np.ndarray, direction: float) -> np.ndarray:
    """Round float32 x to a float16 value, stepping one float16 ulp toward `direction` where rounding went the other way."""
    r = x.astype(np.float16).astype(np.float32)
    wrong = r < x if direction > 0 else r > x
    return np.where(wrong, _next_f16(r, direction), r)


def requantize_affine(values: np.ndarray, bits: int = REQUANT_BITS, group_size: int = GROUP) -> AffineTensor:
    """Min/max affine quantization of float values [rows, cols] with float16-representable scales/biases.

    The bias (the group minimum) is rounded down and the scale up to float16 values before the
    integers are chosen, so dequantizing with float16 or float32 scales gives the same values.
    """
    rows, cols = values.shape
    g = values.astype(np.float32).reshape(rows, cols // group_size, group_size)
    lo, hi = g.min(axis=-1), g.max(axis=-1)
    levels = (1 << bits) - 1
    bias = _f16_toward(lo, -np.inf)  # at or below the minimum
    scale = _f16_toward((hi - bias) / levels, np.inf)  # covers the maximum
    scale = np.where(bias + scale * levels < hi, _next_f16(scale, np.inf), scale)
    safe = np.where(scale == 0, 1.0, scale)
    q = np.clip(np.rint((g - bias[..., None]) / safe[..., None]), 0, levels).astype(np.uint8)
    approx = scale[..., None] * q.astype(np.float32) + bias[..., None]
    deviation = float(np.max(np.abs(approx - g))) if g.size else 0.0
    return AffineTensor(pack_bits(q.reshape(rows, cols), bits), scale, bias, bits, group_size, False, deviation)
