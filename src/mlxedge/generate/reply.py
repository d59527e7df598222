"""What a stream of generated token ids becomes: text deltas and the reason the reply ends.

`Reply` is the per-request text side of decoding, shared by the single-stream loop (loop.py) and the
batched decoder (batch.py), so a request ends the same way in both: an EOS id ends it ("stop", not shown),
a stop string ends it ("stop", the text before it shown), a reply looping on itself ends it ("repeating");
deltas are UTF-8 safe and hold back what may still become a stop string.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

from .detokenizer import StreamingDetokenizer
from .repetition import FINISH_REASON as REPEATING, RepetitionGuard
from .stop import StopMatcher


class Reply:
    """feed(token) -> text delta (None for an EOS id); `finish` is set once the reply has ended."""

    def __init__(self, tokenizer, eos_ids: Iterable[int], stop: Optional[Sequence[str]] = None):
        if isinstance(stop, str):
            stop = [stop]
        self.eos = set(int(e) for e in eos_ids)
        self.detok = StreamingDetokenizer(tokenizer)
        self.matcher = StopMatcher(stop or [])
        self.guard = RepetitionGuard()
        self.finish: Optional[str] = None
        self.generated = 0   # tokens that are part of the reply (EOS is not)

    def feed(self, token: int) -> Optional[str]:
        """The text this token adds; None (and finish "stop") when it is an EOS id."""
        if token in self.eos:
            self.finish = "stop"
            return None
        self.generated += 1
        text, hit = self.matcher.feed(self.detok.add(token))
        if hit:
            self.finish = "stop"
        elif self.guard.feed(token):  # the reply loops: end it rather than run to the limit
            self.finish = REPEATING
        return text

    def close(self) -> Tuple[str, bool]:
        """(text still held back, whether it completes a stop string) once no more tokens come."""
        if self.matcher.stopped:
            return "", False
        tail, hit = self.matcher.feed(self.detok.finalize())
        if not hit:
            tail += self.matcher.flush()
        return tail, hit
