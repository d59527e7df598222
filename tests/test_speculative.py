"""Speculative decoding: greedy output is plain greedy's token for token; sampled output follows the model's own
distribution (chi-square against exact probabilities, with a draft whose distribution differs)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch

import mlxedge
from mlxedge.errors import GenerationError
from mlxedge.generate.sampler import SamplingParams
from mlxedge.generate.speculative import PromptLookupDrafter, _accept
from tiny_chat import tiny_chat_model
from tiny_models import add_tiny_tokenizer, build_tiny

REPEATING = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef add(a, b):\n"


def chi_square_p(observed: dict, expected: dict, n: int) -> float:
    """p-value of Pearson's chi-square test; bins expected below 5 counts are pooled into one."""
    stat, bins, pool_e, pool_o = 0.0, 0, 0.0, 0
    for token, prob in expected.items():
        e, o = prob * n, observed.get(token, 0)
        if e < 5:
            pool_e, pool_o = pool_e + e, pool_o + o
            continue
        stat += (o - e) ** 2 / e
        bins += 1
    pool_o += sum(v for k, v in observed.items() if k not in expected)
    if pool_e > 0 or pool_o:
        stat += (pool_o - pool_e) ** 2 / max(pool_e, 1e-9)
        bins += 1
    df = bins - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.fixture(scope="module")
def chat(smollm2_hf):
    return mlxedge.load(tiny_chat_model(smollm2_hf))


@pytest.fixture(scope="module")
def chat_draft(smollm2_hf):
    return mlxedge.load(tiny_chat_model(smollm2_hf), bits=4, group_size=32)


