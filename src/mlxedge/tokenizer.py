"""The tokenizer a Model exposes: encode/decode plus chat templates rendered in mlxedge's sandbox."""

from __future__ import annotations

from typing import Optional

from .errors import GenerationError
from .generate.chat_template import normalize_messages, render_chat


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
