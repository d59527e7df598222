"""`Model`: a loaded model with its tokenizer; generate, stream and logits for every front-end."""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np

from . import memory
from .errors import GenerationError
from .generate.loop import generate_stream
from .generate.sampler import SamplingParams
from .generate.stats import GenerationResult, StreamEvent
from .kernels import KernelChoice
from .loading import LoadedModel
from .quant.binding import bind_kernels
from .tokenizer import Tokenizer


class Model:
    def __init__(self, loaded: LoadedModel, load_tokenizer: Callable, chat_template: Optional[str], info: dict,
                 context_length: int, kv_overflow: str = "error", wired_bytes: int = 0, kernels=None):
        self._loaded = loaded
        self.context_length = context_length
        self._kv_overflow = kv_overflow
        self._wired_bytes = wired_bytes
        self._load_tokenizer = load_tokenizer
        self._chat_template = chat_template
        self._tokenizer: Optional[Tokenizer] = None
        self.info = info
        self.use_kernels(kernels)

    def use_kernels(self, choice: Optional[KernelChoice] = None) -> dict:
        """Bind every matmul layer to `choice`'s kernels (default: MLXEDGE_KERNELS, read now); info["kernels"]."""
        self.kernels = choice if choice is not None else KernelChoice()
        report = bind_kernels(self.module, self.kernels)
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

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Full-sequence logits [len(token_ids), vocab] as float32, one forward pass without a cache."""
        ids = mx.array([int(t) for t in token_ids], dtype=mx.uint32)  # accepts numpy ints too
        if ids.size == 0:
            raise GenerationError("logits() needs at least one token id.")
        out = self.module(ids[None])[0].astype(mx.float32)
        return np.array(out)

    def stream(self, prompt_or_messages, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: Optional[int] = None,
               stop: Optional[Sequence[str]] = None, cancel: Optional[Callable[[], bool]] = None,
               raw: bool = False) -> Iterator[StreamEvent]:
        """Text deltas as they are generated; the last event carries finish_reason and stats.

        A string prompt goes through the chat template when the model has one (raw=True sends it as is);
        `cancel` is polled after every token and stops the stream with finish_reason "cancelled".
        """
        sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                  repetition_penalty=repetition_penalty, seed=seed)
        prompt_ids = self.tokenizer.prompt_ids(prompt_or_messages, raw=raw)
        # checked now, not at the first next(): a prompt past the planned context fails at the call
        decision = memory.check_generation_context(len(prompt_ids), max_tokens, self.context_length,
                                                   rotating=self._kv_overflow == "rotate")
        window = decision.window if decision.mode == "rotating" else None
        return self._stream_within_plan(prompt_ids, sampling=sampling, max_tokens=max_tokens, stop=stop,
                                        cancel=cancel, max_kv_size=window)

    def _stream_within_plan(self, prompt_ids, **kwargs) -> Iterator[StreamEvent]:
        with memory.wired_limit(self._wired_bytes):  # macOS: keep the planned bytes resident; no-op elsewhere
            yield from generate_stream(self.module, self.tokenizer.hf, prompt_ids, eos_ids=self.eos_ids(), **kwargs)

    def generate(self, prompt_or_messages, **kwargs) -> GenerationResult:
        """Generate to completion; same arguments as `stream`."""
        text, tokens = [], []
        for event in self.stream(prompt_or_messages, **kwargs):
            text.append(event.text)
            if event.token is not None:
                tokens.append(event.token)
            if event.finish_reason is not None:
                return GenerationResult(text="".join(text), tokens=tokens, finish_reason=event.finish_reason,
                                        stats=event.stats)
        raise AssertionError("stream ended without a final event")  # generate_stream always ends with one