@pytest.mark.parametrize("draft", ["prompt-lookup", "model", "auto"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_speculation_is_plain_greedy(chat, chat_draft, draft, penalty):
    plain = chat.generate(REPEATING, raw=True, max_tokens=48, repetition_penalty=penalty)
    result = chat.generate(REPEATING, raw=True, max_tokens=48, repetition_penalty=penalty,
                           draft=chat_draft if draft == "model" else draft, num_draft_tokens=4)
    assert result.tokens == plain.tokens and result.text == plain.text
    if draft != "auto":
        assert result.stats["draft_proposed"] > 0
        assert 0 <= result.stats["draft_accepted"] <= result.stats["draft_proposed"]


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    drafter = PromptLookupDrafter()
    context = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert drafter.propose(context, 3, None, None) == ([7, 8, 5], None)  # 3-gram [1,2,3]: latest earlier match
    assert drafter.propose([4, 5, 6], 3, None, None) == ([], None)


@pytest.mark.parametrize("deterministic", [False, True])
def test_accept_reject_keeps_the_target_distribution_exactly(deterministic):
    """The first token out of one step, with a draft law q far from p (or a fixed draft token, as prompt
    lookup proposes): its law must be p_0."""
    rng0 = np.random.default_rng(1)
    p = rng0.dirichlet(np.ones(6), size=3)
    q = rng0.dirichlet(np.ones(6) * 0.3, size=2)
    if deterministic:
        q = np.eye(6)[[int(np.argmax(p[0])), 2]]  # one-hot: the drafter always proposes these two tokens
    rng = np.random.default_rng(7)
    rows = [mx.array(np.log(row)[None].astype(np.float32)) for row in p]
    sampling = SamplingParams(temperature=1.0)
    counts, n = {}, 20000
    for _ in range(n):
        drafts = [int(rng.choice(6, p=q[0])), int(rng.choice(6, p=q[1]))]
        m, token = _accept(rows, drafts, None if deterministic else q, sampling, rng, 6)
        first = drafts[0] if m > 0 else token
        counts[first] = counts.get(first, 0) + 1
    target = {i: float(v) for i, v in enumerate(p[0])}
    assert chi_square_p(counts, target, n) > 1e-3
    assert chi_square_p(counts, {i: float(v) for i, v in enumerate(q[0])}, n) < 1e-9  # the test can fail


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A target over a 256-token vocabulary, and a draft sharing its tokenizer whose weights are the target's
    plus noise: its distribution overlaps the target's but is clearly another."""
    import shutil

    from safetensors.numpy import load_file, save_file

    target = add_tiny_tokenizer(build_tiny("llama", tmp_path_factory.mktemp("target"), seed=0))
    draft = tmp_path_factory.mktemp("draft")
    for file in target.iterdir():
        shutil.copy(file, draft / file.name)
    weights = load_file(target / "model.safetensors")
    rng = np.random.default_rng(0)
    noisy = {k: (v + rng.normal(0, 0.03, v.shape).astype(v.dtype)) if v.ndim == 2 else v for k, v in weights.items()}
    save_file(noisy, draft / "model.safetensors", metadata={"format": "pt"})
    return mlxedge.load(target), mlxedge.load(draft)


def _processed_probs(model, ids, top_k):
    logits = mx.array(model.logits(ids)[-1:])
    from mlxedge.generate.sampler import make_sampler

    x = make_sampler(SamplingParams(temperature=1.0, top_k=top_k)).process(logits)
    return np.array(mx.softmax(x, axis=-1)[0], dtype=np.float64)


@pytest.mark.parametrize("draft_kind", ["model", "prompt-lookup"])
def test_sampled_tokens_follow_the_model_distribution(small_vocab, draft_kind):
    target, draft = small_vocab
    prompt = "a tiny corpus a tiny corpus a tiny"
    ids = target.tokenizer.encode(prompt)
    top_k, n = 6, 600
    p1 = _processed_probs(target, ids, top_k)
    first = {t: float(v) for t, v in enumerate(p1) if v > 0}
    second: dict = {}
    for t1, w in first.items():
        for t2, v in enumerate(_processed_probs(target, ids + [t1], top_k)):
            if v > 0:
                second[t2] = second.get(t2, 0.0) + w * float(v)
    obs1, obs2, proposed, accepted = {}, {}, 0, 0
    for seed in range(n):
        r = target.generate(prompt, raw=True, max_tokens=3, temperature=1.0, top_k=top_k, seed=seed,
                            draft=draft if draft_kind == "model" else draft_kind, num_draft_tokens=2)
        obs1[r.tokens[0]] = obs1.get(r.tokens[0], 0) + 1
        obs2[r.tokens[1]] = obs2.get(r.tokens[1], 0) + 1
        proposed += r.stats["draft_proposed"]
        accepted += r.stats["draft_accepted"]
    assert proposed > 0 and accepted < proposed
    if draft_kind == "model":
        assert accepted > 0.1 * proposed  # the draft is often right and often wrong
    assert chi_square_p(obs1, first, n) > 1e-3
    assert chi_square_p(obs2, second, n) > 1e-3
    if draft_kind == "model":  # the draft's own law is far from the target's: the test would notice
        q1 = _processed_probs(draft, ids, top_k)
        assert chi_square_p(obs1, {t: float(v) for t, v in enumerate(q1) if v > 0}, n) < 1e-6


def test_bad_drafts_are_refused(chat, small_vocab):
    target, _ = small_vocab
    with pytest.raises(GenerationError, match="tokenizer differs"):
        chat.generate("hi", draft=target)
    with pytest.raises(GenerationError, match="draft must be"):
        chat.generate("hi", draft="ngram")
    with pytest.raises(GenerationError, match="num_draft_tokens"):
        chat.generate("hi", draft="prompt-lookup", num_draft_tokens=0)
    with pytest.raises(GenerationError, match="the model itself"):
        chat.generate("hi", draft=chat)
    rotating = mlxedge.load(small_vocab[0].info["source"], context_length=8, kv_overflow="rotate")
    with pytest.raises(GenerationError, match="roll back"):
        rotating.generate("a tiny corpus a tiny corpus a tiny corpus", raw=True, max_tokens=4,
                          draft="prompt-lookup")


@pytest.mark.slow
def test_smollm2_greedy_128_tokens_identical_with_each_draft(smollm2_gguf):
    model = mlxedge.load(smollm2_gguf)
    draft = mlxedge.load(smollm2_gguf, bits=4)
    prompt = "Write a Python function that checks whether a number is prime, then explain it."
    plain = model.generate(prompt, max_tokens=128)
    assert plain.stats["generation_tokens"] >= 64
    for d in (draft, "prompt-lookup"):
        result = model.generate(prompt, max_tokens=128, draft=d, num_draft_tokens=3)
        assert result.tokens == plain.tokens
        assert result.stats["draft_accepted"] > 0
