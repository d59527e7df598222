"""Result and event types of a generation call, with the per-call statistics every front-end prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0       # prefilled (not cached) prompt tokens / prefill seconds (prefill includes the first sampled token)
    generation_tps: float = 0.0   # decode rate after the first token: (n - 1) / (t_last - t_first)
    ttft_s: float = 0.0           # call start to first generated token
    peak_memory_bytes: int = 0    # MLX's peak allocation during the call
    kv_cache_bytes: int = 0       # bytes the KV cache holds at the end (a rotating window stays at its size)
    cached_prompt_tokens: int = 0  # prompt tokens the KV cache already held (a session's earlier turns)
    draft_proposed: int = 0       # speculative decoding: tokens the drafter proposed
    draft_accepted: int = 0       # ... and how many of them the model accepted
    draft_disabled: bool = False  # draft="auto" measured speculation slower than plain decoding and stopped it

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StreamEvent:
    """One streamed text delta; the last event of a stream carries finish_reason and stats."""

    text: str
    token: Optional[int] = None
    finish_reason: Optional[str] = None
    stats: Optional[dict] = None


@dataclass
class GenerationResult:
    text: str
    tokens: List[int] = field(default_factory=list)
    finish_reason: str = "stop"   # "stop" (EOS or stop string), "length" (max_tokens), "cancelled"
    stats: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)
