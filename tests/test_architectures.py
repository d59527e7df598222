"""Every supported architecture agrees with transformers fp32 (the independent reference)."""

import json

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


@pytest.mark.parametrize("config_form", ["layer_types", "sliding_window_pattern"])
def test_gemma3_with_only_sliding_window_layers_matches_transformers(config_form, tmp_path):
    """Two layers and gemma3's default pattern of 6: no layer is global (mlx-lm's gemma3_text assumes one is).

    Written by transformers 5 the config says so in `layer_types`; an older or mlx-lm config says it with
    `sliding_window_pattern` alone. The window (8) is shorter than IDS, so the sliding mask is exercised.
    """
    path = build_tiny("gemma3_text", tmp_path / "gemma3", layer_types=None)  # transformers' default layout
    config = json.loads((path / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention", "sliding_attention"] and config["num_hidden_layers"] == 2
    if config_form == "sliding_window_pattern":
        del config["layer_types"]
        config["sliding_window_pattern"] = 6
        (path / "config.json").write_text(json.dumps(config))
    theirs = reference_logits(path, IDS).numpy()
    model = mlxedge.load(path, dtype="float32")
    assert [c.__class__.__name__ for c in model.new_cache().caches] == ["RotatingKVCache"] * 2
    assert np.abs(model.logits(IDS) - theirs).max() <= 1e-3
    # generation goes through the KV caches (prefill, then one token at a time) and agrees as well
    reply = model.generate(ids=IDS[:12], max_tokens=4, ignore_eos=True)
    expected = reference_logits(path, IDS[:12] + reply.tokens[:-1]).numpy()[11:].argmax(-1)
    assert reply.tokens == list(expected)
