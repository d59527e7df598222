"""The memory plan in action: refusals before reading weights, auto-fit, and the planned context."""

import pytest

import mlxedge
from mlxedge.errors import GenerationError, MemoryBudgetError
from mlxedge.memory.budget import current_rss_bytes


def test_plan_reads_headers_only_and_matches_the_loaded_bytes(smollm2_gguf):
    before = current_rss_bytes()
    # 4-bit at the GGUF's own group (32): the 8-bit embedding stays 8-bit in the plan and in the load alike
    plan = mlxedge.plan(smollm2_gguf, bits=4, group_size=32, context_length=1024)
    assert current_rss_bytes() - before < 60e6  # 98 MB of weights were not read
    assert set(plan) >= {"weight_bytes", "kv_cache_bytes", "activation_bytes", "overhead_bytes", "total_bytes",
                         "budget_bytes", "fits"}
    model = mlxedge.load(smollm2_gguf, bits=4, group_size=32, context_length=1024)
    assert plan["weight_bytes"] == model.info["bytes"]
    # layers x (k, v) x kv heads x head dim x ctx x bytes of the compute dtype (float32 without Metal, the
    # checkpoint's own on a Mac)
    dtype_bytes = {"float32": 4, "float16": 2, "bfloat16": 2}[model.info["dtype"]]
    assert plan["kv_cache_bytes"] == 30 * 2 * 3 * 64 * 1024 * dtype_bytes


def test_refused_load_reads_no_weights_and_names_what_fits(smollm2_hf):
    eight_bit = mlxedge.plan(smollm2_hf, bits=8, context_length=2048)
    budget = eight_bit["total_bytes"] + 1_000_000
    assert mlxedge.plan(smollm2_hf, context_length=2048)["total_bytes"] > budget  # fp32 weights: 538 MB
    before = current_rss_bytes()
    with pytest.raises(MemoryBudgetError) as e:
        mlxedge.load(smollm2_hf, memory_budget=budget, context_length=2048)
    grown = current_rss_bytes() - before
    print(f"RSS growth of a refused load: {grown / 1e6:.1f} MB")
    assert grown < 60e6
    message = str(e.value)
    assert "\n" not in message and "memory budget" in message and "bits=8" in message and "bits=4" in message


def test_auto_fit_picks_the_best_setting_that_fits_and_says_so(smollm2_hf):
    budget = mlxedge.plan(smollm2_hf, bits=8, context_length=2048)["total_bytes"] + 1_000_000
    model = mlxedge.load(smollm2_hf, memory_budget=budget, context_length=2048, auto_fit=True)
    assert model.info["bits"] == 8 and model.context_length == 2048
    plan = model.info["memory_plan"]
    assert plan["fits"] and plan["total_bytes"] <= budget and "bits=8" in plan["note"]


def test_gguf_refusal_suggests_shorter_contexts_at_its_stored_precision(smollm2_gguf):
    budget = mlxedge.plan(smollm2_gguf, context_length=1024)["total_bytes"] + 1_000_000
    with pytest.raises(MemoryBudgetError, match="context_length=1024"):
        mlxedge.load(smollm2_gguf, memory_budget=budget, context_length=2048)
    model = mlxedge.load(smollm2_gguf, memory_budget=budget, context_length=2048, auto_fit=True)
    assert model.context_length == 1024 and model.info["bits"] == 4  # Q4_1 blocks (the Q8_0 embedding: below)
    assert [(s["bits"], s["modules"]) for s in model.info["quantization"]] == [(4, 210), (8, 1)]


@pytest.fixture(scope="module")
def short_context_models(smollm2_gguf):
    return (mlxedge.load(smollm2_gguf, context_length=48),
            mlxedge.load(smollm2_gguf, context_length=48, kv_overflow="rotate"))


def test_generation_past_the_planned_context_is_refused(short_context_models):
    strict, _ = short_context_models
    with pytest.raises(GenerationError) as e:
        strict.generate("Tell me about the sea.", max_tokens=64)
    assert "context" in str(e.value)
    assert strict.generate("Hi", max_tokens=4, raw=True).stats["generation_tokens"] <= 4  # within the plan: fine


def test_rotating_window_generates_past_the_context(short_context_models):
    """The window really rotates on a llama-family model (mlx-lm's own make_cache used to win and keep every
    token): the cache stays at 48 tokens per layer, and the tokens are those of mlx-lm's generate_step with a
    48-token RotatingKVCache (no sink tokens) on every layer."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import RotatingKVCache

    _, rotating = short_context_models
    prompt = "Count: one, two, three, four, five,"
    result = rotating.generate(prompt, max_tokens=60, raw=True)
    assert result.finish_reason == "length" and result.stats["generation_tokens"] == 60  # well past 48
    layers = rotating.module.layers
    kv = layers[0].self_attn.n_kv_heads * layers[0].self_attn.head_dim
    assert result.stats["kv_cache_bytes"] == len(layers) * 2 * kv * 48 * 4  # 48 fp32 tokens per layer, no more
    cache = [RotatingKVCache(max_size=48, keep=0) for _ in layers]
    ids = mx.array(rotating.tokenizer.encode(prompt))
    reference = [int(t) for (t, _), _ in zip(generate_step(ids, rotating.module, prompt_cache=cache), range(60))]
    assert result.tokens == reference
    assert all(c.keys.shape[2] == 48 for c in cache)
