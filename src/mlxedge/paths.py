"""Where mlxedge keeps files between runs: the one cache root every part of it writes under.

    cache_root()/models/<alias>/       fetched models (sources/registry.py)
    cache_root()/tokenizers/<key>/     tokenizers built from GGUF metadata (sources/tokenizer_cache.py)
    cache_root()/bench/                the measured memory bandwidth per device (bench/device.py)
    cache_root()/kernel-selection.json the custom-vs-built-in kernel verdicts (kernels.py; metal/selection.py)
    cache_root()/chat_history          the chat prompt's line history (cli/chat.py)

The root is $MLXEDGE_HOME when set, else mlxedge/ under the user cache home ($XDG_CACHE_HOME, else
~/.cache). Standard library only, so anything may import it.
"""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_home() -> Path:
    """The user's cache directory: $XDG_CACHE_HOME, else ~/.cache (scripts keep their own caches beside ours)."""
    root = os.environ.get("XDG_CACHE_HOME")
    return Path(root).expanduser() if root else Path.home() / ".cache"


def cache_root() -> Path:
    """mlxedge's cache directory: $MLXEDGE_HOME, else user_cache_home()/mlxedge. Not created here."""
    root = os.environ.get("MLXEDGE_HOME")
    return Path(root).expanduser() if root else user_cache_home() / "mlxedge"
