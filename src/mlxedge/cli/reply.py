"""One reply streamed to the terminal, shared by `chat`, `run` and `generate`: Ctrl-C stops it cleanly.

- `Interrupt`: while a reply streams, the first Ctrl-C asks the stream to stop at the next token; a
  second one (e.g. during a long prefill, before the stream notices) forces it.
- `stream_reply(model, prompt, ...)` writes the text deltas to stdout as they come (unless `echo` is
  False) and returns a `Reply` (text, tokens, finish_reason, stats); an interrupted reply ends
  "cancelled".
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, field
from typing import List, Optional


class Interrupt:
    """While a reply streams: the first Ctrl-C asks the stream to stop at the next token; a second forces it."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)
        return False


@dataclass
class Reply:
    text: str = ""
    tokens: List[int] = field(default_factory=list)
    finish_reason: str = "cancelled"
    stats: Optional[dict] = None


def stream_reply(model, prompt, *, max_tokens: int, sampling: dict, echo: bool = True, **options) -> Reply:
    """Stream one reply (to stdout when `echo`); Ctrl-C ends it with finish_reason "cancelled"."""
    out = sys.stdout
    reply, parts = Reply(), []
    with Interrupt() as interrupt:
        try:
            for event in model.stream(prompt, max_tokens=max_tokens, cancel=lambda: interrupt.requested,
                                      **sampling, **options):
                if event.text:
                    parts.append(event.text)
                    if echo:
                        out.write(event.text)
                        out.flush()
                if event.token is not None:
                    reply.tokens.append(event.token)
                if event.finish_reason is not None:
                    reply.finish_reason, reply.stats = event.finish_reason, event.stats
        except KeyboardInterrupt:  # forced by a second Ctrl-C
            reply.finish_reason = "cancelled"
    if interrupt.requested:
        reply.finish_reason = "cancelled"
    reply.text = "".join(parts)
    return reply
