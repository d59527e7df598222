"""`Model`: a loaded model with its tokenizer; generate, stream and logits for every front-end."""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np

from .arguments import (check_cancel, check_flag, check_ids, check_max_tokens, check_num_draft_tokens,
                        check_stop, checked_call)
from .errors import GenerationError
from .generate.guards import check_generation_context, wired_limit
from .generate.kv_cache import validate_kv_bits
from .generate.loop import generate_stream, new_prompt_cache
from .generate.prompt_cache import PromptCache, model_fingerprint
from .generate.sampler import SamplingParams
from .generate.stats import GenerationResult, StreamEvent
from .kernels import KernelChoice
from .loading import LoadedModel
from .quant.binding import bind_kernels
from .tokenizer import Tokenizer


class Model:
    def __init__(self, loaded: LoadedModel, load_tokenizer: Callable, chat_template: Optional[str], info: dict,
                 context_length: int, kv_overflow: str = "error", wired_bytes: int = 0, kernels=None,
                 kv_bits: Optional[int] = None):
        self._loaded = loaded
        self._kv_bits = validate_kv_bits(kv_bits)
        self._fingerprint: Optional[str] = None
        self.context_length = context_length
        self._kv_overflow = kv_overflow
        self._wired_bytes = wired_bytes
        self._load_tokenizer = load_tokenizer
        self._chat_template = chat_template
        self._tokenizer: Optional[Tokenizer] = None
        self.info = info
        self._batching_verdict: Optional[tuple] = None  # (kernel choice, reason or None), see batching_unsupported
        self.use_kernels(kernels)

    def use_kernels(self, choice: Optional[KernelChoice] = None) -> dict:
        """Bind every matmul layer to `choice`'s kernels (default: MLXEDGE_KERNELS, read now); info["kernels"]."""
        self.kernels = choice if choice is not None else KernelChoice()
        report = bind_kernels(self.module, self.kernels)
        self._logits_filter = self.kernels.logits_filter() if hasattr(self.kernels, "logits_filter") else None
        if self._logits_filter is not None:
            report["sampling"] = {self.kernels.candidate: 1}
        self.info["kernels"] = self.kernels.summary(report)
        self.info["fused_mlps"] = sum(report.get("gate_up_fused", {}).values())
        return self.info["kernels"]

    @property
    def module(self):
        """The underlying mlx-lm nn.Module."""
        return self._loaded.model

    @property
    def config(self) -> dict:
        return self._loaded.config

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self._load_tokenizer(), self._chat_template)
        return self._tokenizer

    def eos_ids(self) -> list:
        ids = set()
        for value in (self.config.get("eos_token_id"), self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return sorted(ids)

    @checked_call
    def logits(self, token_ids: Sequence[int], start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """Logits [stop - start, vocab] as float32 of rows start..stop-1 (default: every row), from one forward
        pass over all of `token_ids` without a cache; only the asked rows leave the device."""
        ids = check_ids(token_ids, self.vocab_size)  # accepts numpy ints too
        stop = len(ids) if stop is None else stop
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= len(ids)):
            raise GenerationError(f"logits rows start={start!r}, stop={stop!r} must satisfy 0 <= start < stop <= "
                                  f"{len(ids)} (the number of token ids).")
        out = self.module(mx.array(ids, dtype=mx.uint32)[None])[0, start:stop].astype(mx.float32)
        return np.array(out)

    @checked_call
    def stream(self, prompt_or_messages=None, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: Optional[int] = None,
               stop: Optional[Sequence[str]] = None, cancel: Optional[Callable[[], bool]] = None,
               raw: bool = False, draft=None, num_draft_tokens: int = 3, kv_bits: Optional[int] = None,
               prompt_cache=None, cache: Optional[PromptCache] = None, ids: Optional[Sequence[int]] = None,
               ignore_eos: bool = False) -> Iterator[StreamEvent]:
        """Text deltas as they are generated; the last event carries finish_reason and stats.

        A string prompt goes through the chat template when the model has one (raw=True sends it as is);
        `ids` instead of a prompt: exact prompt token ids, no template and no tokenizer on the way in.
        ignore_eos=True: end-of-sequence tokens do not end the reply (it runs to max_tokens or a stop string).
        `cancel` is polled after every token and stops the stream with finish_reason "cancelled".
        draft: a loaded Model sharing this tokenizer, "prompt-lookup" (n-gram drafts from the context) or
        "auto" (prompt lookup, switched off when it does not pay) for speculative decoding, proposing
        `num_draft_tokens` per step. kv_bits: 4 or 8 for a quantized KV cache (default: as loaded).
        prompt_cache: a file written by `cache_prompt`; the prompt continues its cached prefix.
        cache: a PromptCache from `new_cache()` to generate into: what it shares with the prompt (longest
        common token prefix) is reused, and it is left holding prompt and reply (a shared prefix cache).
        Every bad argument raises GenerationError (an MlxedgeError), an unknown keyword included.
        """
        sampling = self._sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed)
        max_tokens, stop = check_max_tokens(max_tokens), check_stop(stop)
        cancel, raw = check_cancel(cancel), check_flag("raw", raw)
        ignore_eos, num_draft_tokens = check_flag("ignore_eos", ignore_eos), check_num_draft_tokens(num_draft_tokens)
        if (ids is None) == (prompt_or_messages is None):
            raise GenerationError("give a prompt (text or messages) or ids (prompt token ids)"
                                  + (", not both." if ids is not None else "."))
        if cache is not None and not isinstance(cache, PromptCache):
            raise GenerationError(f"cache must be a PromptCache from model.new_cache(), got {type(cache).__name__}.")
        if cache is not None and prompt_cache is not None:
            raise GenerationError("give either cache or prompt_cache, not both.")
        if ids is not None:
            if prompt_cache is not None:
                raise GenerationError("prompt_cache continues a text prompt; it cannot be combined with ids.")
            prompt_ids = check_ids(ids, self.vocab_size)
        else:
            if prompt_cache is not None:
                from .generate.prompt_cache_files import continue_prompt

                cache, prompt_or_messages, raw = continue_prompt(self, prompt_cache, prompt_or_messages, raw)
            prompt_ids = self.tokenizer.prompt_ids(prompt_or_messages, raw=raw)
        # checked now, not at the first next(): a prompt past the planned context fails at the call
        decision = check_generation_context(len(prompt_ids), max_tokens, self.context_length,
                                            rotating=self._kv_overflow == "rotate")
        if cache is None:
            window = decision.window if decision.mode == "rotating" else None
            cache = self.new_cache(max_kv_size=window, kv_bits=kv_bits)
        return self._stream_with_cache(prompt_ids, cache, sampling=sampling, max_tokens=max_tokens, stop=stop,
                                       cancel=cancel, draft=draft, num_draft_tokens=num_draft_tokens,
                                       ignore_eos=ignore_eos)

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding: token ids run from 0 to vocab_size - 1."""
        size = self.config.get("vocab_size") or (self.config.get("text_config") or {}).get("vocab_size")
        return int(size) if size else self.tokenizer.vocab_size

    @staticmethod
    def _sampling(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, seed=None):
        return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                              repetition_penalty=repetition_penalty, seed=seed).validate()

    def _stream_with_cache(self, prompt_ids, cache, *, draft=None, num_draft_tokens: int = 3,
                           drafter=None, **kwargs) -> Iterator[StreamEvent]:
        """Generate from `prompt_ids` into a PromptCache the caller keeps (a session, a prompt-cache file)."""
        if drafter is None and draft is not None:
            from .generate.speculative import make_drafter

            drafter = make_drafter(self, draft)
        if drafter is not None:
            from .generate.speculative import check_speculation

            check_speculation(cache, num_draft_tokens)
        auto = bool(drafter is not None and drafter.auto)
        return self._stream_within_plan(prompt_ids, cache=cache, drafter=drafter,
                                        num_draft_tokens=num_draft_tokens, draft_auto=auto, **kwargs)

    def _stream_within_plan(self, prompt_ids, ignore_eos: bool = False, **kwargs) -> Iterator[StreamEvent]:
        eos_ids = [] if ignore_eos else self.eos_ids()
        with wired_limit(self._wired_bytes):  # macOS: keep the planned bytes resident; no-op elsewhere
            yield from generate_stream(self.module, self.tokenizer.hf, prompt_ids, eos_ids=eos_ids,
                                       logits_filter=self._logits_filter, **kwargs)

    # ------------------------------------------------------------------ continuous batching

    def batching_unsupported(self) -> Optional[str]:
        """Why requests of this model cannot be decoded together in one batch (None when they can).

        Checked once per kernel choice (a short probe; see generate.batch.batching_unsupported).
        """
        if self._kv_overflow == "rotate":
            return "it was loaded with a rotating KV window (kv_overflow='rotate')"
        if self._kv_bits is not None:
            return f"its KV cache is quantized (kv_bits={self._kv_bits})"
        if self._batching_verdict is None or self._batching_verdict[0] is not self.kernels:
            from .generate.batch import batching_unsupported

            reason = batching_unsupported(self.module, lambda: self.new_cache().caches)
            self._batching_verdict = (self.kernels, reason)
        return self._batching_verdict[1]

    def new_batch(self):
        """An empty DecodeBatch for this model; UnsupportedError when `batching_unsupported()` says why."""
        reason = self.batching_unsupported()
        if reason is not None:
            from .errors import UnsupportedError

            raise UnsupportedError(f"this model cannot decode requests in a batch: {reason}.")
        from .generate.batch import DecodeBatch

        return DecodeBatch(self.module)

    def batch_row(self, prompt_or_messages, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                  top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: Optional[int] = None,
                  stop: Optional[Sequence[str]] = None, raw: bool = False, cache: Optional[PromptCache] = None):
        """A request ready to join a DecodeBatch of this model: same arguments and checks as `stream`.

        cache: a PromptCache from `new_cache()` whose common prefix with the prompt is reused (it ends up
        holding prompt and reply once the row leaves its batch).
        """
        from .generate.batch import BatchRow
        from .generate.reply import Reply

        sampling = self._sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed)
        prompt_ids = self.tokenizer.prompt_ids(prompt_or_messages, raw=raw)
        check_generation_context(len(prompt_ids), max_tokens, self.context_length)
        if max_tokens < 1:
            raise GenerationError(f"max_tokens={max_tokens} must be >= 1 in a batch.")
        if len(prompt_ids) == 0:
            raise GenerationError("the prompt is empty; give at least one token of text.")
        return BatchRow(prompt_ids, cache if cache is not None else self.new_cache(), sampling,
                        Reply(self.tokenizer.hf, self.eos_ids(), stop), module=self.module, max_tokens=max_tokens,
                        logits_filter=self._logits_filter)

    # ------------------------------------------------------------------ caches and sessions

    def new_cache(self, max_kv_size: Optional[int] = None, kv_bits: Optional[int] = None) -> PromptCache:
        """An empty KV cache for this model (rotating when max_kv_size is set; quantized with kv_bits)."""
        kv_bits = self._kv_bits if kv_bits is None else kv_bits
        return new_prompt_cache(self.module, max_kv_size=max_kv_size, kv_bits=kv_bits,
                                model_type=self.config.get("model_type"))

    @property
    def fingerprint(self) -> str:
        """Identifies these weights at this precision; cache and session files carry it (see prompt_cache)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.module, self.config)
        return self._fingerprint

    @checked_call
    def session(self, system: Optional[str] = None, kv_bits: Optional[int] = None) -> "Session":
        """A conversation that keeps its KV cache between turns (see mlxedge.generate.session)."""
        from .generate.session import Session

        return Session(self, system=system, kv_bits=kv_bits)

    def load_session(self, path) -> "Session":
        """A session saved with `Session.save`, into this model (SourceError if it was saved with another)."""
        from .generate.session import Session

        return Session.load(self, path)

    @checked_call
    def cache_prompt(self, prompt: str, path, system: Optional[str] = None, raw: bool = False,
                     kv_bits: Optional[int] = None) -> dict:
        """Prefill `prompt` and save the cache to `path` for `generate(..., prompt_cache=path)`."""
        from .generate.prompt_cache_files import cache_prompt

        return cache_prompt(self, prompt, path, system=system, raw=raw, kv_bits=kv_bits)

    @checked_call
    def generate(self, prompt_or_messages=None, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: Optional[int] = None,
                 stop: Optional[Sequence[str]] = None, cancel: Optional[Callable[[], bool]] = None,
                 raw: bool = False, draft=None, num_draft_tokens: int = 3, kv_bits: Optional[int] = None,
                 prompt_cache=None, cache: Optional[PromptCache] = None, ids: Optional[Sequence[int]] = None,
                 ignore_eos: bool = False) -> GenerationResult:
        """Generate to completion: the GenerationResult of `stream` with the same arguments."""
        from .generate.session import collect

        return collect(self.stream(prompt_or_messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                   top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                                   stop=stop, cancel=cancel, raw=raw, draft=draft, num_draft_tokens=num_draft_tokens,
                                   kv_bits=kv_bits, prompt_cache=prompt_cache, cache=cache, ids=ids,
                                   ignore_eos=ignore_eos))
