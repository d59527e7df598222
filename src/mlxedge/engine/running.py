"""The worker's record of one request it runs: its handle, resident model, KV state (a Run) and reservation,
its batch (when it decodes in one), its timings, and the deltas held back until their logprobs are known."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from .prefix_cache import Run
from .registry import Resident
from .request import Event, Handle


@dataclass
class Running:
    handle: Handle
    resident: Resident
    run: Run
    kv_bytes: int
    admitted_at: float
    load_s: float
    batch: object = None     # the DecodeBatch its row decodes in (None: decoded on its own, round-robin)
    joined: bool = False     # its row has joined the batch (its prompt is prefilled)
    tokens: List[int] = field(default_factory=list)
    held: List[Event] = field(default_factory=list)     # deltas held back until logprobs are known
    first_at: Optional[float] = None

