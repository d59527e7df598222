"""Data-aware affine quantization: choose each group's scale and bias to minimise an importance-weighted
error instead of taking min/max (round-to-nearest).

importance[j] is the mean squared activation entering input column j (collected on a calibration text, as
llama.cpp's imatrix does); the error of a group is Σ_j importance[j]·(w_j − (s·q_j + b))². For each group
the search tries several grid spacings around (max−min)/(2^bits−1), rounds, then solves the weighted
least-squares (s, b) for those integer levels in closed form (llama.cpp's make_qkx2_quants idea), and keeps
the best. Output is MLX's affine layout (uint32 words holding a continuous bitstream, lowest bits first),
so the result loads and runs anywhere mx.quantize's output does.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .affine import QuantSpec

SEARCH_STEPS = 20  # grid spacings tried between (nmax − 0.5) and (nmax + 1.5) levels over the range


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer levels [rows, cols] into MLX's uint32 words [rows, cols·bits/32]."""
    rows, cols = q.shape
    words = cols * bits // 32
    out = np.zeros((rows, words), dtype=np.uint64)
    q = q.astype(np.uint64)
    for i in range(cols):  # a loop over columns (≤ a few thousand); each step is vectorised over rows
        start = i * bits
        w, off = divmod(start, 32)
        out[:, w] |= (q[:, i] << np.uint64(off)) & np.uint64(0xFFFFFFFF)
        if off + bits > 32:
            out[:, w + 1] |= q[:, i] >> np.uint64(32 - off)
    return out.astype(np.uint32)


ROW_SLICE_ELEMENTS = 1 << 21  # rows are searched in slices of about this many weights, to bound temporaries


def weighted_quantize(weight, importance: Optional[np.ndarray], spec: QuantSpec):
    """(packed uint32, scales, biases) as mx arrays (float32 scales) for weight [out, in].

    Rows are independent (each group's search sees only its own row), so they are searched in slices: the
    temporaries stay a few times ROW_SLICE_ELEMENTS floats whatever the matrix (a 262k-token embedding too).
    """
    w = np.asarray(weight.astype(mx.float32) if isinstance(weight, mx.array) else weight, dtype=np.float32)
    rows, cols = w.shape
    imp = np.ones(cols, np.float32) if importance is None else np.asarray(importance, np.float32)
    imp = np.maximum(imp, 1e-12 * max(float(imp.max()), 1e-30))
    q = np.empty((rows, cols), np.uint32)
    scales = np.empty((rows, cols // spec.group_size), np.float32)
    biases = np.empty_like(scales)
    step = max(1, ROW_SLICE_ELEMENTS // cols)
    for start in range(0, rows, step):
        end = min(rows, start + step)
        q[start:end], scales[start:end], biases[start:end] = _search_rows(w[start:end], imp, spec)
    return mx.array(pack_bits(q, spec.bits)), mx.array(scales), mx.array(biases)


def _search_rows(w: np.ndarray, imp: np.ndarray, spec: QuantSpec):
    """Levels [rows, cols], scales and biases [rows, groups] of the weighted search for these rows."""
    rows, cols = w.shape
    g, nmax = spec.group_size, (1 << spec.bits) - 1
    x = w.reshape(rows, cols // g, g)
    # as llama.cpp weighs its K-quant searches: importance × sqrt(σ² + w²), σ² = 2·mean(w²) of the row, so
    # large weights (the outliers that matter most) are not clipped away for a smaller average error
    sigma2 = 2.0 * (w * w).mean(axis=1, keepdims=True)
    wt = imp.reshape(1, cols // g, g) * np.sqrt(sigma2[:, :, None] + x * x)
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    span = np.maximum(hi - lo, 1e-12)
    sw = wt.sum(-1, keepdims=True)
    best_err = np.full(lo.shape, np.inf, np.float32)
    best_s, best_b = span / nmax, lo.copy()
    for step in range(SEARCH_STEPS + 1):  # llama.cpp's make_qkx2_quants range: nmax − 0.5 … nmax + 1.5
        iscale = (nmax - 0.5 + 0.1 * step * 20 / SEARCH_STEPS) / span
        if np.any(iscale <= 0):
            continue
        q = np.clip(np.rint((x - lo) * iscale), 0, nmax)
        # weighted least squares for x ≈ s·q + b
        sq, sqq = (wt * q).sum(-1, keepdims=True), (wt * q * q).sum(-1, keepdims=True)
        sx, sqx = (wt * x).sum(-1, keepdims=True), (wt * q * x).sum(-1, keepdims=True)
        det = sw * sqq - sq * sq
        ok = det > 1e-20
        s = np.where(ok, (sw * sqx - sq * sx) / np.where(ok, det, 1), span / nmax)
        b = np.where(ok, (sqq * sx - sq * sqx) / np.where(ok, det, 1), lo)
        err = (wt * (s * q + b - x) ** 2).sum(-1, keepdims=True)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s, best_b = np.where(better, s, best_s), np.where(better, b, best_b)
    # the final levels for the chosen (s, b): nearest level, so dequantization is exactly s·q + b
    safe_s = np.where(np.abs(best_s) > 1e-30, best_s, 1.0)
    q = np.clip(np.rint((x - best_b) / safe_s), 0, nmax).reshape(rows, cols).astype(np.uint32)
    return q, best_s[..., 0], best_b[..., 0]


class _Recorder(nn.Module):
    """Wraps a Linear to add up Σ x_j² over every token it sees (for the importance of input column j)."""

    def __init__(self, inner, path: str, sums: dict, counts: dict):
        super().__init__()
        self.inner, self._path, self._sums, self._counts = inner, path, sums, counts

    def _record(self, x):
        flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        total = mx.sum(flat * flat, axis=0)
        self._sums[self._path] = total if self._path not in self._sums else self._sums[self._path] + total
        self._counts[self._path] = self._counts.get(self._path, 0) + flat.shape[0]

    def __call__(self, x):
        self._record(x)
        return self.inner(x)


class _EmbeddingRecorder(_Recorder):
    """A tied embedding: lookups pass through; its use as the output head is recorded."""

    def __call__(self, ids):
        return self.inner(ids)

    def as_linear(self, x):
        self._record(x)
        return self.inner.as_linear(x)


def collect_importance(model: nn.Module, chunks) -> dict:
    """module path -> mean x_j² of each Linear's input (and a tied head's) over the calibration chunks."""
    from mlx.utils import tree_unflatten

    linears = [(p, m) for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    sums, counts = {}, {}
    recorders = [(p, (_EmbeddingRecorder if isinstance(m, nn.Embedding) else _Recorder)(m, p, sums, counts))
                 for p, m in linears]
    model.update_modules(tree_unflatten(recorders))
    try:
        for chunk in chunks:
            model(mx.array(chunk)[None])
            mx.eval(list(sums.values()))
    finally:
        model.update_modules(tree_unflatten(linears))
    return {p: np.array(sums[p]) / counts[p] for p in sums}


class DataAwareQuantizer:
    """The loader's quantizer hook: importance-weighted search where importance is known, the same search
    with uniform weights (plain MSE-optimal grids) elsewhere."""

    def __init__(self, importance: dict):
        self.importance = importance

    def __call__(self, path: str, array, spec: QuantSpec):
        return weighted_quantize(array, self.importance.get(path), spec)
