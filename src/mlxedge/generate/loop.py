"""The prefill/decode loop: chunked prefill into a PromptCache, pipelined decoding, stop conditions.

`generate_stream` yields StreamEvents; everything above it (Model.generate, sessions, the CLI) is a consumer.
The caller owns the PromptCache: tokens it already holds (the longest common prefix with the prompt) are not
prefilled again, and after the call it holds the prompt plus every generated token that went through the
model, so the next call (a session's next turn) starts from there.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx

from ..errors import GenerationError
from .kv_cache import make_cache
from .prompt_cache import PromptCache
from .reply import Reply
from .sampler import SamplingParams, make_sampler
from .stats import GenerationStats, StreamEvent

PREFILL_CHUNK = 512


def new_prompt_cache(model, **cache_kwargs) -> PromptCache:
    """An empty PromptCache for `model` (see kv_cache.make_cache for max_kv_size and kv_bits)."""
    def make():
        return make_cache(model, **cache_kwargs)

    return PromptCache(make(), make)


class Cancelled(Exception):
    """Raised inside a token generator when the cancel hook fires during prefill."""


def prefill(model, cache: PromptCache, ids: Sequence[int], chunk: int = PREFILL_CHUNK,
            cancel: Optional[Callable[[], bool]] = None) -> None:
    """Run `ids` through the model into `cache` (appending to what it holds), `chunk` tokens at a time."""
    ids = [int(t) for t in ids]
    for start in range(0, len(ids), chunk):
        if cancel is not None and cancel():
            raise Cancelled
        part = ids[start:start + chunk]
        model(mx.array(part, dtype=mx.uint32)[None], cache=cache.caches)
        mx.eval([c.state for c in cache.caches])
        cache.tokens.extend(part)


class HistoryTracker:
    """The token history the repetition penalty looks at (prompt + generated), kept only when it is on."""

    def __init__(self, prompt_ids: Sequence[int], sampling: SamplingParams):
        self.on = sampling.repetition_penalty != 1.0
        self.array = mx.array(list(prompt_ids) if self.on else [], dtype=mx.int32)[None]

    def extended(self, tokens: mx.array) -> mx.array:
        """The history followed by `tokens` (1-D), without keeping them."""
        if not self.on:
            return self.array
        return mx.concatenate([self.array, tokens.astype(mx.int32)[None]], axis=1)

    def add(self, tokens: mx.array) -> None:
        if self.on:
            self.array = self.extended(tokens)


def decode_tokens(model, cache: PromptCache, prompt_ids: Sequence[int], sampling: SamplingParams, *,
                  prefill_chunk: int = PREFILL_CHUNK, max_tokens: int = 256,
                  cancel: Optional[Callable[[], bool]] = None, sampler=None) -> Iterator[int]:
    """Token ids, one at a time; the next step is queued (async_eval) before the current id is handed out.

    `cache.tokens` must be a proper prefix of `prompt_ids` (PromptCache.reuse makes it so); the rest of the
    prompt is prefilled. At every yield `cache.tokens` lists exactly what the cache holds.
    """
    sampler = sampler or make_sampler(sampling)
    history = HistoryTracker(prompt_ids, sampling)

    def step(tokens: mx.array) -> mx.array:
        logits = model(tokens[None], cache=cache.caches)[:, -1, :]
        token = sampler(logits, history.array)
        history.add(token)
        return token

    try:
        start = len(cache.tokens)
        prefill(model, cache, prompt_ids[start:-1], prefill_chunk, cancel)
        if max_tokens == 0:
            return
        token = step(mx.array([int(prompt_ids[-1])], dtype=mx.uint32))
        cache.tokens.append(int(prompt_ids[-1]))
        mx.async_eval(token)
        for n in range(max_tokens):
            nxt = None
            if n + 1 < max_tokens:
                nxt = step(token)
                mx.async_eval(nxt)
            value = int(token.item())
            if nxt is not None:
                cache.tokens.append(value)
            yield value
            token = nxt
    finally:
        cache.repair()  # an exception inside a forward pass may leave layers ahead of cache.tokens


def generate_stream(model, tokenizer, prompt_ids: Sequence[int], *, eos_ids: Sequence[int],
                    sampling: SamplingParams, cache: Optional[PromptCache] = None, max_tokens: int = 256,
                    stop: Optional[Sequence[str]] = None, cancel: Optional[Callable[[], bool]] = None,
                    prefill_chunk: int = PREFILL_CHUNK, drafter=None, num_draft_tokens: int = 3,
                    draft_auto: bool = False, logits_filter=None) -> Iterator[StreamEvent]:
    """Stream text deltas (UTF-8 safe, stop strings held back); the last event has finish_reason and stats.

    logits_filter: a native version of the sampler's filters (the model's KernelChoice.logits_filter()).

    drafter: a speculative.Drafter (a draft model or prompt lookup) proposing `num_draft_tokens` per step;
    draft_auto turns speculation off when it measures slower than plain decoding.
    """
    if max_tokens < 0:
        raise GenerationError(f"max_tokens={max_tokens} must be >= 0.")
    if len(prompt_ids) == 0:
        raise GenerationError("the prompt is empty; give at least one token of text.")
    sampling.validate()
    reply = Reply(tokenizer, eos_ids, stop)
    prompt_ids = [int(t) for t in prompt_ids]
    if cache is None:
        cache = new_prompt_cache(model)
    mx.reset_peak_memory()
    start = time.perf_counter()
    cached = cache.reuse(prompt_ids)
    stats = GenerationStats(prompt_tokens=len(prompt_ids), cached_prompt_tokens=cached)
    first_at = last_at = start
    finish = "length"
    if drafter is not None:
        from .speculative import speculative_tokens

        tokens = speculative_tokens(model, cache, prompt_ids, sampling, drafter, stats,
                                    num_draft_tokens=num_draft_tokens, auto=draft_auto,
                                    prefill_chunk=prefill_chunk, max_tokens=max_tokens, cancel=cancel)
    else:
        tokens = decode_tokens(model, cache, prompt_ids, sampling, prefill_chunk=prefill_chunk,
                               max_tokens=max_tokens, cancel=cancel,
                               sampler=make_sampler(sampling, logits_filter=logits_filter))
    seen = 0
    try:
        for token in tokens:
            now = time.perf_counter()
            if seen == 0:
                first_at = now
            seen += 1
            text = reply.feed(token)
            if text is None:  # EOS
                break
            stats.generation_tokens += 1
            last_at = now
            yield StreamEvent(text=text, token=token)
            if reply.finish is not None:
                break
            if cancel is not None and cancel():
                finish = "cancelled"
                break
    except Cancelled:
        finish = "cancelled"
    finally:
        tokens.close()
    finish = reply.finish or finish
    if seen == 0:
        first_at = time.perf_counter()
    tail, hit = reply.close()
    if hit:
        finish = "stop"
    elapsed_first = first_at - start
    stats.ttft_s = elapsed_first
    prefilled = len(prompt_ids) - cached
    stats.prompt_tps = prefilled / elapsed_first if elapsed_first > 0 else 0.0
    if stats.generation_tokens > 1 and last_at > first_at:
        stats.generation_tps = (stats.generation_tokens - 1) / (last_at - first_at)
    stats.peak_memory_bytes = int(mx.get_peak_memory())
    stats.kv_cache_bytes = int(cache.nbytes)
    yield StreamEvent(text=tail, finish_reason=finish, stats=stats.to_dict())
