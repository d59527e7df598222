"""Continuous batching: concurrent requests of one model decode in ONE forward per step, and each request's
tokens equal the same request run alone (greedy and seeded sampling, stop strings, repetition penalty,
different prompt lengths and max_tokens, a request joining mid-way, one cancelled); the prefix cache still
saves prefill; models that cannot batch fall back to round-robin and say why.

Equality is exact (float32 tiny models): a batched forward computes every row with the same arithmetic as
a single one, for MLX's built-in kernels and for the native CPU kernels (their GEMV takes up to 16 rows).
"""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest

import mlxedge
from engine_fixtures import wait_for
from mlxedge.engine import Engine, Request
from mlxedge.kernels import KernelChoice
from tiny_chat import tiny_chat, tiny_chat_model  # noqa: F401  (fixture)

PROMPTS = ["The quick brown fox", "Once upon a time there was a very small village by the sea",
           "In a hole", "Tell me a story about a dragon who could not fly, and why"]


def collect(handle):
    return [ev for ev in handle]


def tokens_of(events):
    return [e.token for e in events if e.kind == "delta" and e.token is not None]


def text_of(events):
    return "".join(e.text for e in events if e.kind == "delta")


def assert_row_is_alone(events, alone, what):
    """A batched request's events against the same request generated alone: tokens, text, finish reason."""
    assert tokens_of(events) == alone.tokens, what
    assert text_of(events) == alone.text, what
    assert events[-1].finish_reason == alone.finish_reason, what


