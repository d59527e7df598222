"""Where heavy test fixtures are built once and kept: the test cache directory and an atomic build-once step.

Shared by conftest's fixtures and the helper modules that build their own (tiny_chat, the bench and
evaluation tests); import it by name (`from fixture_cache import build_once, test_cache_dir`), never
conftest itself, which pytest loads as a plugin and which must not be imported a second time as a module.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_cache_dir() -> Path:
    """$MLXEDGE_TEST_CACHE, else $XDG_CACHE_HOME/mlxedge-tests (~/.cache/mlxedge-tests); created if missing."""
    root = os.environ.get("MLXEDGE_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mlxedge-tests")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


test_cache_dir.__test__ = False  # not a test, despite the name


def build_once(target: Path, build) -> Path:
    """Run build(tmp) and rename tmp -> target atomically, unless target already exists."""
    if target.exists():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    if tmp.exists():  # left by a killed run with this pid: it is ours to remove (under the test cache)
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    build(tmp)
    os.replace(tmp, target)
    return target
