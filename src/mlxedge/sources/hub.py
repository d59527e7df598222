"""Hugging Face hub repo ids: resolved to a local snapshot through huggingface_hub when it is installed and online."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import SourceError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def looks_like_repo_id(source: str) -> bool:
    return bool(REPO_ID.match(source))


def download_snapshot(repo_id: str) -> Path:
    """Local directory of the repo's weights, tokenizer and config; one-line SourceError when unreachable."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SourceError(f"{repo_id!r} is not a local path, and huggingface_hub is not installed to fetch it "
                          "(pip install huggingface_hub, or pass a local directory or .gguf file).") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=SNAPSHOT_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SourceError(f"{repo_id!r} is not a local path and could not be fetched from the Hugging Face hub "
                          f"(offline or unreachable: {reason}); pass a local directory or .gguf file.") from None