def run_concurrently(engine, requests, join_late=None, after_tokens=3):
    """Submit `requests` together; with join_late, submit that one from the worker thread right after the
    first request's `after_tokens`-th token, so it joins a batch that is already decoding. Events per request."""
    handles = [engine.submit(r) for r in requests]
    late = []
    if join_late is not None:
        first, push, seen = handles[0], handles[0].push, [0]

        def push_then_join(event):   # runs on the engine's worker thread, between two batch steps
            push(event)
            if event.kind == "delta":
                seen[0] += 1
                if seen[0] == after_tokens:
                    late.append(engine.submit(join_late))

        first.push = push_then_join
    results = [None] * len(handles)

    def drain(i, h):
        results[i] = collect(h)

    threads = [threading.Thread(target=drain, args=(i, h)) for i, h in enumerate(handles)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if join_late is not None:
        assert late, "the first request ended before the late one could join"
        results.append(collect(late[0]))
    assert all(r is not None and r[-1].kind == "done" for r in results), [r[-1] for r in results]
    return results


def use_kernels(engine, name, mode):
    return engine.run(lambda: engine.registry.get(name).model.use_kernels(KernelChoice(mode)))


@pytest.mark.parametrize("mode,bits", [("builtin", None), ("builtin", 4), ("native", None), ("native", 4)])
def test_greedy_batch_equals_each_request_alone(tiny_chat, mode, bits):
    """4 greedy requests (different prompt lengths and max_tokens, the last joining mid-way) in one batch."""
    options = {"bits": bits} if bits else {}
    eng = Engine({"tiny": str(tiny_chat)}, load_options=options)
    alone_model = mlxedge.load(str(tiny_chat), **options)
    alone_model.use_kernels(KernelChoice(mode))
    try:
        kernels = use_kernels(eng, "tiny", mode)
        if mode == "native":   # every matmul layer on the native kernels (auto keeps some on the built-in)
            if kernels["backend"] == "mlx built-in":
                pytest.skip("the native CPU kernels are not available in this build")
            assert set(b for kind in kernels["layers"].values() for b in kind) == {"native"}, kernels
        requests = [Request("tiny", PROMPTS[0], raw=True, max_tokens=40),
                    Request("tiny", PROMPTS[1], raw=True, max_tokens=24),
                    Request("tiny", PROMPTS[2], raw=True, max_tokens=32)]
        late = Request("tiny", PROMPTS[3], raw=True, max_tokens=12)
        results = run_concurrently(eng, requests, join_late=late)
        for request, events in zip(requests + [late], results):
            alone = alone_model.generate(request.prompt, raw=True, max_tokens=request.max_tokens)
            assert_row_is_alone(events, alone, (kernels, request.prompt))
            assert events[-1].stats["generation_tokens"] == len(alone.tokens)
        stats = eng.batching_status()["tiny"]
        assert stats["batched"] is True
        assert stats["max_rows"] == 4, stats   # all four (the late one included) ran in one forward
        assert stats["row_steps"] > stats["forwards"]
        text = eng.prometheus()
        assert 'mlxedge_decode_forwards_total{mode="batched",model="tiny"}' in text
        assert "round_robin" not in text and "mlxedge_unbatched_requests_total" not in text
    finally:
        eng.close()


def test_per_request_sampling_settings_stay_per_row(tiny_chat):
    """Greedy, seeded temperature/top-p, repetition penalty and a stop string side by side in one batch."""
    eng = Engine({"tiny": str(tiny_chat)})
    model = mlxedge.load(str(tiny_chat))
    try:
        greedy = model.generate(PROMPTS[0], raw=True, max_tokens=20)
        stop = greedy.text[len(greedy.text) // 2:][:3]   # a stop string the greedy reply reaches mid-way
        assert stop.strip()
        specs = [dict(max_tokens=20),
                 dict(max_tokens=24, sampling={"temperature": 0.9, "top_p": 0.9, "seed": 7}),
                 dict(max_tokens=24, sampling={"temperature": 1.2, "top_k": 40, "min_p": 0.02, "seed": 11}),
                 dict(max_tokens=20, sampling={"repetition_penalty": 1.5}),
                 dict(max_tokens=20, stop=[stop])]
        prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[2], PROMPTS[0]]
        requests = [Request("tiny", p, raw=True, **spec) for p, spec in zip(prompts, specs)]
        results = run_concurrently(eng, requests)
        for request, events in zip(requests, results):
            alone = model.generate(request.prompt, raw=True, max_tokens=request.max_tokens,
                                   stop=request.stop or None, **request.sampling)
            assert_row_is_alone(events, alone, request)
        assert results[4][-1].finish_reason == "stop" and stop not in text_of(results[4])
        # the two seeded rows share a prompt but not a key stream: their replies differ
        assert tokens_of(results[1]) != tokens_of(results[2])
        assert eng.batching_status()["tiny"]["max_rows"] == 5
    finally:
        eng.close()


def test_cancelling_one_row_leaves_the_others_exact(tiny_chat):
    eng = Engine({"tiny": str(tiny_chat)})
    model = mlxedge.load(str(tiny_chat))
    try:
        keep = [Request("tiny", PROMPTS[0], raw=True, max_tokens=30),
                Request("tiny", PROMPTS[2], raw=True, max_tokens=30)]
        doomed = eng.submit(Request("tiny", PROMPTS[1], raw=True, max_tokens=400))
        push, seen = doomed.push, [0]

        def cancel_on_third(event):   # the worker thread: cancel lands between two batch steps
            push(event)
            if event.kind == "delta":
                seen[0] += 1
                if seen[0] == 3:
                    doomed.cancel()

        doomed.push = cancel_on_third
        results = run_concurrently(eng, keep)
        cancelled = collect(doomed)
        assert cancelled[-1].finish_reason == "cancelled"
        assert doomed.tokens_after_cancel <= 1 and len(tokens_of(cancelled)) <= 4
        for request, events in zip(keep, results):
            assert tokens_of(events) == model.generate(request.prompt, raw=True, max_tokens=30).tokens
        assert eng.batching_status()["tiny"]["max_rows"] == 3
    finally:
        eng.close()


def test_prefix_cache_saves_prefill_for_requests_that_were_batched(tiny_chat):
    eng = Engine({"tiny": str(tiny_chat)})
    model = mlxedge.load(str(tiny_chat))
    try:
        firsts = [[{"role": "system", "content": "You are terse."}, {"role": "user", "content": f"Name a {thing}."}]
                  for thing in ("colour", "river", "planet")]
        results = run_concurrently(eng, [Request("tiny", m, max_tokens=6) for m in firsts])
        seconds = [m + [{"role": "assistant", "content": text_of(ev)}, {"role": "user", "content": "Another."}]
                   for m, ev in zip(firsts, results)]
        hits = eng.cache.hits
        again = run_concurrently(eng, [Request("tiny", m, max_tokens=6) for m in seconds])
        assert eng.cache.hits == hits + 3
        for first, second, events in zip(firsts, seconds, again):
            assert events[-1].stats["cached_tokens"] >= len(model.tokenizer.prompt_ids(first)) - 1
            assert tokens_of(events) == model.generate(second, max_tokens=6).tokens
    finally:
        eng.close()


def test_a_row_leaves_with_exactly_its_own_keys_and_values(tiny_chat):
    """The KV state a row takes out of the batch equals a single prefill of the tokens it went through."""
    model = mlxedge.load(str(tiny_chat))
    batch = model.new_batch()
    rows = [model.batch_row(p, raw=True, max_tokens=n) for p, n in zip(PROMPTS, (9, 5, 14, 7))]
    for i, row in enumerate(rows):
        while not row.ready:
            row.prefill_step()
        batch.add(row)
        if i == 1:
            for _ in range(3):   # the last two join a batch that is already decoding
                batch.step()
    finished = []
    while len(batch):
        finished += [row for row, events in batch.step() if row.finish is not None]
    assert sorted(map(id, finished)) == sorted(map(id, rows))
    for row in rows:
        held = row.cache.tokens   # prompt and every token handed out went through the model (EOS too)
        assert held in (row.prompt_ids + row.tokens, row.prompt_ids + row.tokens + model.eos_ids()[:1])
        ref = model.new_cache()
        model.module(mx.array(held, dtype=mx.uint32)[None], cache=ref.caches)
        for mine, theirs in zip(row.cache.caches, ref.caches):
            assert mine.offset == theirs.offset == len(held)
            n = len(held)
            for got, want in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
                np.testing.assert_allclose(np.array(got[..., :n, :]), np.array(want[..., :n, :]), rtol=1e-5, atol=1e-5)


def test_probe_refuses_a_forward_that_ignores_per_row_offsets(tiny_chat):
    """An attention whose RoPE reads one offset for the whole batch is caught before any request batches."""
    model = mlxedge.load(str(tiny_chat))
    assert model.batching_unsupported() is None
    for layer in model.module.layers:
        rope = layer.self_attn.rope

        def first_offset_only(x, offset=0, _rope=rope):
            if isinstance(offset, mx.array) and offset.size > 1:
                offset = int(offset.max().item())
            return _rope(x, offset=offset)

        layer.self_attn.rope = first_offset_only
    model._batching_verdict = None
    reason = model.batching_unsupported()
    assert reason is not None and "offsets" in reason


def test_sliding_window_layers_batch_past_their_window(smollm2_hf):
    """gemma3's sliding layers (window 8 here) keep rotating caches: rows rotate inside the batch."""
    sliding = tiny_chat_model(smollm2_hf, "gemma3_text")
    eng = Engine({"sliding": str(sliding)})
    model = mlxedge.load(str(sliding))
    try:
        requests = [Request("sliding", PROMPTS[1], raw=True, max_tokens=30),   # prompt past the window
                    Request("sliding", PROMPTS[2], raw=True, max_tokens=20),
                    Request("sliding", "a", raw=True, max_tokens=12)]
        late = Request("sliding", PROMPTS[3], raw=True, max_tokens=16)
        results = run_concurrently(eng, requests, join_late=late, after_tokens=9)
        for request, events in zip(requests + [late], results):
            assert_row_is_alone(events, model.generate(request.prompt, raw=True, max_tokens=request.max_tokens),
                                request.prompt)
        assert len(model.tokenizer.prompt_ids(PROMPTS[1], raw=True)) > 8
        status = eng.batching_status()["sliding"]
        assert status["batched"] is True and status["max_rows"] == 4, status
    finally:
        eng.close()


def test_models_that_cannot_batch_fall_back_to_round_robin_and_say_why(tiny_chat, smollm2_hf):
    wide = tiny_chat_model(smollm2_hf, "llama", name="head32", head_dim=32)   # a head a quantized KV takes
    quantized = Engine({"qkv": str(wide)}, load_options={"kv_bits": 8})
    rotating = Engine({"window": str(tiny_chat)}, load_options={"kv_overflow": "rotate"})
    try:
        for engine, name, source, options, why in ((quantized, "qkv", wide, {"kv_bits": 8}, "quantized"),
                                                   (rotating, "window", tiny_chat, {"kv_overflow": "rotate"},
                                                    "rotating KV window")):
            model = mlxedge.load(str(source), **options)
            requests = [Request(name, p, raw=True, max_tokens=10) for p in PROMPTS[:3]]
            results = run_concurrently(engine, requests)
            for request, events in zip(requests, results):
                assert tokens_of(events) == model.generate(request.prompt, raw=True, max_tokens=10).tokens
            status = engine.batching_status()[name]
            assert status["batched"] is False and why in status["reason"]
            text = engine.prometheus()
            assert f'mlxedge_unbatched_requests_total{{model="{name}",reason=' in text
            assert f'mlxedge_decode_forwards_total{{mode="round_robin",model="{name}"}}' in text
    finally:
        quantized.close()
        rotating.close()


def test_one_token_prompts_and_one_token_replies_batch_too(tiny_chat):
    """A one-token prompt joins with an empty KV state; max_tokens=1 leaves after its first token."""
    eng = Engine({"tiny": str(tiny_chat)})
    model = mlxedge.load(str(tiny_chat))
    try:
        assert len(model.tokenizer.prompt_ids("a", raw=True)) == 1
        requests = [Request("tiny", "b", raw=True, max_tokens=7), Request("tiny", "a", raw=True, max_tokens=1),
                    Request("tiny", PROMPTS[0], raw=True, max_tokens=1), Request("tiny", PROMPTS[1], raw=True, max_tokens=9)]
        late = Request("tiny", "c", raw=True, max_tokens=5)
        results = run_concurrently(eng, requests, join_late=late, after_tokens=2)
        for request, events in zip(requests + [late], results):
            alone = model.generate(request.prompt, raw=True, max_tokens=request.max_tokens)
            assert_row_is_alone(events, alone, request.prompt)
            assert len(alone.tokens) <= request.max_tokens
        assert eng.batching_status()["tiny"]["max_rows"] >= 3
    finally:
        eng.close()
