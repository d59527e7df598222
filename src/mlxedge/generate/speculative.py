"""Speculative decoding: a drafter proposes k tokens, the model checks them all in one forward pass.

Drafters: `ModelDrafter` (a smaller or quantized model sharing the tokenizer, with its own PromptCache) and
`PromptLookupDrafter` (n-gram lookup in the context so far: the tokens that followed the latest earlier
occurrence of the context's last n tokens, n = 3, 2, 1; no second model).

Each step feeds [pending token, d1..dk] to the model (k+1 positions of logits, processed by the same
Sampler as plain decoding, each position with its own repetition-penalty history) and accepts a prefix:
- greedy: d_i is accepted while it equals the argmax at its position; the argmax after the accepted prefix
  is the step's own token — the output is plain greedy decoding's, token for token;
- sampling: Leviathan et al. (2023) / Chen et al. (2023): d_i is accepted with probability
  min(1, p_i(d_i) / q_i(d_i)); at the first rejection a token is drawn from norm(max(0, p_i - q_i)); after k
  acceptances one more from p_{k+1}. The output follows the model's own distribution p exactly. A
  deterministic drafter (prompt lookup) has q_i = one-hot(d_i).
Rejected positions are trimmed from the model's KV cache, so the cache must be trimmable: rotating windows
and sliding-window layers (gemma3) are refused.

Auto mode (`draft="auto"`): the first steps decode plainly and then speculatively, each timed; when the
speculative rate is below the plain one, speculation is turned off for the rest of the call
(stats["draft_disabled"] = True).
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, List, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import RotatingKVCache

from ..errors import GenerationError
from .loop import Cancelled, PREFILL_CHUNK, new_prompt_cache, prefill
from .prompt_cache import PromptCache
from .sampler import SamplingParams, make_sampler

PROMPT_LOOKUP = "prompt-lookup"
AUTO = "auto"
MAX_DRAFT_TOKENS = 16
AUTO_PLAIN_TOKENS = 6      # plain tokens timed first (after the first, which carries the prefill)
AUTO_SPECULATIVE_STEPS = 4  # then this many speculative steps


class Drafter:
    auto = False

    def propose(self, context: List[int], k: int, sampling: SamplingParams, rng) -> tuple:
        """Up to k draft tokens continuing `context`, and their draft distributions ([n, V] numpy, or None
        for a deterministic drafter)."""
        raise NotImplementedError


class PromptLookupDrafter(Drafter):
    def __init__(self, max_ngram: int = 3, auto: bool = False):
        self.max_ngram = max_ngram
        self.auto = auto

    def propose(self, context, k, sampling, rng):
        n_ctx = len(context)
        for n in range(min(self.max_ngram, n_ctx - 1), 0, -1):
            tail = context[n_ctx - n:]
            first = tail[0]
            for start in range(n_ctx - n - 1, -1, -1):
                if context[start] == first and context[start:start + n] == tail:
                    follow = context[start + n:start + n + k]
                    if follow:
                        return list(follow), None
        return [], None


class ModelDrafter(Drafter):
    def __init__(self, draft_model):
        self.model = draft_model
        self.cache: PromptCache = new_prompt_cache(draft_model.module, model_type=draft_model.config.get("model_type"))

    def propose(self, context, k, sampling, rng):
        module = self.model.module
        cached = self.cache.reuse(context)
        prefill(module, self.cache, context[cached:-1], PREFILL_CHUNK)
        sampler = make_sampler(sampling)
        feed = int(context[-1])
        drafts, dists = [], []
        for i in range(k):
            logits = module(mx.array([[feed]], dtype=mx.uint32), cache=self.cache.caches)[:, -1, :]
            self.cache.tokens.append(feed)
            history = mx.array([list(context) + drafts], dtype=mx.int32)
            x = sampler.process(logits, history)
            if sampling.greedy:
                feed = int(mx.argmax(x, axis=-1).item())
            else:
                q = _probabilities(x)
                feed = int(rng.choice(q.size, p=q))
                dists.append(q)
            drafts.append(feed)
        return drafts, (np.stack(dists) if dists else None)


def make_drafter(model, draft) -> Drafter:
    """A Drafter for `model` from the `draft` argument: a Model, "prompt-lookup" or "auto"."""
    if isinstance(draft, str):
        if draft == PROMPT_LOOKUP:
            return PromptLookupDrafter()
        if draft == AUTO:
            return PromptLookupDrafter(auto=True)
        raise GenerationError(f"draft must be a loaded model, {PROMPT_LOOKUP!r} or {AUTO!r}, got {draft!r}.")
    if not hasattr(draft, "tokenizer") or not hasattr(draft, "module"):
        raise GenerationError(f"draft must be a loaded mlxedge Model, {PROMPT_LOOKUP!r} or {AUTO!r}, "
                              f"got {type(draft).__name__}.")
    if draft is model:
        raise GenerationError("the draft model is the model itself; load a smaller or quantized copy as the draft.")
    mine, theirs = model.tokenizer.hf, draft.tokenizer.hf
    if len(mine) != len(theirs) or mine.get_vocab() != theirs.get_vocab():
        raise GenerationError("the draft model's tokenizer differs from the model's; a draft must share the "
                              "tokenizer (same vocabulary and ids).")
    return ModelDrafter(draft)


def _probabilities(processed: mx.array, vocab: Optional[int] = None) -> np.ndarray:
    """float64 probabilities of one row of processed logits (removed tokens are -inf), padded/cut to vocab."""
    p = np.array(mx.softmax(processed.astype(mx.float32), axis=-1, precise=True)[0], dtype=np.float64)
    if vocab is not None and p.size != vocab:
        p = np.pad(p, (0, vocab - p.size)) if p.size < vocab else p[:vocab]
    return p / p.sum()


def check_speculation(cache: PromptCache, num_draft_tokens) -> None:
    """Refuse, before anything runs, what speculative decoding cannot do (GenerationError, one line)."""
    if not isinstance(num_draft_tokens, int) or isinstance(num_draft_tokens, bool) \
            or not 1 <= num_draft_tokens <= MAX_DRAFT_TOKENS:
        raise GenerationError(f"num_draft_tokens must be an integer from 1 to {MAX_DRAFT_TOKENS}, "
                              f"got {num_draft_tokens!r}.")
    if any(isinstance(c, RotatingKVCache) for c in cache.caches):
        raise GenerationError("speculative decoding needs a KV cache it can roll back, and this one keeps a "
                              "rotating window (a rotating context, or sliding-window layers); "
                              "generate without draft.")


def _accept(rows: List[mx.array], drafts: List[int], q, sampling: SamplingParams, rng, vocab: int) -> tuple:
    """(accepted count, the step's own token) from the model's processed logits at k+1 positions."""
    if sampling.greedy:
        best = [int(t) for t in mx.argmax(mx.concatenate(rows, axis=0), axis=-1).tolist()]
        m = 0
        while m < len(drafts) and drafts[m] == best[m]:
            m += 1
        return m, best[m]
    for i, d in enumerate(drafts):
        p = _probabilities(rows[i], vocab)
        q_d = 1.0 if q is None else float(q[i][d])
        if q_d > 0 and rng.random() < min(1.0, p[d] / q_d):
            continue
        if q is None:
            residual = p.copy()
            residual[d] = 0.0
        else:
            residual = np.maximum(p - q[i], 0.0)
        total = residual.sum()
        residual = residual / total if total > 0 else p
        return i, int(rng.choice(residual.size, p=residual))
    p = _probabilities(rows[len(drafts)], vocab)
    return len(drafts), int(rng.choice(p.size, p=p))


def speculative_tokens(model, cache: PromptCache, prompt_ids: Sequence[int], sampling: SamplingParams,
                       drafter: Drafter, stats, *, num_draft_tokens: int = 3, auto: bool = False,
                       prefill_chunk: int = PREFILL_CHUNK, max_tokens: int = 256,
                       cancel: Optional[Callable[[], bool]] = None) -> Iterator[int]:
    """Token ids like loop.decode_tokens, k drafts verified per forward pass; counts go to `stats`."""
    check_speculation(cache, num_draft_tokens)
    sampler = make_sampler(sampling)
    rng = np.random.default_rng(sampling.seed)
    penalty = sampling.repetition_penalty != 1.0
    try:
        start = len(cache.tokens)
        prefill(model, cache, prompt_ids[start:-1], prefill_chunk, cancel)
        if max_tokens == 0:
            return
        context = [int(t) for t in prompt_ids]  # committed tokens; the last one is not in the cache yet
        generated = 0
        mode = "probe-plain" if auto else "speculate"
        timings = {"plain": [0.0, 0], "speculate": [0.0, 0]}  # seconds, tokens
        probe_steps = 0
        while generated < max_tokens:
            if mode == "probe-plain" and timings["plain"][1] >= AUTO_PLAIN_TOKENS:
                mode = "probe-speculate"
            if mode == "probe-speculate" and probe_steps >= AUTO_SPECULATIVE_STEPS:
                (tp, n_plain), (ts, n_spec) = timings["plain"], timings["speculate"]
                faster = n_spec * tp >= n_plain * ts  # tokens per second, cross-multiplied
                mode = "speculate" if faster else "plain"
                stats.draft_disabled = not faster
            speculate = mode in ("speculate", "probe-speculate")
            began = time.perf_counter()
            k = min(num_draft_tokens, max_tokens - generated - 1) if speculate else 0
            drafts, q = drafter.propose(context, k, sampling, rng) if k > 0 else ([], None)
            inputs = [context[-1]] + drafts
            logits = model(mx.array([inputs], dtype=mx.uint32), cache=cache.caches)[0]
            cache.tokens.append(context[-1])
            cache.tokens.extend(drafts)
            vocab = logits.shape[-1]
            rows = []
            for i in range(len(inputs)):
                history = mx.array([context + drafts[:i]] if penalty else [[]], dtype=mx.int32)
                rows.append(sampler.process(logits[i:i + 1], history))
            if q is not None and q.shape[1] != vocab:
                q = np.pad(q, ((0, 0), (0, vocab - q.shape[1]))) if q.shape[1] < vocab else q[:, :vocab]
            accepted, token = _accept(rows, drafts, q, sampling, rng, vocab)
            rejected = len(drafts) - accepted
            if rejected:
                cache.trim_to(len(cache.tokens) - rejected)
            stats.draft_proposed += len(drafts)
            stats.draft_accepted += accepted
            out = drafts[:accepted] + [token]
            elapsed = time.perf_counter() - began
            if generated > 0 and mode.startswith("probe"):  # the first step carries the prefill's last token
                slot = timings["speculate" if speculate else "plain"]
                slot[0] += elapsed
                slot[1] += len(out)
                probe_steps += 1 if speculate else 0
            for t in out:
                context.append(t)
                generated += 1
                yield t
                if generated >= max_tokens:
                    break
    finally:
        cache.repair()
