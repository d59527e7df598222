"""A decode step of a small model through the emulated custom kernels gives the built-in path's logits.

The model comes from `mlxedge.load` (a tiny random Llama saved by transformers, quantized while loading).
Given a `custom` KernelChoice whose Metal runner is the emulator, the Model binds every quantized layer's
decode rows (1..8) to the emulated Metal kernels and fuses both MLPs' gate and up projections into the
fused kernel; so the prefill (6 rows) and the decode step (1 row) run there. Both the prefill logits and
the decode step's are compared with the built-in path's (the same Model given a `builtin` choice).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

import mlxedge
from emulator.runner import EmulatorRunner
from mlxedge.kernels import KernelChoice
from mlxedge.metal import kernels
from mlxedge.quant.fused_mlp import FusedGatedMLP
from tiny_models import build_tiny

PROMPT, NEXT = [1, 17, 42, 99, 7, 230], 64

CONFIGS = [
    # bits, group, dtype, model overrides, tolerance on |custom - builtin| relative to max |logit|.
    # float16: MLX's own float16 path is the noisier one (measured 1.3% off the float32 logits of the same
    # quantized weights, the kernels' float32 accumulation 0.2%), so the gap between them is fp16 noise.
    pytest.param(4, 64, "float32", {}, 1e-3, id="4bit-g64-float32-ragged"),
    pytest.param(8, 32, "float16", {"hidden_size": 256, "intermediate_size": 512}, 2e-2,
                 id="8bit-g32-float16-aligned"),
]


def prefill_and_step(model):
    """Logits of the prompt (one pass with a KV cache) and of one decode step after it."""
    cache = make_prompt_cache(model.module)
    prefill = model.module(mx.array([PROMPT]), cache=cache)
    step = model.module(mx.array([[NEXT]]), cache=cache)
    return np.array(prefill[0].astype(mx.float32)), np.array(step[0, -1].astype(mx.float32))


@pytest.mark.slow
@pytest.mark.parametrize("bits, group_size, dtype, overrides, tolerance", CONFIGS)
def test_decode_step_through_custom_and_fused_kernels_matches_builtin(tmp_path, monkeypatch, bits, group_size,
                                                                      dtype, overrides, tolerance):
    directory = build_tiny("llama", tmp_path / "llama", **overrides)
    monkeypatch.setenv("MLXEDGE_KERNELS", "builtin")
    model = mlxedge.load(directory, bits=bits, group_size=group_size, dtype=dtype)
    assert model.info["kernels"]["layers"] == {"quantized": {"builtin": 15}}  # 2 x 7 projections + lm_head
    assert model.info["fused_mlps"] == 0  # the built-in path keeps mlx-lm's own MLP modules
    builtin_prefill, builtin_step = prefill_and_step(model)

    runner = EmulatorRunner()
    model.use_kernels(KernelChoice("custom", metal_runner=runner, cpu=None))
    assert model.info["fused_mlps"] == 2 and model.info["kernels"]["backend"] == "custom metal (emulator)"
    assert all(isinstance(layer.mlp, FusedGatedMLP) for layer in model.module.model.layers)
    custom_prefill, custom_step = prefill_and_step(model)

    launched = {(name, dict(template)["M"]) for name, template in runner.calls}
    assert launched == {(kernels.QMV.name, len(PROMPT)), (kernels.QMV.name, 1),
                        (kernels.GATE_UP.name, len(PROMPT)), (kernels.GATE_UP.name, 1)}
    # per layer q, k, v, o, down through QMV and gate·up fused, plus the quantized lm_head; twice (prefill, step)
    assert len(runner.calls) == 2 * (2 * 6 + 1)
    # the float32 logits of the very same quantized weights: neither path may be closer to them than the kernels
    model.use_kernels(KernelChoice("builtin"))
    model.module.set_dtype(mx.float32)
    exact_prefill, exact_step = prefill_and_step(model)

    for custom, builtin, exact in ((custom_prefill, builtin_prefill, exact_prefill),
                                   (custom_step, builtin_step, exact_step)):
        assert np.isfinite(custom).all()
        scale = np.abs(builtin).max()
        assert np.abs(custom - builtin).max() <= tolerance * scale
        assert (custom.argmax(-1) == builtin.argmax(-1)).all()
        assert np.abs(custom - exact).max() <= max(np.abs(builtin - exact).max(), 1e-5 * scale)
