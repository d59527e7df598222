"""Tiny random models that chat: a tiny architecture with SmolLM2's tokenizer and chat template (cached)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fixture_cache import build_once, test_cache_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def tiny_chat_model(smollm2_hf: Path, arch: str = "llama", name: str = "", **overrides) -> Path:
    """A tiny random `arch` checkpoint with SmolLM2's vocabulary, tokenizer and chat template."""

    def build(tmp: Path):
        from tiny_models import build_tiny

        build_tiny(arch, tmp, vocab_size=49152, **overrides)
        for file in TOKENIZER_FILES:
            if (smollm2_hf / file).exists():
                shutil.copy(smollm2_hf / file, tmp / file)

    return build_once(test_cache_dir() / f"tiny-chat-{arch}{'-' + name if name else ''}", build)


@pytest.fixture(scope="module")
def tiny_chat(smollm2_hf):
    """Path of the tiny chat model (import this fixture into a test module to use it)."""
    return tiny_chat_model(smollm2_hf)


@pytest.fixture(scope="module")
def tiny_chat_loaded(tiny_chat):
    """The tiny chat model, loaded once per test module."""
    import mlxedge

    return mlxedge.load(tiny_chat)
