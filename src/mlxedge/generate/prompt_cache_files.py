"""Prompt-cache files for one-shot use: prefill a long prefix once, then answer many prompts that continue it.

`cache_prompt(model, TEXT, FILE)` (CLI: `mlxedge cache-prompt MODEL -p TEXT -o FILE`) saves the KV cache of
TEXT; `model.generate(PROMPT, prompt_cache=FILE)` (CLI: `generate --prompt-cache FILE`) answers TEXT + PROMPT
(joined as they are, as mlx-lm's cache_prompt does) and prefills only the part past the cached prefix.

With a chat template the cached part is the rendering of a user message holding TEXT, up to where TEXT ends
(found with a sentinel), so the continuation renders [system?, user: TEXT + PROMPT] exactly as
`generate(TEXT + PROMPT)` would; raw=True (or a model without a template) caches the plain tokens of TEXT.
Either way the generation loop keeps only the longest common token prefix, so a token that merges across
the boundary costs a few tokens of prefill, never a wrong answer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from ..errors import GenerationError
from .guards import check_generation_context
from .loop import prefill
from .prompt_cache import PromptCache

PROMPT_KIND = "prompt"
_SENTINEL = "\u2063mlxedge-prompt-end\u2063"


def _messages(text: str, system: Optional[str]) -> list:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def prefix_ids(model, text: str, system: Optional[str] = None, raw: bool = False) -> list:
    """Token ids of the part of the prompt that TEXT fixes (see the module docstring)."""
    tokenizer = model.tokenizer
    if raw or not tokenizer.chat_template:
        if system:
            raise GenerationError("a system prompt needs the chat template; drop raw or the system prompt.")
        return tokenizer.encode(text)
    rendered = tokenizer.apply_chat_template(_messages(text + _SENTINEL, system))
    cut = rendered.find(_SENTINEL)
    if cut < 0:
        raise GenerationError("the chat template does not show the user's message as written; "
                              "cache the prompt with raw=True (--raw) instead.")
    return tokenizer.encode(rendered[:cut], add_special_tokens=False)


def cache_prompt(model, text: str, path, system: Optional[str] = None, raw: bool = False,
                 kv_bits: Optional[int] = None) -> dict:
    """Prefill TEXT and save its cache to `path`; returns tokens, seconds and bytes of the file."""
    if not isinstance(text, str) or not text:
        raise GenerationError("the prompt to cache is empty; give some text.")
    ids = prefix_ids(model, text, system, raw)
    check_generation_context(len(ids), 0, model.context_length)
    cache = model.new_cache(kv_bits=kv_bits)
    start = time.perf_counter()
    prefill(model.module, cache, ids)
    seconds = time.perf_counter() - start
    raw = raw or not model.tokenizer.chat_template
    extra = {"text": text, "system": system, "raw": raw, "kv_bits": kv_bits}
    cache.save(path, fingerprint=model.fingerprint, kind=PROMPT_KIND, extra=extra)
    return {"tokens": len(ids), "seconds": seconds, "bytes": Path(path).stat().st_size}


def continue_prompt(model, path, prompt, raw: bool):
    """(PromptCache, the full prompt to generate from, raw) for `generate(prompt, prompt_cache=path)`."""
    if not isinstance(prompt, str):
        raise GenerationError("with a prompt cache the prompt is text that continues the cached prefix, "
                              "not a message list.")
    cache, extra = PromptCache.load(path, fingerprint=model.fingerprint, kind=PROMPT_KIND)
    settings = {"kv_bits": extra.get("kv_bits")}
    cache.make = lambda: model.new_cache(**settings).caches
    text = extra["text"] + prompt
    if extra.get("raw"):
        return cache, text, True
    if raw:
        raise GenerationError("this prompt cache was made with the chat template; drop raw (--raw) "
                              "or cache the prompt again with raw=True.")
    return cache, _messages(text, extra.get("system")), False
