"""The engine: same tokens as Model.generate, fair interleaving without mixing, cancellation within a token,
busy and over-budget refusals, idle unload, logprobs against transformers."""

from __future__ import annotations

import time

import numpy as np
import pytest

import mlxedge
from tiny_chat import tiny_chat  # noqa: F401  (fixture)
from engine_fixtures import wait_for
from mlxedge.engine import BusyError, Engine, OverBudgetError, Request

PROMPTS = ["The quick brown fox", "Once upon a time", "In a hole in the ground there lived"]


@pytest.fixture(scope="module")
def engine(tiny_chat):
    eng = Engine({"tiny": str(tiny_chat)}, keep_alive=600)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def model(tiny_chat):
    return mlxedge.load(str(tiny_chat))


def run(engine, request):
    events = list(engine.submit(request))
    assert events[-1].kind in ("done", "error"), events[-1]
    return events


def tokens_of(events):
    return [e.token for e in events if e.kind == "delta" and e.token is not None]


def test_engine_tokens_equal_model_generate(engine, model):
    for prompt, raw in ((PROMPTS[0], True), ([{"role": "user", "content": "hello"}], False)):
        events = run(engine, Request("tiny", prompt, raw=raw, max_tokens=12))
        expected = model.generate(prompt, raw=raw, max_tokens=12)
        assert tokens_of(events) == expected.tokens
        assert "".join(e.text for e in events if e.kind == "delta") == expected.text
        assert events[-1].finish_reason == expected.finish_reason
        assert events[-1].stats["generation_tokens"] == len(expected.tokens)


