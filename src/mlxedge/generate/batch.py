"""Continuous batching: several requests of one model decoded together, one forward pass per step.

A `BatchRow` is one request. Its prompt is prefilled alone into its own PromptCache, one chunk per call of
`prefill_step()` (so a long prompt does not stall the rows already decoding; what the PromptCache already
held, a prefix-cache hit, is not prefilled again). Then it joins a `DecodeBatch`, which keeps one mlx-lm
batched cache per layer — `BatchKVCache` for full attention, `BatchRotatingKVCache` for a sliding-window
layer (gemma3's local layers) — rows left-padded to a common length, each with its own offset, so
positions (RoPE), attention masks and windows stay per row. Each `step()` runs ONE forward over the B rows' latest tokens,
samples every row with its own sampler (temperature, top-p/k, min-p, seed, repetition penalty) and hands
each row its token; EOS, stop strings, max_tokens and the repetition guard end a row exactly as in the
single-stream loop (`reply.Reply` is shared). Rows leave between steps (finished or removed): their keys
and values are copied back into their PromptCache, which then holds prompt + reply (so a shared prefix
cache keeps them), and the batch is filtered. Steps are pipelined like the single-stream loop: the forward
of step n+1 is queued (async_eval) before the tokens of step n are read on the host.

Batching needs every layer to keep a KVCache or a RotatingKVCache without sink tokens, and the
architecture's forward to honour per-row offsets and masks. `batching_unsupported(module, make_caches)`
says why not otherwise — a layer keeping another kind of cache (a quantized KV cache, recurrent state), or
a batched forward of two short probe prompts that does not reproduce their single forwards (e.g. an
attention or RoPE that reads only one offset) — and the caller then decodes requests one at a time.
"""

from __future__ import annotations

import time
from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache, KVCache, RotatingKVCache

from .loop import PREFILL_CHUNK, HistoryTracker, prefill
from .prompt_cache import PromptCache
from .reply import Reply
from .sampler import SamplingParams, make_sampler
from .stats import GenerationStats, StreamEvent

# the probe's batched logits may differ from the single ones by rounding (kernels see other row counts);
# a wrong position or mask moves them by a large fraction of their range
PROBE_TOLERANCE = 0.05
PROBE_PROMPTS = ((3, 5, 7), (4, 6, 8, 9, 10, 11))
# the batched kind of every per-layer cache kind that can batch
BATCHED_KINDS = {KVCache: BatchKVCache, RotatingKVCache: BatchRotatingKVCache}


def _batched(cache):
    """A one-row batched cache holding what a single-request layer cache holds."""
    return BATCHED_KINDS[type(cache)].merge([cache])


def _cannot_batch(cache) -> bool:
    # mlx-lm's batched rotating cache has no "keep" (attention sink) tokens
    return type(cache) not in BATCHED_KINDS or (type(cache) is RotatingKVCache and cache.keep != 0)


