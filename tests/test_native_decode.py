"""SmolLM2-135M (the real Q4_1 GGUF, computing in float32): 64 greedy tokens through the native CPU kernels
equal MLX's built-in path's, and the native path is what actually ran (every quantized layer bound to it,
gate·up fused, q·k·v in one call).

Skips only where the native extension is not available; with MLXEDGE_REQUIRE_NATIVE=1 (set by `make test`,
which builds the extension) its absence is a failure, not a skip.
"""

from __future__ import annotations

import os

import pytest

import mlxedge
from mlxedge.generate.loop import generate_stream
from mlxedge.generate.sampler import SamplingParams
from mlxedge.kernels import KernelChoice

TOKENS = 64
PROMPT = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]


def native_or_skip():
    try:
        from mlxedge import cpu
    except ImportError as e:
        cpu, reason = None, f"mlxedge.cpu does not import ({e})"
    else:
        reason = cpu.describe()
    if cpu is not None and cpu.available():
        return cpu
    if os.environ.get("MLXEDGE_REQUIRE_NATIVE") == "1":
        pytest.fail(f"MLXEDGE_REQUIRE_NATIVE=1 but the native CPU kernels are not available: {reason}")
    pytest.skip(f"native CPU kernels not available: {reason}")


def greedy(model, ids) -> list:
    events = generate_stream(model.module, model.tokenizer.hf, ids, eos_ids=[], sampling=SamplingParams(),
                             max_tokens=TOKENS)
    return [e.token for e in events if e.token is not None]


@pytest.mark.slow
def test_smollm2_greedy_decode_native_equals_builtin(smollm2_gguf, monkeypatch):
    native_or_skip()
    monkeypatch.setenv("MLXEDGE_KERNELS", "builtin")
    model = mlxedge.load(smollm2_gguf, dtype="float32")
    ids = model.tokenizer.prompt_ids(PROMPT)
    builtin = greedy(model, ids)
    assert len(builtin) == TOKENS

    info = model.use_kernels(KernelChoice("native"))
    layers = info["layers"]
    assert set(layers["quantized"]) == {"native"}, layers  # every quantized layer, every row count
    assert layers["gate_up_fused"] == {"native": model.config["num_hidden_layers"]}
    assert layers["qkv_fused"] == {"native": model.config["num_hidden_layers"]}  # q, k, v in one call
    assert greedy(model, ids) == builtin
    # the norms, rope and attention were native too (fast_layers), and greedy stayed identical
    assert layers["rms_norm"] == {"native": 2 * model.config["num_hidden_layers"] + 1}
    assert layers["attention"] == {"native": model.config["num_hidden_layers"]}
    assert layers["rope"] == {"native": model.config["num_hidden_layers"]}


@pytest.mark.slow
def test_smollm2_seeded_sampling_native_filter_equals_mlx_ops(smollm2_gguf):
    """The chat defaults (temperature, top-k, top-p, repetition penalty) drawn with one seed: the native
    sampling filter and the MLX ops give the same 48 tokens (the draw itself is MLX's in both)."""
    native_or_skip()
    model = mlxedge.load(smollm2_gguf, dtype="float32")
    assert model.info["kernels"]["layers"].get("sampling") == {"native": 1}
    ids = model.tokenizer.prompt_ids(PROMPT)
    sampling = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=7)

    def draw(logits_filter):
        events = generate_stream(model.module, model.tokenizer.hf, ids, eos_ids=[], sampling=sampling,
                                 max_tokens=48, logits_filter=logits_filter)
        return [e.token for e in events if e.token is not None]

    native = draw(model._logits_filter)
    assert len(native) == 48
    assert native == draw(None)
