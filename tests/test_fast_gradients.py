"""The calibration passes' backward on the device's float kernels (quant/fast_gradients.py): the same Fisher
diagonal as MLX's own autodiff through its built-in matmul, tied head included, and the model given back."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxedge.kernels import KernelChoice
from mlxedge.loading import load_checkpoint, quantizable_modules
from mlxedge.quant.fast_gradients import GradEmbedding, GradLinear, fast_gradients
from mlxedge.quant.sensitivity import fisher_diagonal
from mlxedge.sources import open_source
from tiny_models import build_tiny

CHUNKS = [[int(x) for x in np.random.default_rng(i).integers(3, 250, 40)] for i in range(2)]


@pytest.mark.parametrize("mode", ["native", "builtin"])
@pytest.mark.parametrize("tied", [True, False])
def test_fisher_with_device_kernels_equals_mlx_autodiff(tmp_path, mode, tied):
    if mode == "native":
        from mlxedge import cpu

        if not cpu.available():
            pytest.skip(f"native kernels unavailable: {cpu.describe()}")
    path = build_tiny("llama", tmp_path / "tiny", tie_word_embeddings=tied)
    model = load_checkpoint(open_source(path), None, dtype="float32").model
    paths = list(quantizable_modules(model))
    assert ("lm_head" in paths) != tied
    want = fisher_diagonal(model, CHUNKS, paths)
    got = fisher_diagonal(model, CHUNKS, paths, choice=KernelChoice(mode))
    assert set(got) == set(want) == set(paths)
    for p in paths:
        w, g = np.array(want[p]), np.array(got[p])
        assert np.abs(w).max() > 0, p
        np.testing.assert_allclose(g, w, rtol=2e-3, atol=1e-6 * np.abs(w).max(), err_msg=p)
    # the model is given back unchanged: its own classes, the same arrays
    assert not any(isinstance(m, (GradLinear, GradEmbedding)) for _, m in model.named_modules())


def test_fast_gradients_swaps_every_float_matmul_and_restores_it(tmp_path):
    path = build_tiny("llama", tmp_path / "tiny", tie_word_embeddings=True)
    model = load_checkpoint(open_source(path), None, dtype="float32").model
    before = {p: m for p, m in model.named_modules()}
    with fast_gradients(model, KernelChoice("builtin")):
        inside = dict(model.named_modules())
        linears = [p for p, m in before.items() if type(m) is nn.Linear]
        assert linears and all(type(inside[p]) is GradLinear for p in linears)
        assert type(inside["model.embed_tokens"]) is GradEmbedding  # the tied head
        assert inside["model.embed_tokens"]["weight"] is before["model.embed_tokens"]["weight"]
        ids = mx.array(CHUNKS[0])[None]
        np.testing.assert_allclose(np.array(model(ids)), np.array(_plain(path)(ids)), rtol=1e-5, atol=1e-5)
    after = dict(model.named_modules())
    assert all(after[p] is m for p, m in before.items())


def _plain(path):
    return load_checkpoint(open_source(path), None, dtype="float32").model
