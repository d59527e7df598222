"""The conversation behind `mlxedge chat` and `mlxedge run`: an mlxedge Session (its KV cache kept between
turns), each reply streamed to stdout with Ctrl-C stopping it (an interrupted exchange is dropped from the
history), the statistics of the last reply and of the conversation (/stats), reset and save. A model without
a chat template has no conversation: each message is answered on its own, as a plain prompt.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from ..errors import MlxedgeError
from .output import echo_footer, format_bytes
from .reply import stream_reply


class ChatSession:
    """The REPL's conversation: an mlxedge Session (its KV cache kept between turns, so each turn prefills
    only its new tokens) plus the statistics of the last reply."""

    def __init__(self, model, system: Optional[str], max_tokens: int, sampling: dict, show_stats: bool,
                 session=None, draft: Optional[dict] = None):
        self.model = model
        self.session = session if session is not None else _session_or_none(model, system)
        self._system = system  # only used without a session (a model with no chat template)
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.draft = draft or {}
        self.show_stats = show_stats
        self.last_stats: Optional[dict] = None
        self.last_finish: Optional[str] = None
        self.replies = 0
        self.generated_tokens = 0
        self.context_tokens = 0  # prompt + reply tokens of the last exchange kept in the history

    @property
    def system(self) -> Optional[str]:
        return self.session.system if self.session is not None else self._system

    @system.setter
    def system(self, text: Optional[str]) -> None:
        if self.session is not None:
            self.session.system = text
        else:
            self._system = text

    @property
    def history(self) -> List[dict]:
        if self.session is None:
            return []
        return [m for m in self.session.messages if m["role"] != "system"]

    def reply(self, user_text: str) -> str:
        """Stream the reply to stdout; returns the finish reason ("stop", "length", "repeating" or "cancelled").
        A cancelled turn leaves the session as it was (the Session drops it)."""
        out = sys.stdout
        # without a chat template there is no conversation to keep: each message is a plain prompt
        target = self.session if self.session is not None else self.model
        reply = stream_reply(target, user_text, max_tokens=self.max_tokens, sampling={**self.sampling, **self.draft})
        out.write(("\n" if reply.text else "") + "[interrupted]\n" if reply.finish_reason == "cancelled" else "\n")
        out.flush()
        stats = reply.stats
        if stats is not None:
            self.last_stats, self.last_finish = stats, reply.finish_reason
            self.replies += 1
            self.generated_tokens += stats.get("generation_tokens", 0)
            if reply.finish_reason != "cancelled":  # a dropped reply is not in the context any more
                self.context_tokens = stats["prompt_tokens"] + stats["generation_tokens"]
            if self.show_stats:
                echo_footer(stats, reply.finish_reason)
        return reply.finish_reason

    def reset(self) -> None:
        if self.session is not None:
            self.session.reset()
        self.context_tokens = 0

    def save(self, path: str) -> None:
        if self.session is None:
            raise MlxedgeError("this model has no chat template, so there is no conversation to save")
        self.session.save(path)

    def stats_text(self) -> str:
        lines = []
        s = self.last_stats
        if s:
            cached = s.get("cached_prompt_tokens", 0)
            lines += [f"last reply:   {s['generation_tokens']} tokens at {s['generation_tps']:.1f} tok/s, "
                      f"{s['ttft_s']:.2f}s to first token",
                      f"prompt:       {s['prompt_tokens']} tokens: {cached} cached, "
                      f"{s['prompt_tokens'] - cached} new at {s['prompt_tps']:.1f} tok/s",
                      f"peak memory:  {format_bytes(s['peak_memory_bytes'])}"]
            if self.last_finish == "cancelled":
                lines[0] += " (interrupted, dropped from the conversation)"
            if s.get("draft_proposed"):
                lines.append(f"speculative:  {s['draft_accepted']} of {s['draft_proposed']} drafted tokens accepted"
                             + (" (turned off: slower here)" if s.get("draft_disabled") else ""))
            context = self.model.info.get("context_length")
            used = self.context_tokens
            lines.append(f"context:      {used} of {context} tokens" if context else f"context: {used} tokens")
        else:
            lines.append("no reply yet")
        lines.append(f"conversation: exchanges in history: {len(self.history) // 2}; replies: {self.replies}; "
                     f"tokens generated: {self.generated_tokens}"
                     + (f"; KV cache holds {self.session.cached_tokens} tokens" if self.session is not None else ""))
        return "\n".join(lines)


def _session_or_none(model, system: Optional[str]):
    """A Session, or None for a model without a chat template (a base model): then every message is
    answered on its own, as a plain prompt."""
    from ..errors import GenerationError

    try:
        return model.session(system=system)
    except GenerationError:
        if model.tokenizer.chat_template:
            raise
        return None
