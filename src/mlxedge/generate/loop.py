"""The prefill/decode loop: chunked prefill into mlx-lm's KV caches, pipelined decoding, stop conditions.

`generate_stream` yields StreamEvents; everything above it (Model.generate, the CLI) is a consumer.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from ..errors import GenerationError
from .detokenizer import StreamingDetokenizer
from .repetition import FINISH_REASON as REPEATING, RepetitionGuard
from .sampler import SamplingParams, make_sampler
from .stats import GenerationStats, StreamEvent
from .stop import StopMatcher

PREFILL_CHUNK = 512


def _prefill(model, prompt: mx.array, cache, chunk: int) -> mx.array:
    """Run all but the last prompt token through the model in chunks; return the remaining token."""
    while prompt.size > 1:
        n = min(chunk, prompt.size - 1)
        model(prompt[:n][None], cache=cache)
        mx.eval([c.state for c in cache])
        prompt = prompt[n:]
    return prompt


def decode_tokens(model, prompt_ids: Sequence[int], sampling: SamplingParams, *,
                  prefill_chunk: int = PREFILL_CHUNK, max_tokens: int = 256,
                  max_kv_size: Optional[int] = None) -> Iterator[int]:
    """Token ids, one at a time; the next step is queued (async_eval) before the current id is handed out.

    max_kv_size: keep only the latest tokens in a rotating KV cache (None: keep every token).
    """
    sampler = make_sampler(sampling)
    cache = make_prompt_cache(model, max_kv_size=max_kv_size)
    track_history = sampling.repetition_penalty != 1.0
    history = mx.array(list(prompt_ids), dtype=mx.int32)[None]
    empty_history = mx.zeros((1, 0), dtype=mx.int32)

    def step(tokens: mx.array) -> mx.array:
        nonlocal history
        logits = model(tokens[None], cache=cache)[:, -1, :]
        token = sampler(logits, history if track_history else empty_history)
        if track_history:
            history = mx.concatenate([history, token[None].astype(mx.int32)], axis=1)
        return token

    rest = _prefill(model, mx.array(list(prompt_ids), dtype=mx.uint32), cache, prefill_chunk)
    token = step(rest)
    mx.async_eval(token)
    for n in range(max_tokens):
        nxt = None
        if n + 1 < max_tokens:
            nxt = step(token)
            mx.async_eval(nxt)
        yield int(token.item())
        token = nxt


def generate_stream(model, tokenizer, prompt_ids: Sequence[int], *, eos_ids: Sequence[int],
                    sampling: SamplingParams, max_tokens: int = 256, stop: Optional[Sequence[str]] = None,
                    cancel: Optional[Callable[[], bool]] = None, prefill_chunk: int = PREFILL_CHUNK,
                    max_kv_size: Optional[int] = None) -> Iterator[StreamEvent]:
    """Stream text deltas (UTF-8 safe, stop strings held back); the last event has finish_reason and stats."""
    if max_tokens < 0:
        raise GenerationError(f"max_tokens={max_tokens} must be >= 0.")
    if len(prompt_ids) == 0:
        raise GenerationError("the prompt is empty; give at least one token of text.")
    sampling.validate()
    if isinstance(stop, str):
        stop = [stop]
    eos = set(int(e) for e in eos_ids)
    detok = StreamingDetokenizer(tokenizer)
    matcher = StopMatcher(stop or [])
    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    mx.reset_peak_memory()
    start = time.perf_counter()
    first_at = last_at = start
    finish = "length"
    tokens = decode_tokens(model, prompt_ids, sampling, prefill_chunk=prefill_chunk, max_tokens=max_tokens,
                           max_kv_size=max_kv_size)
    seen = 0
    guard = RepetitionGuard()
    for token in tokens:
        now = time.perf_counter()
        if seen == 0:
            first_at = now
        seen += 1
        if token in eos:
            finish = "stop"
            break
        stats.generation_tokens += 1
        last_at = now
        text, hit = matcher.feed(detok.add(token))
        yield StreamEvent(text=text, token=token)
        if hit:
            finish = "stop"
            break
        if guard.feed(token):  # the reply loops: end it ("repeating") rather than run to the limit
            finish = REPEATING
            break
        if cancel is not None and cancel():
            finish = "cancelled"
            break
    tokens.close()
    tail = ""
    if not matcher.stopped:
        tail, hit = matcher.feed(detok.finalize())
        if hit:
            finish = "stop"
        else:
            tail += matcher.flush()
    elapsed_first = first_at - start
    stats.ttft_s = elapsed_first
    stats.prompt_tps = len(prompt_ids) / elapsed_first if elapsed_first > 0 else 0.0
    if stats.generation_tokens > 1 and last_at > first_at:
        stats.generation_tps = (stats.generation_tokens - 1) / (last_at - first_at)
    stats.peak_memory_bytes = int(mx.get_peak_memory())
    yield StreamEvent(text=tail, finish_reason=finish, stats=stats.to_dict())
