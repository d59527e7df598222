"""How a request's prompt reaches the model, reusing cached prompt prefixes where the layer below allows.

`PrefixCache.open(resident, request, cancel)` returns a `Run`: the model's stream of events plus how many
prompt tokens came from the cache. `PrefixCache.close(run, completed)` hands the state back for reuse.
The cache is shared by all requests of the engine and bounded in bytes (least recently used out first).

This implementation runs every request from an empty KV cache (cached_tokens is 0): the public API does
not yet expose a reusable KV state. The session layer (`Model.session`) will back it: entries become
sessions keyed by their conversation, `open` picks the one whose history is the longest prefix of the
request, and `close` stores it back with its byte size — the engine above does not change.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional


@dataclass
class Run:
    events: Iterator            # mlxedge StreamEvents
    prompt_ids: List[int]
    cached_tokens: int = 0
    state: object = None        # what close() stores back (a session, later)
    key: object = None


class PrefixCache:
    def __init__(self, max_bytes: int = 0):
        self.max_bytes = int(max_bytes)
        self.entries: "OrderedDict[object, tuple]" = OrderedDict()   # key -> (state, nbytes)
        self.hits = 0
        self.misses = 0
        self.cached_tokens_total = 0

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.entries.values())

    def open(self, resident, request, cancel: Callable[[], bool]) -> Run:
        model = resident.model
        prompt_ids = model.tokenizer.prompt_ids(request.prompt, raw=request.raw)
        events = model.stream(request.prompt, raw=request.raw, max_tokens=request.max_tokens,
                              stop=list(request.stop) or None, cancel=cancel, **request.sampling)
        run = Run(events=events, prompt_ids=prompt_ids)
        self.misses += 1
        return run

    def close(self, run: Run, completed: bool) -> None:
        if run.state is None or not completed or self.max_bytes <= 0:
            return
        nbytes = int(getattr(run.state, "nbytes", 0))
        self.entries[run.key] = (run.state, nbytes)
        self.entries.move_to_end(run.key)
        self._evict()

    def _evict(self) -> None:
        while self.entries and self.nbytes > self.max_bytes:
            self.entries.popitem(last=False)

    def clear_model(self, name: str) -> None:
        for key in [k for k in self.entries if isinstance(k, tuple) and k and k[0] == name]:
            del self.entries[key]

    def stats(self) -> dict:
        return {"entries": len(self.entries), "bytes": self.nbytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses, "cached_tokens": self.cached_tokens_total}