class BatchRow:
    """One request of a decode batch: its prompt, its own KV state (while prefilling), sampler and reply."""

    def __init__(self, prompt_ids: Sequence[int], cache: PromptCache, sampling: SamplingParams, reply: Reply,
                 *, module, max_tokens: int = 256, prefill_chunk: int = PREFILL_CHUNK, logits_filter=None):
        self.prompt_ids = [int(t) for t in prompt_ids]
        if not self.prompt_ids:
            from ..errors import GenerationError
            raise GenerationError("the prompt is empty; give at least one token of text.")
        self.cache = cache
        self.cached_tokens = cache.reuse(self.prompt_ids)
        self.sampler = make_sampler(sampling, logits_filter=logits_filter)
        self.history = HistoryTracker(self.prompt_ids, sampling)
        self.reply = reply
        self.max_tokens = int(max_tokens)
        self.tokens: List[int] = []          # generated tokens handed out (EOS excluded)
        self.held: List[int] = []            # the ids the batch's KV cache holds for this row, in order
        self.finish: Optional[str] = None
        self.fresh = True                    # its next input is the prompt's last token, not a generated one
        self._module = module
        self._chunk = int(prefill_chunk)
        self._delivered = 0
        self.started_at: Optional[float] = None
        self.first_at: Optional[float] = None
        self.last_at: Optional[float] = None

    # ------------------------------------------------------------------ prefill (alone)
    @property
    def prefilled(self) -> int:
        """Prompt tokens whose keys and values are computed (cached ones included)."""
        return len(self.cache.tokens) if not self.held else len(self.prompt_ids)

    @property
    def ready(self) -> bool:
        """True once everything but the prompt's last token is in the cache (the batch feeds that one)."""
        return bool(self.held) or len(self.cache.tokens) >= len(self.prompt_ids) - 1

    def prefill_step(self) -> None:
        """Prefill the next chunk of the prompt into this row's own cache."""
        self._start()
        done = len(self.cache.tokens)
        part = self.prompt_ids[done:min(done + self._chunk, len(self.prompt_ids) - 1)]
        if part:
            try:
                prefill(self._module, self.cache, part, chunk=self._chunk)
            finally:
                self.cache.repair()

    def _start(self) -> None:
        if self.started_at is None:
            self.started_at = time.perf_counter()

    # ------------------------------------------------------------------ decode (in the batch)
    def deliver(self, token: int, now: float) -> List[StreamEvent]:
        """The delta one generated token makes (none for EOS); sets `finish` when the row ends here."""
        self._delivered += 1
        if self.first_at is None:
            self.first_at = now
        events = []
        text = self.reply.feed(token)
        if text is not None:
            self.tokens.append(int(token))
            self.last_at = now
            events.append(StreamEvent(text=text, token=int(token)))
        if self.reply.finish is not None:
            self.finish = self.reply.finish
        elif self._delivered >= self.max_tokens:
            self.finish = "length"
        return events

    def final(self) -> StreamEvent:
        """The last event of a finished row: text held back, finish reason and stats."""
        tail, hit = self.reply.close()
        if hit:
            self.finish = "stop"
        return StreamEvent(text=tail, finish_reason=self.finish, stats=self.stats())

    def stats(self) -> dict:
        """The same statistics the single-stream loop reports (peak memory is the process's)."""
        start = self.started_at if self.started_at is not None else time.perf_counter()
        first = self.first_at if self.first_at is not None else time.perf_counter()
        s = GenerationStats(prompt_tokens=len(self.prompt_ids), cached_prompt_tokens=self.cached_tokens,
                            generation_tokens=len(self.tokens))
        s.ttft_s = max(0.0, first - start)
        if s.ttft_s > 0:
            s.prompt_tps = (len(self.prompt_ids) - self.cached_tokens) / s.ttft_s
        if len(self.tokens) > 1 and self.last_at is not None and self.last_at > first:
            s.generation_tps = (len(self.tokens) - 1) / (self.last_at - first)
        s.peak_memory_bytes = int(mx.get_peak_memory())
        s.kv_cache_bytes = int(self.cache.nbytes)
        return s.to_dict()


