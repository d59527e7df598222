"""Sessions: a conversation that keeps its KV cache between turns, so each turn prefills only what is new.

    s = model.session(system="Be brief.")
    r = s.send("Hi!", max_tokens=64)          # a GenerationResult; r.stats["cached_prompt_tokens"]
    for ev in s.stream("And then?"): ...       # StreamEvents, as Model.stream
    s.messages; s.reset(); s.save("chat.safetensors"); model.load_session("chat.safetensors")

A turn renders the whole conversation (system, history, the new user message) with the chat template and
hands the token ids to the generation loop with the session's PromptCache: the longest common prefix with
what the cache holds is kept, the rest trimmed and prefilled. So a template that renders earlier turns
differently once a new one follows (e.g. dropping the reasoning of earlier replies) still gives exactly the
reply `model.generate(s.messages + [new message])` gives — only the reused prefix shrinks.

A turn that is cancelled (the cancel hook, or a stream abandoned before its last event) or that fails leaves
`messages` as before the turn; the cache keeps only the turn's prompt (a retry of the same message reuses
it), never the partial reply.
Replies cut by max_tokens or a stop string join the history as they were shown.

Session files are PromptCache files of kind "session" whose metadata also holds the system prompt, the
history and the cache settings; they load only into a model with the same fingerprint.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterator, List, Optional, Sequence

from ..arguments import check_cancel, check_max_tokens, check_num_draft_tokens, check_stop, checked_call
from ..errors import GenerationError
from .guards import check_generation_context
from .kv_cache import describe
from .prompt_cache import PromptCache, common_prefix
from .stats import GenerationResult, StreamEvent

SESSION_KIND = "session"


def collect(events: Iterator[StreamEvent]) -> GenerationResult:
    """Drain a stream into a GenerationResult."""
    text, tokens = [], []
    for event in events:
        text.append(event.text)
        if event.token is not None:
            tokens.append(event.token)
        if event.finish_reason is not None:
            return GenerationResult(text="".join(text), tokens=tokens, finish_reason=event.finish_reason,
                                    stats=event.stats)
    raise AssertionError("stream ended without a final event")  # generate_stream always ends with one


def _user_message(message) -> dict:
    if isinstance(message, str):
        return {"role": "user", "content": message}
    if isinstance(message, dict) and isinstance(message.get("content"), str) and isinstance(message.get("role"), str):
        return dict(message)
    raise GenerationError(f"a session message is a string or a {{'role': ..., 'content': str}} dict, "
                          f"got {type(message).__name__}.")


class Session:
    """One conversation with one model; not thread-safe (one turn at a time)."""

    def __init__(self, model, system: Optional[str] = None, kv_bits: Optional[int] = None,
                 max_kv_size: Optional[int] = None, _cache: Optional[PromptCache] = None):
        if not model.tokenizer.chat_template:
            raise GenerationError("sessions need a chat template and this model has none; "
                                  "use model.generate with a plain prompt instead.")
        if system is not None and not isinstance(system, str):
            raise GenerationError(f"system must be a string or None, got {type(system).__name__}.")
        self.model = model
        self.system = system
        self._history: List[dict] = []
        if kv_bits is None:
            kv_bits = model._kv_bits  # as loaded
        if max_kv_size is None and model._kv_overflow == "rotate":
            max_kv_size = model.context_length  # a conversation grows: keep a window from the start
        self._settings = {"kv_bits": kv_bits, "max_kv_size": max_kv_size}
        self._cache = _cache if _cache is not None else model.new_cache(max_kv_size=max_kv_size, kv_bits=kv_bits)
        self._drafters: dict = {}
        self._busy = False
        self.last_stats: Optional[dict] = None

    # ------------------------------------------------------------------ conversation

    @property
    def messages(self) -> List[dict]:
        """The conversation so far, system prompt first (a copy: editing it changes nothing)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + copy.deepcopy(self._history)

    @property
    def cached_tokens(self) -> int:
        """How many tokens the KV cache holds now."""
        return len(self._cache.tokens)

    def cache_info(self) -> List[dict]:
        """Per layer: cache kind, tokens that went through, positions held, window or bits (plain dicts)."""
        return describe(self._cache.caches)

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays; its cached tokens are reused by the next turn)."""
        self._history = []

    @checked_call
    def send(self, message, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             min_p: float = 0.0, repetition_penalty: float = 1.0, seed: Optional[int] = None,
             stop: Optional[Sequence[str]] = None, cancel: Optional[Callable[[], bool]] = None,
             draft=None, num_draft_tokens: int = 3) -> GenerationResult:
        """One turn: the reply as a GenerationResult (the arguments of `stream`)."""
        return collect(self.stream(message, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                   min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop,
                                   cancel=cancel, draft=draft, num_draft_tokens=num_draft_tokens))

    @checked_call
    def stream(self, message, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               min_p: float = 0.0, repetition_penalty: float = 1.0, seed: Optional[int] = None,
               stop: Optional[Sequence[str]] = None, cancel: Optional[Callable[[], bool]] = None,
               draft=None, num_draft_tokens: int = 3) -> Iterator[StreamEvent]:
        """One turn, streamed: text deltas, then a last event with finish_reason and stats.

        Arguments as `Model.stream` (every bad one raises GenerationError); the history gains the message and
        the reply when the last event is reached with a finish reason other than "cancelled".
        """
        if self._busy:
            raise GenerationError("this session is already generating a reply; finish or close that stream first.")
        user = _user_message(message)
        model = self.model
        sampling = model._sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed)
        max_tokens, stop, cancel = check_max_tokens(max_tokens), check_stop(stop), check_cancel(cancel)
        num_draft_tokens = check_num_draft_tokens(num_draft_tokens)
        prompt_ids = model.tokenizer.prompt_ids(self.messages + [user])
        check_generation_context(len(prompt_ids), max_tokens, model.context_length,
                                 rotating=self._settings["max_kv_size"] is not None)
        drafter = self._drafter(draft)
        events = model._stream_with_cache(prompt_ids, self._cache, sampling=sampling, max_tokens=max_tokens,
                                          stop=stop, cancel=cancel, drafter=drafter,
                                          num_draft_tokens=num_draft_tokens)
        return self._turn(user, prompt_ids, events)

    def _turn(self, user: dict, prompt_ids: list, events: Iterator[StreamEvent]) -> Iterator[StreamEvent]:
        self._busy = True
        done = False
        parts: List[str] = []
        try:
            for event in events:
                parts.append(event.text)
                if event.finish_reason is not None:
                    self.last_stats = event.stats
                    if event.finish_reason != "cancelled":
                        self._history += [user, {"role": "assistant", "content": "".join(parts)}]
                        done = True
                yield event
        finally:
            events.close()
            self._busy = False
            if not done:  # cancelled, abandoned or failed: drop the partial reply, keep the prompt's prefill
                self._cache.trim_to(common_prefix(self._cache.tokens, prompt_ids))

    def _drafter(self, draft):
        if draft is None:
            return None
        from .speculative import make_drafter

        key = id(draft) if not isinstance(draft, str) else draft
        if key not in self._drafters:  # a draft model keeps its own cache across turns
            self._drafters[key] = make_drafter(self.model, draft)
        return self._drafters[key]

    # ------------------------------------------------------------------ files

    def save(self, path) -> None:
        """Write the conversation and its KV cache to `path` (.safetensors) for `model.load_session`."""
        extra = {"system": self.system, "history": self._history, **self._settings}
        self._cache.save(path, fingerprint=self.model.fingerprint, kind=SESSION_KIND, extra=extra)

    @classmethod
    def load(cls, model, path) -> "Session":
        cache, extra = PromptCache.load(path, fingerprint=model.fingerprint, kind=SESSION_KIND)
        settings = {"kv_bits": extra.get("kv_bits"), "max_kv_size": extra.get("max_kv_size")}
        cache.make = lambda: model.new_cache(**settings).caches
        session = cls(model, system=extra.get("system"), _cache=cache, **settings)
        session._history = [_user_message(m) for m in extra.get("history", [])]
        return session
