"""Quantizers for llama.cpp's K-quant blocks that the `gguf` package can read but not write: Q4_K and Q6_K.

Both work on super-blocks of 256 weights (rows must be a multiple of 256):
- Q4_K: 8 sub-blocks of 32, value = d·sc_j·q − dmin·m_j with q in [0, 15] and 6-bit sc_j, m_j;
  bytes: d (f16), dmin (f16), 12 bytes of packed 6-bit scales/mins, 128 bytes of nibbles.
- Q6_K: 16 sub-blocks of 16, value = d·s_j·(q − 32) with q in [0, 63] and int8 s_j;
  bytes: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales, d (f16).
The layouts are the inverse of gguf's `dequantize_blocks` (tests check the round trip against it).
Scales are chosen by min/max per sub-block (round-to-nearest), then the integer levels are recomputed
against the quantized scales so the error stays within half a step of the stored grid.
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """float32 [n, k] (k % 256 == 0) -> uint8 [n, k/256 · 144]."""
    n, k = rows.shape
    x = rows.astype(np.float32).reshape(-1, 8, 32)  # super-blocks × sub-blocks × elements
    lo = np.minimum(x.min(-1), 0.0)
    hi = x.max(-1)
    scale = (hi - lo) / 15.0
    mins = -lo
    d = _f16(scale.max(-1) / 62.0)  # headroom so rounding sc up stays within 6 bits
    dmin = _f16(mins.max(-1) / 63.0)
    d32, dmin32 = d.astype(np.float32), dmin.astype(np.float32)
    sc = np.clip(np.ceil(scale / np.where(d32 > 0, d32, 1)[:, None]), 0, 63).astype(np.uint8)  # never clips the top
    m = np.clip(np.rint(mins / np.where(dmin32 > 0, dmin32, 1)[:, None]), 0, 63).astype(np.uint8)
    step = d32[:, None] * sc
    offset = dmin32[:, None] * m
    q = np.clip(np.rint((x + offset[..., None]) / np.where(step > 0, step, 1)[..., None]), 0, 15).astype(np.uint8)
    q = np.where(step[..., None] > 0, q, 0).astype(np.uint8)
    scales = np.zeros((x.shape[0], 12), np.uint8)
    scales[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = (m[:, 0:4] & 0x3F) | ((m[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    qs = q.reshape(-1, 4, 2, 32)
    nibbles = (qs[:, :, 0, :] | (qs[:, :, 1, :] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), scales, nibbles],
                            axis=1)
    return blocks.reshape(n, k // QK_K * 144)


def quantize_q6_k(rows: np.ndarray) -> np.ndarray:
    """float32 [n, k] (k % 256 == 0) -> uint8 [n, k/256 · 210]."""
    n, k = rows.shape
    x = rows.astype(np.float32).reshape(-1, 16, 16)
    amax = np.abs(x).max(-1)
    s = amax / 31.0
    d = _f16(s.max(-1) / 127.0)
    d32 = d.astype(np.float32)
    si = np.clip(np.rint(s / np.where(d32 > 0, d32, 1)[:, None]), -128, 127).astype(np.int8)
    step = d32[:, None] * si.astype(np.float32)
    q = np.clip(np.rint(x / np.where(step > 0, step, 1)[..., None]) + 32, 0, 63)
    q = np.where(step[..., None] > 0, q, 32).astype(np.uint8).reshape(-1, 8, 32)  # rows r of 32 elements
    low, high = q & 0x0F, q >> 4
    ql = np.zeros((q.shape[0], 2, 2, 32), np.uint8)  # [half][element block within half][i]
    qh = np.zeros((q.shape[0], 2, 32), np.uint8)
    for r in range(8):
        half, nibble_shift, block = r // 4, 4 * ((r // 2) % 2), r % 2
        ql[:, half, block, :] |= low[:, r, :] << nibble_shift
        qh[:, half, :] |= high[:, r, :] << (2 * (r % 4))
    blocks = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), si.view(np.uint8).reshape(-1, 16),
                             d.reshape(-1, 1).view(np.uint8)], axis=1)
    return blocks.reshape(n, k // QK_K * 210)