class DecodeBatch:
    """The rows of one model decoding together (see the module docstring); not thread-safe."""

    def __init__(self, module):
        self.module = module
        self.rows: List[BatchRow] = []
        self.caches: Optional[List[BatchKVCache]] = None
        self._inputs: Optional[mx.array] = None   # uint32 [B]: every row's next input token (lazy)
        self.forwards = 0          # batched forward passes run
        self.row_steps = 0         # rows over all forwards (row_steps / forwards = mean batch size)
        self.max_rows = 0          # the largest batch one forward ran

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: BatchRow) -> None:
        """Join a row whose prompt (all but its last token) is prefilled; it decodes from the next step."""
        if not row.ready:
            raise RuntimeError("a row joins the batch only once its prompt is prefilled")
        row._start()
        merged = [_batched(c) for c in row.cache.caches]
        if self.caches is None:
            self.caches = merged
        else:
            for mine, theirs in zip(self.caches, merged):
                mine.extend(theirs)
        row.held = list(row.cache.tokens)
        # the batch holds the keys and values now; the row's own cache is emptied until it leaves
        row.cache.caches = row.cache.make() if row.cache.make is not None else [KVCache() for _ in merged]
        row.cache.tokens = []
        last = mx.array([row.prompt_ids[-1]], dtype=mx.uint32)
        self._inputs = last if self._inputs is None else mx.concatenate([self._inputs, last])
        self.rows.append(row)

    def step(self) -> List[Tuple[BatchRow, List[StreamEvent]]]:
        """One forward over every row; each row that got a token with its events. Finished rows leave."""
        if not self.rows:
            return []
        inputs = self._inputs
        logits = self.module(inputs[:, None], cache=self.caches)[:, -1, :]
        picks = []
        for i, row in enumerate(self.rows):
            token = row.sampler(logits[i:i + 1], row.history.array)
            row.history.add(token)
            picks.append(token)
        sampled = picks[0] if len(picks) == 1 else mx.concatenate(picks)
        mx.async_eval(sampled)     # the next step's inputs compute while this step's tokens are handed out
        self._inputs = sampled
        self.forwards += 1
        self.row_steps += len(self.rows)
        self.max_rows = max(self.max_rows, len(self.rows))
        values = inputs.tolist()
        now = time.perf_counter()
        out, leaving = [], []
        for row, value in zip(self.rows, values):
            row.held.append(int(value))
            if row.fresh:               # the prompt's last token went in; its first reply token comes next step
                row.fresh = False
                continue
            out.append((row, row.deliver(int(value), now)))
            if row.finish is not None:
                leaving.append(row)
        if leaving:
            self._leave(leaving)   # first, so their caches (and kv_cache_bytes) are their own again
            for row, events in out:
                if row.finish is not None:
                    events.append(row.final())
        return out

    def remove(self, row: BatchRow) -> None:
        """Take a row out between steps (cancelled); its cache keeps everything it went through."""
        if row in self.rows:
            self._leave([row])

    def clear(self) -> None:
        """Drop every row without keeping their caches (after a failed step)."""
        for row in self.rows:
            row.cache.tokens = []
            row.held = []
        self.rows, self.caches, self._inputs = [], None, None

    def _leave(self, rows: List[BatchRow]) -> None:
        gone = {id(r) for r in rows}
        for i, row in enumerate(self.rows):
            if id(row) in gone:
                row.cache.caches = [c.extract(i) for c in self.caches]
                row.cache.tokens = list(row.held)
                # computed now (after the queued step), so the copy stops referencing the whole batch's arrays
                mx.async_eval([c.state for c in row.cache.caches])
        keep = [i for i, row in enumerate(self.rows) if id(row) not in gone]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.caches, self._inputs = None, None
            return
        for c in self.caches:
            c.filter(keep)
        self._inputs = self._inputs[mx.array(keep)]


def batching_unsupported(module, make_caches: Callable[[], List]) -> Optional[str]:
    """Why `module` cannot decode rows in a DecodeBatch, or None when it can (see the module docstring).

    Runs two short probe prompts alone and batched (a handful of small forwards) and compares the logits.
    """
    caches = make_caches()
    other = sorted({type(c).__name__ + (f"(keep={c.keep})" if isinstance(c, RotatingKVCache) else "")
                    for c in caches if _cannot_batch(c)})
    if other:
        return f"its layers keep {', '.join(other)} caches, which the batched KV caches do not hold"
    try:
        singles, states = [], []
        for ids in PROBE_PROMPTS:
            cache = make_caches()
            module(mx.array(ids[:-1], dtype=mx.uint32)[None], cache=cache)
            states.append([_batched(c) for c in cache])
            singles.append(module(mx.array(ids[-1:], dtype=mx.uint32)[None], cache=cache)[0, -1])
        batch = states[0]
        for mine, theirs in zip(batch, states[1]):
            mine.extend(theirs)
        last = mx.array([ids[-1] for ids in PROBE_PROMPTS], dtype=mx.uint32)
        batched = module(last[:, None], cache=batch)[:, -1]
        ref = np.array(mx.stack(singles).astype(mx.float32))
        got = np.array(batched.astype(mx.float32))
    except Exception as exc:  # an architecture whose forward cannot take per-row offsets
        return f"its forward pass fails on a batched KV cache ({type(exc).__name__}: {exc})"
    scale = float(np.abs(ref).max()) or 1.0
    diff = float(np.abs(got - ref).max())
    if not np.isfinite(diff) or diff > PROBE_TOLERANCE * scale:
        return (f"its batched forward does not reproduce single-request logits (max |Δ| {diff:.3g} of "
                f"{scale:.3g}); its attention or RoPE does not honour per-row offsets")
    return None
