"""A tokenizer that transformers saved (tokenizer.json + tokenizer_config.json), reloaded without transformers.

Importing transformers costs about a second even without torch; the `tokenizers` library (transformers'
own Rust backend) reads the same `tokenizer.json` in a fraction of that. For the tokenizer classes that are
nothing but that backend — transformers 5's `TokenizersBackend`, `PreTrainedTokenizerFast`, and the
GGUF-built `GemmaTokenizer` and `Qwen2Tokenizer`, whose saved `tokenizer.json` already holds their whole
pipeline — transformers' encode and decode are the backend's, plus an optional space clean-up after
decoding (which `usable` refuses). So `SavedTokenizer` gives the same ids and text; tests compare the two
on prose, code, emoji, special tokens and random ids. Any other class, or a config this module does not
reproduce, is left to transformers (`usable` answers False).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
# classes whose encode/decode are exactly the tokenizers backend's (checked against transformers in the tests)
PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast", "GemmaTokenizer", "Qwen2Tokenizer")
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")


def _read_config(directory: Path) -> Optional[dict]:
    try:
        config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def usable(directory) -> bool:
    """Whether `directory` holds a tokenizer this module reproduces exactly (else: use transformers)."""
    directory = Path(directory)
    config = _read_config(directory)
    if config is None or not (directory / TOKENIZER_FILE).is_file():
        return False
    template = config.get("chat_template")
    return (config.get("tokenizer_class") in PLAIN_CLASSES
            and config.get("backend", "tokenizers") == "tokenizers"
            and not config.get("clean_up_tokenization_spaces")
            and not config.get("auto_map")
            and (template is None or isinstance(template, str)))


def _token_text(value) -> Optional[str]:
    """A special token as the config writes it: a string, or an AddedToken dict with its content."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class SavedTokenizer:
    """encode/decode, special tokens, vocabulary and chat template of a saved tokenizer directory.

    The names and signatures are transformers' (the subset mlxedge uses), so the two are interchangeable.
    """

    def __init__(self, directory):
        from tokenizers import Tokenizer

        self.directory = Path(directory)
        self.backend_tokenizer = Tokenizer.from_file(str(self.directory / TOKENIZER_FILE))
        self.init_kwargs = _read_config(self.directory) or {}
        template_file = self.directory / TEMPLATE_FILE
        self.chat_template = (template_file.read_text(encoding="utf-8") if template_file.is_file()
                              else self.init_kwargs.get("chat_template"))
        for name in SPECIAL_NAMES:
            setattr(self, name, _token_text(self.init_kwargs.get(name)))

    # ---------------------------------------------------------------------------------------- ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False) -> str:
        if isinstance(ids, int):
            ids = [ids]
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.backend_tokenizer.token_to_id(tokens)
        return [self.backend_tokenizer.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        return [self.backend_tokenizer.id_to_token(i) for i in ids]

    def get_vocab(self) -> dict:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def __bool__(self) -> bool:
        return True

    # ---------------------------------------------------------------------------------------- special tokens

    def _id(self, name: str) -> Optional[int]:
        token = getattr(self, name)
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    bos_token_id = property(lambda self: self._id("bos_token"))
    eos_token_id = property(lambda self: self._id("eos_token"))
    unk_token_id = property(lambda self: self._id("unk_token"))
    pad_token_id = property(lambda self: self._id("pad_token"))

    @property
    def all_special_tokens(self) -> list:
        seen = []
        for name in SPECIAL_NAMES:
            token = getattr(self, name)
            if token is not None and token not in seen:
                seen.append(token)
        return seen

    @property
    def all_special_ids(self) -> list:
        return [self.backend_tokenizer.token_to_id(t) for t in self.all_special_tokens]

    # ---------------------------------------------------------------------------------------- saving

    def save_pretrained(self, directory) -> None:
        """Write the same files transformers would (its own, copied), with the chat template as set now."""
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        for name in (TOKENIZER_FILE, CONFIG_FILE):
            shutil.copyfile(self.directory / name, target / name)
        if self.chat_template:
            (target / TEMPLATE_FILE).write_text(self.chat_template, encoding="utf-8")

    def __repr__(self) -> str:
        return f"SavedTokenizer({str(self.directory)!r}, vocab={len(self)})"


__all__ = ["SavedTokenizer", "usable"]
