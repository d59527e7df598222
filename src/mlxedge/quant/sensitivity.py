"""Bits per module for a target size: measured sensitivity, then the cheapest mix that fits.

Sensitivity: the output's KL divergence from the float model grows, to second order, as
½ Σ_i F_ii (Δw_i)² where F is the Fisher information of the model's predictions and Δw the quantization
error. F's diagonal is estimated by squared gradients of the calibration text's log-likelihood (one
backward pass per chunk, at the float weights), so each (module, bits) impact is one weighted sum over the
module's actual quantization error at those bits — additive across modules, never negative.

Allocation: every module starts at the fewest bits offered; the upgrade with the largest impact reduction
per extra byte is taken until the next one would pass the target bits-per-weight (bytes counted as
stored: packed weights plus scales and biases in `scale_bytes`).
"""

from __future__ import annotations

import json
from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import QuantizationError
from .affine import QuantSpec, can_quantize

CANDIDATE_BITS = (3, 4, 5, 6, 8)


def quantized_bytes(rows: int, cols: int, spec: QuantSpec, scale_bytes: int) -> int:
    return rows * cols * spec.bits // 8 + 2 * rows * (cols // spec.group_size) * scale_bytes


def fisher_diagonal(model: nn.Module, chunks: Sequence[Sequence[int]], paths: Sequence[str],
                    progress: Optional[Callable[[int, int], None]] = None, choice=None) -> dict:
    """path -> mean squared gradient of the next-token log-likelihood w.r.t. that module's weight.

    choice: a KernelChoice whose float kernels run the matmuls, backward included (quant/fast_gradients.py);
    None: MLX's built-in matmul.
    """
    if choice is not None:
        from .fast_gradients import fast_gradients

        with fast_gradients(model, choice):
            return fisher_diagonal(model, chunks, paths, progress)
    wanted = {f"{p}.weight" for p in paths}

    def loss_fn(model, ids):
        logits = model(ids[None, :-1]).astype(mx.float32)
        return nn.losses.cross_entropy(logits[0], ids[1:], reduction="mean")

    model.train(False)
    grad_fn = nn.value_and_grad(model, loss_fn)
    sums: dict = {}
    for i, chunk in enumerate(chunks):
        _, grads = grad_fn(model, mx.array(chunk))
        flat = {k: v for k, v in tree_flatten(grads) if k in wanted}
        for k, g in flat.items():
            sq = g.astype(mx.float32) ** 2
            sums[k] = sq if k not in sums else sums[k] + sq
        mx.eval(list(sums.values()))
        if progress is not None:
            progress(i + 1, len(chunks))
    return {k[: -len(".weight")]: v / len(chunks) for k, v in sums.items()}


def impacts(weights: dict, fisher: dict, group_size: int, bits_options=CANDIDATE_BITS,
            quantize=None) -> dict:
    """path -> {bits: ½ Σ F·(w − deq(q(w)))²} for every module and bits option (quantize: the quantizer
    the recipe will use, default mx.quantize)."""
    out = {}
    for path, w in weights.items():
        w = w.astype(mx.float32)
        per_bits = {}
        for bits in bits_options:
            spec = QuantSpec(bits, group_size)
            q, s, b = quantize(path, w, spec) if quantize else mx.quantize(w, group_size=group_size, bits=bits)
            err = mx.dequantize(q, s, b, group_size=group_size, bits=bits) - w
            per_bits[bits] = float(0.5 * mx.sum(fisher[path] * err * err))
        out[path] = per_bits
    return out


def allocate(shapes: dict, impact: dict, target_bpw: float, group_size: int, scale_bytes: int = 2,
             bits_options=CANDIDATE_BITS) -> dict:
    """path -> QuantSpec minimising Σ impact within target_bpw·(weights) bits (greedy by gain per byte)."""
    options = sorted(bits_options)
    n_weights = sum(r * c for r, c in shapes.values())
    budget = target_bpw * n_weights / 8
    level = {p: 0 for p in shapes}
    size = {p: quantized_bytes(r, c, QuantSpec(options[0], group_size), scale_bytes) for p, (r, c) in shapes.items()}
    total = sum(size.values())
    if total > budget:
        low_bpw = 8 * total / n_weights
        raise QuantizationError(f"target_bpw={target_bpw} is below the smallest mix offered ({low_bpw:.2f} bits per "
                                f"weight at {options[0]} bits, group {group_size}); ask for more or a larger group.")
    while True:
        best, best_gain = None, 0.0
        for p, (r, c) in shapes.items():
            if level[p] + 1 >= len(options):
                continue
            nxt = options[level[p] + 1]
            extra = quantized_bytes(r, c, QuantSpec(nxt, group_size), scale_bytes) - size[p]
            if total + extra > budget:
                continue
            gain = (impact[p][options[level[p]]] - impact[p][nxt]) / max(extra, 1)
            if best is None or gain > best_gain:
                best, best_gain = p, gain
        if best is None:
            break
        r, c = shapes[best]
        level[best] += 1
        new = quantized_bytes(r, c, QuantSpec(options[level[best]], group_size), scale_bytes)
        total += new - size[best]
        size[best] = new
    return {p: QuantSpec(options[level[p]], group_size) for p in shapes}


def quantizable_weights(modules: dict, group_size: int) -> dict:
    """path -> weight of each of `modules` (loading.quantizable_modules) whose input size the group divides."""
    return {path: m.weight for path, m in modules.items() if can_quantize(m.weight.shape[1], QuantSpec(4, group_size))}


def save_sensitivities(path, impact: dict, chosen: dict, target_bpw: float, group_size: int) -> None:
    """Write each module's measured impact per bits option and the bits it got (JSON)."""
    data = {"target_bpw": target_bpw, "group_size": group_size,
            "modules": {p: {"impact": {str(b): v for b, v in impact[p].items()},
                            "bits": chosen[p].bits if p in chosen else None}
                        for p in sorted(impact)}}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def mean_bpw(shapes: dict, chosen: dict, scale_bytes: int = 2) -> float:
    n = sum(r * c for r, c in shapes.values())
    return 8 * sum(quantized_bytes(r, c, chosen[p], scale_bytes) for p, (r, c) in shapes.items()) / n

