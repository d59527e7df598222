"""A one-line progress bar on stderr, redrawn in place on a terminal and silent elsewhere."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from ..memory.units import format_bytes

class _Bar:
    """A one-line progress bar redrawn in place on a terminal; silent when the stream is not a terminal."""

    WIDTH = 24

    def __init__(self, label: str, unit: str, stream, enabled: bool):
        self.label, self.unit, self.stream = label, unit, stream
        self.enabled = enabled and _isatty(stream)
        self.started = time.monotonic()
        self.last_draw = 0.0
        self.drawn = False
        self.done = self.total = 0
        self.note = ""

    def update(self, done: int, total: int, note: Optional[str] = None) -> None:
        self.done, self.total = int(done), int(total)
        changed = note is not None and note != self.note
        if note is not None:
            self.note = note
        now = time.monotonic()
        if self.enabled and (changed or now - self.last_draw >= 0.1 or done >= total):
            self.last_draw = now
            self._draw()

    def _amount(self) -> str:
        if self.unit == "bytes":
            return f"{format_bytes(self.done)}/{format_bytes(self.total)}"
        if self.note:
            return self.note
        return f"{self.done}/{self.total} {self.unit}"

    def _draw(self) -> None:
        frac = min(1.0, self.done / self.total) if self.total > 0 else 0.0
        filled = int(frac * self.WIDTH)
        bar = "█" * filled + "░" * (self.WIDTH - filled)
        line = f"\r{self.label}  {bar} {frac * 100:3.0f}%  {self._amount()}  {time.monotonic() - self.started:.1f}s"
        self.stream.write(line + "\x1b[K")
        self.stream.flush()
        self.drawn = True

    def finish(self, ok: bool) -> None:
        if not self.drawn:
            return
        if ok:  # a finished job is complete, whatever the last count said
            self.done = max(self.done, self.total)
            self._draw()
        self.stream.write("\n")
        self.stream.flush()


@contextmanager
def progress_bar(label: str, unit: str = "items", enabled: bool = True, stream=None) -> Iterator[Callable]:
    """Context manager yielding progress(done, total); draws `label  ███░░ 40%  n/total` on stderr (a tty)."""
    bar = _Bar(label, unit, stream or sys.stderr, enabled)
    try:
        yield bar.update
    except BaseException:
        bar.finish(ok=False)
        raise
    bar.finish(ok=True)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
