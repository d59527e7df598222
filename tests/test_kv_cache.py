"""KV caches built by mlxedge: rotating windows that really rotate (checked against transformers' sliding-window
attention), sliding layers kept, quantized caches, and clear refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

import mlxedge
from mlxedge.errors import UnsupportedError
from mlxedge.generate.kv_cache import describe, make_cache
from mlxedge.generate.loop import generate_stream, new_prompt_cache
from mlxedge.generate.sampler import SamplingParams
from tiny_chat import tiny_chat, tiny_chat_model  # noqa: F401 (tiny_chat: a fixture)
from tiny_models import build_tiny

WINDOW = 16


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    return build_tiny("gemma3_text", tmp_path_factory.mktemp("gemma3"), head_dim=32)


@pytest.fixture(scope="module")
def tiny_gemma2(tmp_path_factory):
    return build_tiny("gemma2", tmp_path_factory.mktemp("gemma2"))


def _sliding_window_greedy(directory, prompt, window, n):
    """Greedy tokens from transformers with sliding-window attention of `window` tokens on every layer: the
    llama weights loaded as mistral (same layout), whole-sequence forwards, no cache."""
    config = T.LlamaConfig.from_pretrained(directory).to_dict()
    for key in ("architectures", "model_type", "transformers_version"):
        config.pop(key, None)
    mistral = T.MistralConfig(**config)
    mistral.sliding_window = window
    model = T.MistralForCausalLM.from_pretrained(directory, config=mistral, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("chunk", [512, 5])
def test_rotating_window_matches_sliding_window_attention(tiny_chat, chunk):
    model = mlxedge.load(tiny_chat, context_length=WINDOW, kv_overflow="rotate")
    prompt = model.tokenizer.encode("the quick brown fox jumps over the lazy dog and then runs far away again, "
                                     "and the dog sleeps on")
    assert len(prompt) > WINDOW  # the prompt alone overflows the window
    n = 24
    cache = new_prompt_cache(model.module, max_kv_size=WINDOW)
    events = list(generate_stream(model.module, model.tokenizer.hf, prompt, eos_ids=[], sampling=SamplingParams(),
                                  cache=cache, max_tokens=n, prefill_chunk=chunk))
    tokens = [e.token for e in events if e.token is not None]
    assert tokens == _sliding_window_greedy(tiny_chat, prompt, WINDOW, n)
    for layer in describe(cache.caches):
        assert layer["kind"] == "RotatingKVCache" and layer["window"] == WINDOW
        assert layer["held"] == WINDOW and layer["offset"] == len(prompt) + n - 1  # rotated, never grew
    # the public path builds the same kind of cache and stays at the window's bytes
    result = model.generate(" ".join(["word"] * 40), raw=True, max_tokens=8)
    per_layer = 2 * 2 * 16 * WINDOW * 4  # k and v x kv heads x head dim x window x fp32
    assert result.stats["kv_cache_bytes"] == len(model.module.layers) * per_layer


def test_full_cache_without_rotation_and_window_only_on_request(tiny_chat):
    model = mlxedge.load(tiny_chat)
    assert all(type(c) is KVCache for c in model.new_cache().caches)  # llama's make_cache: full layers
    assert all(type(c) is RotatingKVCache and c.max_size == 32 and c.keep == 0
               for c in model.new_cache(max_kv_size=32).caches)


def test_sliding_layers_keep_their_window(tiny_gemma3):
    module = mlxedge.load(tiny_gemma3).module  # layer 0 slides over 8 tokens, layer 1 is global
    kinds = [(type(c).__name__, getattr(c, "max_size", None)) for c in make_cache(module)]
    assert kinds == [("RotatingKVCache", 8), ("KVCache", None)]
    kinds = [(type(c).__name__, c.max_size) for c in make_cache(module, max_kv_size=64)]
    assert kinds == [("RotatingKVCache", 8), ("RotatingKVCache", 64)]
    assert [c.max_size for c in make_cache(module, max_kv_size=4)] == [4, 4]  # a smaller window binds both
    kinds = [type(c).__name__ for c in make_cache(module, kv_bits=8)]
    assert kinds == ["RotatingKVCache", "QuantizedKVCache"]  # sliding layers stay float (no rotating quantized)


def test_quantized_cache_logits_follow_the_float_cache(smollm2_hf, tmp_path):
    directory = tiny_chat_model(smollm2_hf, name="hd64", head_dim=64, num_attention_heads=2,
                                num_key_value_heads=1, hidden_size=128)
    model = mlxedge.load(directory)
    prompt = model.tokenizer.encode("a few words to fill the cache with something")
    caches = {bits: model.new_cache(kv_bits=bits) for bits in (None, 8, 4)}
    assert all(type(c) is QuantizedKVCache and c.bits == 8 and c.group_size == 64 for c in caches[8].caches)
    import mlx.core as mx

    logits = {}
    for bits, cache in caches.items():
        out = model.module(mx.array([prompt]), cache=cache.caches)
        out = model.module(mx.array([[prompt[-1]]]), cache=cache.caches)  # reads the cache back
        logits[bits] = np.array(out[0, -1].astype(mx.float32))
    err8 = np.abs(logits[8] - logits[None]).max()
    err4 = np.abs(logits[4] - logits[None]).max()
    assert 0 < err8 < err4 < 0.5 * np.abs(logits[None]).max()  # quantized, and 8 bits closer than 4
    r = model.generate("hello", max_tokens=4, kv_bits=8)
    assert r.stats["kv_cache_bytes"] < model.generate("hello", max_tokens=4).stats["kv_cache_bytes"]


def test_refusals_are_one_line(tiny_chat, tiny_gemma2):
    module = mlxedge.load(tiny_chat).module
    with pytest.raises(UnsupportedError, match="cannot also be a rotating window"):
        make_cache(module, max_kv_size=16, kv_bits=8)
    with pytest.raises(UnsupportedError, match="kv_bits must be 4 or 8"):
        make_cache(module, kv_bits=3)
    with pytest.raises(UnsupportedError, match="not supported for gemma2"):
        make_cache(mlxedge.load(tiny_gemma2).module, kv_bits=8)
    with pytest.raises(UnsupportedError, match="divisible by 32"):
        make_cache(module, kv_bits=8)  # head_dim 16


@pytest.mark.parametrize("kv_bits", [None, 8, 4])
def test_plan_counts_the_quantized_cache_exactly(smollm2_hf, kv_bits):
    import mlx.core as mx

    directory = tiny_chat_model(smollm2_hf, name="hd64", head_dim=64, num_attention_heads=2,
                                num_key_value_heads=1, hidden_size=128)
    planned = mlxedge.plan(directory, context_length=256, kv_bits=kv_bits)["kv_cache_bytes"]
    model = mlxedge.load(directory, context_length=256, kv_bits=kv_bits)
    cache = model.new_cache()  # the load's kv_bits is the default
    model.module(mx.array([list(range(10, 266))]), cache=cache.caches)
    mx.eval([c.state for c in cache.caches])
    assert planned == cache.nbytes
    if kv_bits:
        assert all(type(c) is QuantizedKVCache and c.bits == kv_bits for c in cache.caches)
