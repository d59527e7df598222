"""The tokenizer a Model exposes: encode/decode plus chat templates rendered in mlxedge's sandbox."""

from __future__ import annotations

from typing import Optional

from .errors import GenerationError
from .generate.chat_template import normalize_messages, render_chat


def utf8_problem(text: str) -> Optional[str]:
    """Why `text` cannot be encoded as UTF-8 (e.g. "byte 0xff at character 3"), or None when it can.

    Python decodes argv, stdin and file names with surrogateescape: a byte that is not UTF-8 arrives as a
    lone surrogate U+DC80..U+DCFF, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        return f"{what} at character {exc.start}"
    return None


class Tokenizer:
    def __init__(self, hf_tokenizer, chat_template: Optional[str]):
        self.hf = hf_tokenizer
        self.chat_template = chat_template or getattr(hf_tokenizer, "chat_template", None)

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.hf.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        problem = utf8_problem(text) if isinstance(text, str) else None
        if problem:
            raise GenerationError(f"the prompt is not valid UTF-8 text ({problem}); decode it as UTF-8 first "
                                  "(a terminal or file in another encoding?)")
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise GenerationError("this model has no chat template; pass a plain prompt string instead of messages.")
        return render_chat(self.chat_template, normalize_messages(messages),
                           add_generation_prompt=add_generation_prompt,
                           bos_token=self.hf.bos_token or "", eos_token=self.hf.eos_token or "")

    def prompt_ids(self, prompt_or_messages, raw: bool = False) -> list:
        """Token ids for a prompt: messages (or a string, unless raw) go through the chat template."""
        if isinstance(prompt_or_messages, str) and (raw or not self.chat_template):
            return self.encode(prompt_or_messages)
        text = self.apply_chat_template(prompt_or_messages)
        return self.encode(text, add_special_tokens=False)

    def __getattr__(self, name):  # anything else (special tokens, vocab) from the transformers tokenizer
        return getattr(self.hf, name)
