"""Next-token selection: repetition penalty, temperature, top-k, top-p and min-p on MLX arrays, then a draw.

The logits processing follows transformers' processors for `generate(do_sample=True)` exactly and in the
same order (RepetitionPenalty, Temperature, TopK, TopP, MinP) — as MLX ops, or, where the model's kernel
choice offers it, one native op for the last four (on MLX's CPU backend the sort and partition the MLX
version needs cost ~3 ms per token, a fifth of a small model's decode step); temperature 0 means greedy (argmax after
the repetition penalty). Everything is lazy mx ops with no host sync, so the decode loop can pipeline a
step with `mx.async_eval`. A seed gives a private key stream (`mx.random.key(seed)`, split once per
call), independent of MLX's global random state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from mlxedge.errors import GenerationError

__all__ = ["SamplingParams", "Sampler", "make_sampler"]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen; the defaults are greedy decoding with no penalty."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        """Raise GenerationError (one line) for an out-of-range value; return self when all are valid."""
        t, p, k, m, r = self.temperature, self.top_p, self.top_k, self.min_p, self.repetition_penalty
        if not _is_number(t) or not (0.0 <= t < math.inf):
            raise GenerationError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not _is_number(p) or not (0.0 < p <= 1.0):
            raise GenerationError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise GenerationError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        if not _is_number(m) or not (0.0 <= m < 1.0):
            raise GenerationError(f"min_p must be in [0, 1) (0 = off), got {m!r}")
        if not _is_number(r) or not (0.0 < r < math.inf):
            raise GenerationError(f"repetition_penalty must be a finite number > 0 (1 = off), got {r!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2**64):
            raise GenerationError(f"seed must be None or an integer in [0, 2**64), got {self.seed!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _repetition_penalty(x: mx.array, history: mx.array, penalty: float) -> mx.array:
    """transformers' RepetitionPenaltyLogitsProcessor: each token seen in history, once: x<0 → x·p, else x/p.

    Ids outside [0, V) (padding such as -1, or embedding rows beyond the lm_head) are ignored.
    """
    batch, vocab = x.shape
    ids = history.astype(mx.int32)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.shape[0] != batch:
        ids = mx.broadcast_to(ids, (batch, ids.shape[1]))
    ids = mx.where((ids < 0) | (ids >= vocab), vocab, ids)
    seen = mx.put_along_axis(mx.zeros((batch, vocab + 1), dtype=mx.bool_), ids, mx.array(True), axis=-1)
    penalized = mx.where(x < 0, x * penalty, x / penalty)
    return mx.where(seen[:, :vocab], penalized, x)


def _top_k(x: mx.array, k: int) -> mx.array:
    """TopKLogitsWarper: drop every logit strictly below the k-th largest (ties with it are kept)."""
    kth = mx.min(mx.topk(x, k, axis=-1), axis=-1, keepdims=True)
    return mx.where(x < kth, -mx.inf, x)


def _top_p(x: mx.array, top_p: float) -> mx.array:
    """TopPLogitsWarper: in ascending order, drop tokens whose cumulative probability is <= 1 - top_p,
    always keeping the most probable one."""
    vocab = x.shape[-1]
    order = mx.argsort(x, axis=-1)
    ascending = mx.take_along_axis(x, order, axis=-1)
    cumulative = mx.cumsum(mx.softmax(ascending, axis=-1, precise=True), axis=-1)
    drop_sorted = (cumulative <= (1.0 - top_p)) & (mx.arange(vocab) < vocab - 1)
    drop = mx.put_along_axis(mx.zeros(x.shape, dtype=mx.bool_), order, drop_sorted, axis=-1)
    return mx.where(drop, -mx.inf, x)


def _min_p(x: mx.array, min_p: float) -> mx.array:
    """MinPLogitsWarper: drop tokens whose probability is below min_p times the top token's probability."""
    probs = mx.softmax(x, axis=-1, precise=True)
    threshold = min_p * mx.max(probs, axis=-1, keepdims=True)
    return mx.where(probs < threshold, -mx.inf, x)


class Sampler:
    """Callable `sampler(logits [B, V], history [B, T] int32) -> token ids [B] uint32`. Build it with
    make_sampler; one Sampler per generation (it carries the seeded key stream)."""

    def __init__(self, params: SamplingParams, logits_filter=None):
        self.params = params.validate()
        self._key = mx.random.key(params.seed) if params.seed is not None else None
        self._filter = logits_filter  # native temperature/top-k/top-p/min-p in one op (mlxedge.cpu), or None

    @property
    def greedy(self) -> bool:
        return self.params.greedy

    def process(self, logits: mx.array, history: mx.array | None = None) -> mx.array:
        """The float32 logits the draw uses: removed tokens are -inf. Greedy applies only the penalty."""
        if logits.ndim != 2:
            raise GenerationError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
        p = self.params
        x = logits.astype(mx.float32)
        vocab = x.shape[-1]
        if p.repetition_penalty != 1.0 and history is not None and history.size > 0:
            x = _repetition_penalty(x, history, p.repetition_penalty)
        if p.greedy:
            return x
        if self._filter is not None and (p.temperature != 1.0 or 0 < p.top_k < vocab or p.top_p < 1.0 or p.min_p > 0):
            return self._filter(x, temperature=p.temperature, top_k=p.top_k if 0 < p.top_k < vocab else 0,
                                top_p=p.top_p, min_p=p.min_p)
        if p.temperature != 1.0:
            x = x / p.temperature
        if 0 < p.top_k < vocab:
            x = _top_k(x, p.top_k)
        if p.top_p < 1.0:
            x = _top_p(x, p.top_p)
        if p.min_p > 0.0:
            x = _min_p(x, p.min_p)
        return x

    def next_key(self) -> mx.array | None:
        """The key for this draw (advancing the seeded stream), or None to use MLX's global state."""
        if self._key is None:
            return None
        pair = mx.random.split(self._key)
        self._key = pair[0]
        return pair[1]

    def __call__(self, logits: mx.array, history: mx.array | None = None) -> mx.array:
        x = self.process(logits, history)
        if self.params.greedy:
            return mx.argmax(x, axis=-1).astype(mx.uint32)
        return mx.random.categorical(x, axis=-1, key=self.next_key()).astype(mx.uint32)


def make_sampler(params: SamplingParams | None = None, logits_filter=None) -> Sampler:
    """A fresh Sampler for one generation (validates params; None means greedy). logits_filter: a native
    callable with the filters' semantics (KernelChoice.logits_filter()), used in place of the MLX ops."""
    return Sampler(params if params is not None else SamplingParams(), logits_filter)
