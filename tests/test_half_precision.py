"""Half precision (the default compute dtype on a Mac) against transformers, at half-precision tolerances.

The yardstick is the reference's own rounding noise: transformers run in float16 (or bfloat16) differs from
transformers in float32 by some max |Δlogit| (its "spread"). mlxedge in the same half dtype is compared with
transformers float32 and must stay within HALF_SPREAD_MULTIPLE times that spread, and its top-1 token may
differ from float32's only at near-ties, and at no more of them than the reference's own half run flips plus
half the positions whose float32 top-2 margin is below the spread (which of those flips is chance: on 32
tokens of SmolLM2 prose ten margins are under 0.3 against a bfloat16 spread of 0.76, and one run's kernel
choice flipped positions 7 and 29, margins 0.16 and 0.009, where the reference flipped none; one position
of slack was too little).

Why 3x: both half computations round every matmul, norm and softmax to the same 11 (float16) or 8
(bfloat16) significant bits, so their distances from float32 are of one size; MLX and torch accumulate in
different orders and round at different points (e.g. softmax), so ours measured 0.8-1.2x the spread on the
tiny models and 0.8-1.6x on SmolLM2 (see the issue note). A real mistake (a misread rope_theta, a missing
norm, a transposed weight) moves logits by a sizeable fraction of their scale: the spreads here are 0.1%
(float16) to 2% (bfloat16) of the largest logit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mlxedge
from tiny_models import ARCHITECTURES, build_tiny

HALF_SPREAD_MULTIPLE = 3.0
HALF_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
IDS = [1, 17, 93, 200, 5, 42, 42, 7, 130, 255, 64, 3, 88, 19, 120, 250, 11, 9, 77, 31, 60, 2, 140, 99]
SMOLLM2_TOKENS = 32  # MLX's half precision on a CPU is slow; a short window of real prose is enough


def transformers_logits(directory, dtype, ids) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def top1_misses(logits: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return np.flatnonzero(logits.argmax(-1) != reference.argmax(-1))


def check_half(ours: np.ndarray, ref_half: np.ndarray, ref32: np.ndarray) -> dict:
    """Assert the half-precision bounds; return the measured figures (printed with -s)."""
    spread = float(np.abs(ref_half - ref32).max())
    error = float(np.abs(ours - ref32).max())
    ours_misses, ref_misses = top1_misses(ours, ref32), top1_misses(ref_half, ref32)
    top2 = np.sort(ref32, axis=-1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    figures = {"spread": spread, "error": error, "ratio": error / spread, "scale": float(np.abs(ref32).max()),
               "top1_ours": 1 - len(ours_misses) / len(ref32), "top1_reference": 1 - len(ref_misses) / len(ref32)}
    print(" ".join(f"{k}={v:.4g}" for k, v in figures.items()))
    assert 0 < spread < 0.05 * figures["scale"]  # the reference really ran in half precision, and sanely
    assert error <= HALF_SPREAD_MULTIPLE * spread
    near_ties = int((margin <= spread).sum())  # positions the reference's own rounding noise could flip
    assert len(ours_misses) <= len(ref_misses) + max(1, near_ties // 2)
    assert (margin[ours_misses] <= 2 * error).all()  # a flipped top-1 is a near-tie, never a clear winner
    return figures


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> dict:
    """arch -> (directory, transformers float32 logits): built once for both half dtypes."""
    out = {}
    for arch in sorted(ARCHITECTURES):
        directory = build_tiny(arch, tmp_path_factory.mktemp(arch))
        out[arch] = (directory, transformers_logits(directory, torch.float32, IDS))
    return out


@pytest.mark.parametrize("dtype", sorted(HALF_DTYPES))
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_half_logits_match_transformers_within_its_own_half_spread(arch, dtype, tiny_checkpoints):
    directory, ref32 = tiny_checkpoints[arch]
    model = mlxedge.load(directory, dtype=dtype)
    assert model.info["dtype"] == dtype
    check_half(model.logits(IDS), transformers_logits(directory, HALF_DTYPES[dtype], IDS), ref32)


@pytest.fixture(scope="module")
def smollm2_prose(smollm2_hf, prose):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smollm2_hf)(prose)["input_ids"][:SMOLLM2_TOKENS]
    return ids, transformers_logits(smollm2_hf, torch.float32, ids)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", sorted(HALF_DTYPES))
def test_smollm2_half_logits_match_transformers_within_its_own_half_spread(dtype, smollm2_hf, smollm2_prose):
    ids, ref32 = smollm2_prose
    model = mlxedge.load(smollm2_hf, dtype=dtype)
    assert model.info["dtype"] == dtype
    check_half(model.logits(ids), transformers_logits(smollm2_hf, HALF_DTYPES[dtype], ids), ref32)
