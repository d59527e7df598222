"""Stop strings over a text stream: emit what is safe, hold back what may still become a stop string."""

from __future__ import annotations

from typing import Sequence, Tuple


class StopMatcher:
    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.buffer = ""
        self.stopped = False

    def feed(self, delta: str) -> Tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was reached)."""
        self.buffer += delta
        if not self.stops:
            out, self.buffer = self.buffer, ""
            return out, False
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer = self.buffer[: min(hits)], ""
            self.stopped = True
            return out, True
        hold = self._partial_suffix()
        out = self.buffer[: len(self.buffer) - hold]
        self.buffer = self.buffer[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out

    def _partial_suffix(self) -> int:
        """Length of the longest buffer suffix that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.buffer)), best, -1):
                if self.buffer.endswith(stop[:n]):
                    best = n
                    break
        return best
