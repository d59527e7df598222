"""A generation request, the events it produces, and the handle a front-end holds while it runs.

The worker thread pushes events into the handle; the consumer reads them from any thread (blocking
iterator) or from an asyncio loop (`async for`). `cancel()` is safe from any thread and takes effect at
the next token boundary.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, List, Optional, Union

from .errors import BadRequestError

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


@dataclass
class Request:
    """What to generate. `prompt` is a string or a list of chat messages; raw=True skips the chat template."""

    model: str
    prompt: Union[str, List[dict]]
    raw: bool = False
    max_tokens: int = 256
    sampling: dict = field(default_factory=dict)
    stop: List[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    keep_alive: Optional[float] = None   # seconds the model stays resident after this request (None: default)

    def validate(self) -> "Request":
        if not isinstance(self.prompt, (str, list)):
            raise BadRequestError("prompt must be a string or a list of messages")
        if isinstance(self.prompt, list) and not self.prompt:
            raise BadRequestError("messages must not be empty")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise BadRequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        unknown = set(self.sampling) - set(SAMPLING_KEYS)
        if unknown:
            raise BadRequestError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= 20:
            raise BadRequestError(f"top_logprobs must be an integer in [0, 20], got {self.top_logprobs!r}")
        return self


@dataclass
class Event:
    """One engine event: kind is progress | delta | done | error.

    progress: processed/total prompt tokens. delta: text (+ token id, + logprob dict when asked).
    done: finish_reason ("stop" | "length" | "cancelled") and stats (mlxedge stats + cached_tokens, queue_s,
    load_s). error: code and message.
    """

    kind: str
    text: str = ""
    token: Optional[int] = None
    logprob: Optional[dict] = None
    processed: Optional[int] = None
    total: Optional[int] = None
    finish_reason: Optional[str] = None
    stats: Optional[dict] = None
    code: Optional[str] = None
    message: Optional[str] = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


_END = object()


class Handle:
    """The consumer's end of one request: its events, its cancel flag, its timings."""

    def __init__(self, request: Request, loop: Optional[asyncio.AbstractEventLoop] = None):
        self.request = request
        self.id: Optional[int] = None
        self.created = time.perf_counter()
        self.tokens_after_cancel = 0           # generated tokens delivered after cancel() (tests count these)
        self.final: Optional[Event] = None     # the done or error event, once there is one
        self._cancel = threading.Event()
        self._loop = loop
        self._sync: "queue.Queue[Any]" = queue.Queue()
        self._async: Optional[asyncio.Queue] = asyncio.Queue() if loop is not None else None
        self.finished = threading.Event()

    # --- consumer side
    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self):
        while True:
            item = self._sync.get()
            if item is _END:
                return
            yield item

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        assert self._async is not None, "create the Handle with loop= to iterate it asynchronously"
        while True:
            item = await self._async.get()
            if item is _END:
                return
            yield item

    # --- worker side
    def push(self, event: Event) -> None:
        if event.kind == "delta" and self.cancelled:
            self.tokens_after_cancel += 1
        self._put(event)
        if event.kind in ("done", "error"):
            self.final = event
            self._put(_END)
            self.finished.set()

    def _put(self, item) -> None:
        if self._async is not None:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, item)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                self._cancel.set()
        else:
            self._sync.put(item)
