"""Every supported architecture agrees with transformers fp32 (the independent reference)."""

import numpy as np
import pytest

import mlxedge
from tiny_models import ARCHITECTURES, build_tiny, reference_logits

IDS = [1, 17, 93, 200, 5, 42, 42, 7, 130, 255, 64, 3, 88, 19, 120, 250, 11, 9, 77, 31, 60, 2, 140, 99]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_fp32_logits_match_transformers(arch, tmp_path):
    path = build_tiny(arch, tmp_path / arch)
    model = mlxedge.load(path, dtype="float32")
    ours = model.logits(IDS)
    theirs = reference_logits(path, IDS).numpy()
    assert model.info["architecture"] == arch
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-3
    assert np.abs(theirs).max() > 0.1  # the comparison is not between two near-zero tensors
