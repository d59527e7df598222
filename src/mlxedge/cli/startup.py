"""What the `mlxedge` program does before any command runs: keep PyTorch out of the process.

transformers 5 imports torch whenever it is installed (its config and GGUF modules do so at import time),
and there is no environment switch left that stops it (USE_TORCH is gone). mlxedge never needs torch:
MLX runs the model and the tokenizer is a `tokenizers` one. Importing it anyway costs seconds and
~300 MB. A `None` entry in `sys.modules` makes `importlib.util.find_spec("torch")` answer None, so
transformers takes its torch-less path.

Only the program does this (the console script or `python -m mlxedge.cli`), never a library import or a
test process, which may use torch itself; MLXEDGE_ALLOW_TORCH=1 turns it off.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

BLOCKED = ("torch",)
PROGRAM_NAMES = ("mlxedge", "__main__")


def running_as_program() -> bool:
    """True when this process is the `mlxedge` command itself (not pytest, not an embedding program)."""
    return Path(sys.argv[0] if sys.argv else "").stem in PROGRAM_NAMES


def keep_torch_out() -> None:
    """Make torch look absent to the libraries imported from now on (no-op if it is already imported)."""
    if os.environ.get("MLXEDGE_ALLOW_TORCH", "").strip() not in ("", "0") or not running_as_program():
        return
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # its "PyTorch was not found" advice
    for name in BLOCKED:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]
