"""Decoding flags shared by `generate`, `chat` and `cache-prompt`: speculative decoding (--draft, --draft-bits,
--num-draft-tokens) and the quantized KV cache (--kv-bits)."""

from __future__ import annotations

import functools

import click

SPECIAL = ("prompt-lookup", "auto")


def draft_options(fn):
    """Decorator: the draft flags, handed to the command as one `draft` dict (see resolve_draft)."""

    @click.option("--draft", "draft_source", default=None, metavar="MODEL|prompt-lookup|auto",
                  help="Speculative decoding: a draft model sharing the tokenizer (alias, file or directory), "
                       "prompt-lookup (drafts copied from the context), or auto (prompt lookup, turned off "
                       "when it does not pay).")
    @click.option("--draft-bits", type=click.Choice(["4", "8"]), default=None,
                  help="Quantize the draft model while loading it (e.g. the model itself at 4 bits).")
    @click.option("--num-draft-tokens", type=click.IntRange(1, 16), default=3, show_default=True,
                  help="Tokens the draft proposes per step.")
    @functools.wraps(fn)
    def wrapper(*args, draft_source=None, draft_bits=None, num_draft_tokens=3, **kwargs):
        kwargs["draft"] = {"source": draft_source, "bits": int(draft_bits) if draft_bits else None,
                           "num_draft_tokens": num_draft_tokens}
        return fn(*args, **kwargs)

    return wrapper


def resolve_draft(draft: dict, load: dict) -> dict:
    """Keyword arguments for Model.stream / Session.stream: loads a draft model when one is named."""
    source = draft.get("source")
    if not source:
        if draft.get("bits"):
            raise click.UsageError("--draft-bits needs --draft MODEL")
        return {}
    if source in SPECIAL:
        if draft.get("bits"):
            raise click.UsageError(f"--draft-bits applies to a draft model, not to --draft {source}")
        return {"draft": source, "num_draft_tokens": draft["num_draft_tokens"]}
    from .model_loading import load_model

    options = {k: load[k] for k in ("dtype", "context_length") if load.get(k) is not None}
    model = load_model(source, bits=draft.get("bits"), **options)
    return {"draft": model, "num_draft_tokens": draft["num_draft_tokens"]}


def kv_bits_option(fn):
    """Decorator: --kv-bits 4|8, added to the command's `load` dict (it must come above load_options)."""

    @click.option("--kv-bits", type=click.Choice(["4", "8"]), default=None,
                  help="Keep the KV cache quantized to 4 or 8 bits (less memory for long contexts).")
    @functools.wraps(fn)
    def wrapper(*args, kv_bits=None, **kwargs):
        if kv_bits:
            kwargs["load"]["kv_bits"] = int(kv_bits)
        return fn(*args, **kwargs)

    return wrapper
