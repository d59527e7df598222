"""The repetition guard: end a reply whose latest tokens are one span repeated over and over.

Small models, greedy decoding above all, fall into loops ("The sea is blue. The sea is blue. ...") and
would run to the token limit — minutes on a slow machine. The guard watches the generated ids and
reports a loop when the tail is the same span of `period` tokens repeated back to back at least
`min_repeats` times and over at least `min_tokens` tokens (so a period of 1 needs 48 identical tokens,
a 12-token line 4 copies, a 30-token sentence 3). The loop then ends with finish_reason "repeating".
Periods up to `max_period` tokens are checked; the cost is a few slice comparisons per token.
"""

from __future__ import annotations

from typing import List

FINISH_REASON = "repeating"


class RepetitionGuard:
    """feed(token) -> True once the generated tokens end in a span repeated many times back to back."""

    def __init__(self, max_period: int = 64, min_repeats: int = 3, min_tokens: int = 48):
        if max_period < 1 or min_repeats < 2 or min_tokens < 2:
            raise ValueError("max_period >= 1, min_repeats >= 2 and min_tokens >= 2 are required")
        self.max_period, self.min_repeats, self.min_tokens = max_period, min_repeats, min_tokens
        self.tokens: List[int] = []
        self.period: int = 0  # the period of the loop found, 0 while none

    def span_needed(self, period: int) -> int:
        """How many tail tokens must repeat with this period before it counts as a loop."""
        return max(self.min_repeats * period, self.min_tokens)

    def feed(self, token: int) -> bool:
        self.tokens.append(int(token))
        tokens = self.tokens
        for period in range(1, self.max_period + 1):
            need = self.span_needed(period)
            if len(tokens) < need:
                break  # span_needed grows with the period: longer ones cannot fit either
            tail = tokens[-need:]
            if tail[period:] == tail[:-period]:  # periodic with this period over the whole tail
                self.period = period
                return True
        keep = self.span_needed(self.max_period)
        if len(tokens) > 4 * keep:  # bounded memory on long generations
            del tokens[:-keep]
        return False
