"""Where weights come from. `open_source` turns whatever the user named into a Checkpoint.

Accepted: a Hugging Face or mlx-lm checkpoint directory, a .gguf file, an alias from the registry
(e.g. "smollm2"), or a hub repo id when huggingface_hub is installed and online.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SourceError
from .checkpoint import Checkpoint, TensorInfo
from .config_check import check_config, check_layers
from .hf import open_hf_dir
from .hub import download_snapshot, looks_like_repo_id

__all__ = ["Checkpoint", "TensorInfo", "open_source"]


def open_source(source, dequantize: bool = False) -> Checkpoint:
    """Open a model source by path, alias or hub id, reading headers only; the config is validated here, once.

    dequantize: see the stored weights as float32, exactly as the file defines them (a GGUF through gguf's
    own dequantizer, every block type; an mlx-lm directory through mx.dequantize).
    """
    checkpoint = _open(source, dequantize)
    where = str(checkpoint.path / "config.json") if checkpoint.kind != "gguf" else str(checkpoint.path)
    check_config(checkpoint.config, where)
    check_layers(checkpoint.config, checkpoint.tensor_infos, where)
    return checkpoint


def _open(source, dequantize: bool = False) -> Checkpoint:
    name = str(source)
    path = Path(name).expanduser()
    if path.is_dir():
        return _dir(path, name, dequantize)
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            from .gguf import open_gguf

            return open_gguf(path, name, dequantize=dequantize)
        raise SourceError(f"{path} is a file but not a .gguf model; pass a checkpoint directory or a .gguf file.")
    from .registry import resolve_alias

    alias_path = resolve_alias(name)
    if alias_path is not None:
        return _open(alias_path, dequantize)
    if looks_like_repo_id(name):
        return _dir(download_snapshot(name), name, dequantize)
    raise SourceError(f"model {name!r} not found: not a directory, a .gguf file, a known alias "
                      "(`mlxedge list --available` lists them) or a hub repo id.")


def _dir(path: Path, name: str, dequantize: bool) -> Checkpoint:
    checkpoint = open_hf_dir(path, name)
    if dequantize:
        from .dequantized import dequantized_checkpoint

        checkpoint = dequantized_checkpoint(checkpoint)
    return checkpoint


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
