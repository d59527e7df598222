"""Streaming detokenization: turn generated token ids, one at a time, into UTF-8-safe text deltas.

A prefix/read offset scheme (as in TGI and vLLM): each step decodes only a short window — the last
already-emitted piece (the prefix) plus the tokens not yet shown — and emits what the window adds past
the prefix's own text. Decoding with a real prefix keeps tokenizer-dependent leading-space rules right
(SentencePiece's stripped first "▁", byte-level BPE's "Ġ"), and a window whose text ends in U+FFFD
(an incomplete UTF-8 character from byte tokens) is held back until the character completes.

Decode flags, used for every window and by `decode_tokens`: clean_up_tokenization_spaces=False (that
cleanup rewrites across token boundaries, so no stream could match it) and skip_special_tokens=False
by default (the loop stops at EOS before adding it; other special tokens are shown as the model wrote
them). Invariant: "".join(deltas) == decode_tokens(tokenizer, ids) with the same skip_special_tokens.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

__all__ = ["StreamingDetokenizer", "decode_tokens", "make_decoder"]

_REPLACEMENT = "\ufffd"


def make_decoder(tokenizer, *, skip_special_tokens: bool = False) -> Callable[[Sequence[int]], str]:
    """A function ids -> text using the tokenizer's decode with this module's fixed flags.

    Accepts a transformers tokenizer, a `tokenizers.Tokenizer`, or any object with `decode(ids, ...)`
    (keyword flags are passed only where its decode accepts them)."""
    decode = tokenizer.decode
    kwargs: dict = {}
    try:
        params = inspect.signature(decode).parameters
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        accepted = set(params)
    except (TypeError, ValueError):  # builtins without a signature (e.g. tokenizers.Tokenizer.decode)
        accepts_any, accepted = False, {"skip_special_tokens"}
    if accepts_any or "skip_special_tokens" in accepted:
        kwargs["skip_special_tokens"] = skip_special_tokens
    if accepts_any or "clean_up_tokenization_spaces" in accepted:
        kwargs["clean_up_tokenization_spaces"] = False

    def run(ids: Sequence[int]) -> str:
        return decode(list(ids), **kwargs) if ids else ""

    return run


def decode_tokens(tokenizer, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    """Decode a whole sequence with exactly the flags StreamingDetokenizer uses."""
    return make_decoder(tokenizer, skip_special_tokens=skip_special_tokens)(ids)


class StreamingDetokenizer:
    """Feed token ids with `add`, show the returned deltas; `finalize` flushes what was held back."""

    def __init__(self, tokenizer, *, skip_special_tokens: bool = False):
        self._decode = make_decoder(tokenizer, skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []
        self._prefix_offset = 0   # start of the window decoded each step
        self._read_offset = 0     # tokens before this have been emitted
        self._prefix_text = ""    # decode(ids[prefix_offset:read_offset]), cached
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far (the concatenation of the returned deltas)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def tokens(self) -> list[int]:
        return list(self._ids)

    def add(self, token_id: int) -> str:
        """Append one token; return the new text that is safe to show ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        window = self._decode(self._ids[self._prefix_offset:])
        if len(window) <= len(self._prefix_text) or window.endswith(_REPLACEMENT):
            return ""
        return self._emit(window)

    def finalize(self) -> str:
        """Return whatever is still held back (an unfinished character shows as U+FFFD)."""
        if self._read_offset == len(self._ids):
            return ""
        window = self._decode(self._ids[self._prefix_offset:])
        if len(window) <= len(self._prefix_text):
            self._read_offset = len(self._ids)  # the held tokens decode to nothing
            return ""
        return self._emit(window)

    def _emit(self, window: str) -> str:
        delta = window[len(self._prefix_text):]
        # The piece just emitted becomes the next prefix: the next window starts with real text, so its
        # leading-space rule applies to that text and cancels out in the difference.
        self._prefix_offset, self._prefix_text = self._read_offset, self._decode(self._ids[self._read_offset:])
        self._read_offset = len(self._ids)
        self._pieces.append(delta)
        return delta
