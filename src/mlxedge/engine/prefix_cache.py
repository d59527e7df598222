"""A prefix cache shared by all requests: KV caches of finished requests, reused by the next request that
starts with the same tokens (a system prompt, a conversation's earlier turns, a few-shot preamble).

`open(resident, request, cancel)` (a request decoded on its own) and `open_row(resident, request)` (a
request that joins its model's decode batch) pick, among the cached KV states of that model, the one
sharing the longest token prefix with the request's prompt, take it out of the pool for the request's
lifetime and generate into it (`Model.stream(cache=...)` / `Model.batch_row(cache=...)` reuse the common
prefix and prefill only the rest; a batch row gets its keys and values back from the batch when it
leaves); a miss starts from `model.new_cache()`. `close(run)` puts the state back — holding prompt and reply, so the
next turn of a conversation hits it — and evicts least recently used states past `max_bytes`.
The engine also evicts from here when a request's KV reservation needs the memory.
"""

from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional


@dataclass
class Run:
    events: Optional[Iterator]  # mlxedge StreamEvents (a request decoded on its own), or None for a batch row
    prompt_ids: List[int]
    cached_tokens: int = 0      # prompt tokens the reused state already holds
    state: object = None        # the KV state (a PromptCache) generated into; back to the pool on close
    model: str = ""
    row: object = None          # the request's BatchRow when it decodes in its model's DecodeBatch
    batch: object = None        # ... and that DecodeBatch (set by the engine)


def shared_prefix(a: List[int], b: List[int]) -> int:
    return len(os.path.commonprefix([a, b]))


class PrefixCache:
    def __init__(self, max_bytes: int = 0):
        self.max_bytes = int(max_bytes)
        self.entries: "OrderedDict[int, tuple]" = OrderedDict()   # key -> (model name, PromptCache), LRU first
        self._keys = itertools.count()
        self.hits = 0
        self.misses = 0
        self.cached_tokens_total = 0

    @property
    def nbytes(self) -> int:
        return sum(int(state.nbytes) for _, state in self.entries.values())

    def open(self, resident, request, cancel: Callable[[], bool], enabled: bool = True) -> Run:
        """A request decoded on its own: its stream generates into the best cached state (or a new one)."""
        model = resident.model
        prompt_ids = model.tokenizer.prompt_ids(request.prompt, raw=request.raw)
        state, reused = self._acquire(resident, prompt_ids, enabled)
        events = model.stream(request.prompt, raw=request.raw, max_tokens=request.max_tokens,
                              stop=list(request.stop) or None, cancel=cancel, cache=state, **request.sampling)
        return Run(events=events, prompt_ids=prompt_ids, cached_tokens=reused, state=state, model=resident.name)

    def open_row(self, resident, request) -> Run:
        """A request that decodes in its model's batch: a BatchRow prefilling into the best cached state."""
        model = resident.model
        prompt_ids = model.tokenizer.prompt_ids(request.prompt, raw=request.raw)
        state, _ = self._acquire(resident, prompt_ids, True)
        row = model.batch_row(request.prompt, raw=request.raw, max_tokens=request.max_tokens,
                              stop=list(request.stop) or None, cache=state or model.new_cache(), **request.sampling)
        return Run(events=None, prompt_ids=prompt_ids, cached_tokens=row.cached_tokens, state=row.cache,
                   model=resident.name, row=row)

    def _acquire(self, resident, prompt_ids: List[int], enabled: bool):
        """(the cached state sharing the longest prefix with the prompt, taken out of the pool, and that
        prefix's length), or (a new state, 0) on a miss; (None, 0) when the cache is off."""
        key, reused = self._best(resident.name, prompt_ids) if enabled and self.max_bytes > 0 else (None, 0)
        if key is not None:
            state = self.entries.pop(key)[1]
            self.hits += 1
            self.cached_tokens_total += reused
        else:
            state = resident.model.new_cache() if enabled and self.max_bytes > 0 else None
            self.misses += 1
        return state, reused

    def _best(self, model: str, prompt_ids: List[int]):
        best_key, best = None, 0
        for key, (name, state) in self.entries.items():
            if name == model:
                n = min(shared_prefix(state.tokens, prompt_ids), len(prompt_ids) - 1)
                if n > best:
                    best_key, best = key, n
        return best_key, best

    def close(self, run: Run) -> None:
        """Return the run's KV state to the pool (cancelled runs too: the state stays consistent)."""
        if run.state is None or not run.state.tokens or self.max_bytes <= 0:
            return
        self.entries[next(self._keys)] = (run.model, run.state)
        self.evict(self.max_bytes)

    def evict(self, keep_bytes: int) -> int:
        """Drop least recently used states until the pool holds at most keep_bytes; return bytes freed."""
        freed = 0
        while self.entries and self.nbytes > max(0, keep_bytes):
            _, (_, state) = self.entries.popitem(last=False)
            freed += int(state.nbytes)
        return freed

    def clear_model(self, name: str) -> None:
        for key in [k for k, (model, _) in self.entries.items() if model == name]:
            del self.entries[key]

    def stats(self) -> dict:
        return {"entries": len(self.entries), "bytes": self.nbytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses, "cached_tokens": self.cached_tokens_total}