def test_concurrent_requests_interleave_without_mixing(engine, model):
    expected = [model.generate(p, raw=True, max_tokens=16).tokens for p in PROMPTS]
    handles = [engine.submit(Request("tiny", p, raw=True, max_tokens=16)) for p in PROMPTS]
    order = []  # (request index, arrival time) of every delta, to show the streams really interleave
    results = [[] for _ in PROMPTS]

    def drain(i, h):
        for ev in h:
            if ev.kind == "delta":
                results[i].append(ev.token)
                order.append((i, time.perf_counter()))

    import threading
    threads = [threading.Thread(target=drain, args=(i, h)) for i, h in enumerate(handles)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == expected
    arrival = [i for i, _ in sorted(order, key=lambda x: x[1])]
    first_done = min(len(arrival) - arrival[::-1].index(i) - 1 for i in range(len(PROMPTS)))
    assert len(set(arrival[:first_done])) == len(PROMPTS), "the first request finished before others started"


def test_cancel_stops_within_one_token(engine):
    handle = engine.submit(Request("tiny", PROMPTS[1], raw=True, max_tokens=2000))
    seen = 0
    for ev in handle:
        if ev.kind == "delta":
            seen += 1
            if seen == 3:
                handle.cancel()
        if ev.kind == "done":
            final = ev
    assert final.finish_reason == "cancelled"
    assert handle.tokens_after_cancel <= 1
    assert final.stats["generation_tokens"] <= 4
    assert run(engine, Request("tiny", "still serving", raw=True, max_tokens=3))[-1].kind == "done"


def test_queue_full_is_busy_not_a_hang(tiny_chat):
    eng = Engine({"tiny": str(tiny_chat)}, max_queue=1, max_active=1)
    try:
        long = eng.submit(Request("tiny", "a", raw=True, max_tokens=2000))
        first = next(iter(long))
        assert first.kind == "progress"  # admitted: it no longer counts as queued
        waiting = eng.submit(Request("tiny", "b", raw=True, max_tokens=2))
        started = time.monotonic()
        with pytest.raises(BusyError, match="busy"):
            eng.submit(Request("tiny", "c", raw=True, max_tokens=2))
        assert time.monotonic() - started < 1.0
        long.cancel()
        assert [e.kind for e in waiting][-1] == "done"
    finally:
        eng.close()


def test_model_over_budget_is_refused_and_engine_keeps_serving(tiny_chat, smollm2_hf):
    small = mlxedge.plan(str(tiny_chat))
    big = mlxedge.plan(str(smollm2_hf))
    budget = small["total_bytes"] + 16 * 1024 * 1024
    assert big["total_bytes"] > budget
    eng = Engine({"tiny": str(tiny_chat), "big": str(smollm2_hf)}, memory_budget=budget)
    try:
        refused = run(eng, Request("big", "hello", raw=True, max_tokens=2))
        assert refused[-1].kind == "error" and refused[-1].code == "over_budget"
        assert "budget" in refused[-1].message
        assert run(eng, Request("tiny", "hello", raw=True, max_tokens=2))[-1].kind == "done"
        with pytest.raises(OverBudgetError):
            eng.load("big")
    finally:
        eng.close()


def test_kv_reservations_hold_back_requests_that_do_not_fit_together(tiny_chat):
    plan = mlxedge.plan(str(tiny_chat))
    context = plan["settings"]["context_length"]
    # the budget holds the model and one full context of KV cache, not two requests of 60% each
    eng = Engine({"tiny": str(tiny_chat)}, memory_budget=plan["total_bytes"] + 1024)
    try:
        big = int(context * 0.6)
        first = eng.submit(Request("tiny", "a", raw=True, max_tokens=big))
        events = iter(first)
        assert next(events).kind == "progress"
        second = eng.submit(Request("tiny", "b", raw=True, max_tokens=big))
        small = eng.submit(Request("tiny", "c", raw=True, max_tokens=4))
        time.sleep(0.5)
        assert eng.queue_depth() == 2 and eng.active_count() == 1  # FIFO: both wait behind the reservation
        first.cancel()
        list(events)
        assert next(iter(second)).kind == "progress"  # admitted once the first released its reservation
    finally:
        second.cancel()
        eng.close()
    assert [e.kind for e in small][-1] in ("done", "error")


def test_idle_model_unloads_after_keep_alive(tiny_chat):
    eng = Engine({"tiny": str(tiny_chat)}, keep_alive=0.3)
    try:
        assert run(eng, Request("tiny", "hi", raw=True, max_tokens=2))[-1].kind == "done"
        assert eng.registry.snapshot()
        wait_for(lambda: not eng.registry.snapshot(), timeout=10)
        assert run(eng, Request("tiny", "hi", raw=True, max_tokens=2))[-1].kind == "done"  # loads again
    finally:
        eng.close()


def test_unknown_model_is_not_found(engine):
    events = run(engine, Request("nope", "hi"))
    assert events[-1].kind == "error" and events[-1].code == "not_found"


def test_logprobs_match_transformers(engine, tiny_chat):
    import torch
    from transformers import AutoModelForCausalLM

    prompt = PROMPTS[2]
    events = run(engine, Request("tiny", prompt, raw=True, max_tokens=6, logprobs=True, top_logprobs=3))
    deltas = [e for e in events if e.kind == "delta" and e.token is not None]
    ids = engine.tokenize("tiny", prompt)
    tokens = [e.token for e in deltas]
    ref = AutoModelForCausalLM.from_pretrained(tiny_chat, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = ref(torch.tensor([ids + tokens])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1).numpy()
    for i, ev in enumerate(deltas):
        row = logp[len(ids) - 1 + i]
        assert ev.logprob["token_id"] == ev.token
        assert ev.logprob["logprob"] == pytest.approx(row[ev.token], abs=2e-3)
        top = [t["token_id"] for t in ev.logprob["top_logprobs"]]
        assert top == list(np.argsort(-row)[:3])


def test_metrics_count_requests_and_tokens(engine):
    run(engine, Request("tiny", "count me", raw=True, max_tokens=3))
    text = engine.prometheus()
    for name in ("mlxedge_requests_total", "mlxedge_generated_tokens_total", "mlxedge_ttft_seconds_bucket",
                 "mlxedge_generation_tokens_per_second_count", "mlxedge_queue_depth", "mlxedge_resident_models",
                 "mlxedge_resident_bytes", "mlxedge_prefix_cache_hits"):
        assert name in text
    assert 'mlxedge_resident_models 1' in text


def test_prefix_cache_reuses_a_conversation_and_keeps_outputs_exact(engine, model):
    first = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    events = run(engine, Request("tiny", first, max_tokens=6))
    reply = "".join(e.text for e in events if e.kind == "delta")
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Another one."}]
    hits = engine.cache.hits
    events = run(engine, Request("tiny", second, max_tokens=6))
    done = events[-1]
    first_len = len(model.tokenizer.prompt_ids(first))
    assert engine.cache.hits == hits + 1
    assert done.stats["cached_tokens"] >= first_len - 1
    assert events[0].kind == "progress" and events[0].processed == done.stats["cached_tokens"]
    assert tokens_of(events) == model.generate(second, max_tokens=6).tokens


def test_prefix_cache_is_bounded_in_bytes(tiny_chat):
    eng = Engine({"tiny": str(tiny_chat)}, prefix_cache_bytes=1)   # holds nothing for long
    try:
        for prompt in PROMPTS:
            run(eng, Request("tiny", prompt, raw=True, max_tokens=3))
        assert eng.cache.stats()["bytes"] <= 1 and eng.cache.stats()["entries"] == 0
    finally:
        eng.close()
    eng = Engine({"tiny": str(tiny_chat)}, prefix_cache_bytes=64 * 1024 * 1024)
    try:
        for i in range(6):
            run(eng, Request("tiny", f"{i} distinct prompt number {i}", raw=True, max_tokens=3))
        stats = eng.cache.stats()
        assert 0 < stats["bytes"] <= 64 * 1024 * 1024 and stats["entries"] >= 1
        one = stats["bytes"] / stats["entries"]
        eng.cache.max_bytes = int(2.5 * one)
        run(eng, Request("tiny", "one more", raw=True, max_tokens=3))
        assert eng.cache.stats()["entries"] <= 2 and eng.cache.nbytes <= eng.cache.max_bytes
    finally:
        eng.close()


def test_unloading_a_model_in_use_is_busy_and_the_request_finishes(tiny_chat):
    eng = Engine({"tiny": str(tiny_chat)})
    try:
        handle = eng.submit(Request("tiny", "a", raw=True, max_tokens=400))
        events = iter(handle)
        assert next(events).kind == "progress"
        with pytest.raises(BusyError, match="serving"):
            eng.unload("tiny")
        handle.cancel()
        assert [e.kind for e in events][-1] == "done"
        assert eng.unload("tiny") is True and eng.registry.snapshot() == []
        assert eng.unload("tiny") is False
    finally:
        eng.close()


def test_prefill_progress_reports_each_chunk(engine, model):
    prompt = " ".join(f"word{i}" for i in range(300))   # over two 512-token prefill chunks
    total = len(model.tokenizer.prompt_ids(prompt, raw=True))
    assert total > 1024
    events = run(engine, Request("tiny", prompt, raw=True, max_tokens=2))
    progress = [(e.processed, e.total) for e in events if e.kind == "progress"]
    assert all(t == total for _, t in progress)
    done = [p for p, _ in progress]
    assert done == sorted(done) and done[-1] == total and len(done) >= 4   # start, 512, 1024, all
    assert 512 in done and 1024 in done
