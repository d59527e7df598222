"""Write a model in mlx-lm's on-disk format (safetensors shards + config.json with "quantization").

Any source goes in (HF dir, mlx dir, GGUF, alias); what comes out loads in mlx-lm and in mlxedge.
The write is atomic: everything goes to a temporary sibling directory (fsutil's naming, so a killed run's
leftovers are cleaned by the next one) that is renamed into place at the end; an existing DEST is replaced
only with force=True, only when fsutil says it is a model directory, and only after the new one is complete.
Free space is checked up front from the plan's weight bytes; a disk filling up mid-write is one line too.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from . import fsutil
from .adapters import fused_checkpoint, read_adapter
from .errors import MlxedgeError
from .loading import load_checkpoint, resolve_dtype
from .memory import weight_plan
from .quant.affine import validate_settings
from .sources import open_source

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's shard size
EXTRA_BYTES = 4 << 20  # room asked beyond the weights: config, tokenizer files, marker


def convert(source, dest, bits: Optional[int] = 4, group_size: int = 64, dtype: Optional[str] = None,
            force: bool = False, progress: Optional[Callable[[int, int], None]] = None, adapter=None) -> dict:
    """Convert `source` to an mlx-lm directory at `dest`; returns a summary dict (path, bytes, bits, ...).

    adapter: a LoRA/DoRA adapter directory fused into the weights before they are quantized.
    """
    dest = fsutil.absolute(dest)
    sources = [source] + ([adapter] if adapter is not None else [])
    fsutil.refuse_existing(dest, force, sources, flag="force=True (--force)")
    requested = validate_settings(bits, group_size)
    lora = read_adapter(adapter) if adapter is not None else None
    checkpoint = open_source(source)
    sources.append(checkpoint.path)
    fsutil.refuse_existing(dest, force, sources, flag="force=True (--force)")
    fsutil.clean_stale_temps(dest.parent)
    needed = EXTRA_BYTES + weight_plan(
        checkpoint.config, checkpoint.tensor_infos, bits=requested.bits if requested else None, group_size=group_size,
        dtype_bytes=resolve_dtype(dtype, checkpoint, for_compute=False).size, quantized=checkpoint.quantization)["bytes"]
    fsutil.check_free_space(dest.parent, needed, dest)
    if lora is not None:
        checkpoint = fused_checkpoint(checkpoint, lora)
    loaded = load_checkpoint(checkpoint, requested, dtype=dtype, progress=progress, for_compute=False)
    tmp = fsutil.make_temp_dir(dest.parent, "convert")
    try:
        try:
            total = _write_weights(tmp, dict(tree_flatten(loaded.model.parameters())))
            _write_config(tmp, loaded, checkpoint)
            _write_tokenizer(tmp, checkpoint)
            fsutil.write_marker(tmp, checkpoint.path, {"bits": requested.bits if requested else None,
                                                       "group_size": requested.group_size if requested else None})
        except (OSError, RuntimeError) as exc:
            if not fsutil.is_no_space(exc):
                raise
            fsutil.remove_path(tmp)
            if isinstance(exc, OSError) or fsutil.free_bytes(dest.parent) < needed:
                raise fsutil.no_space_error(dest.parent, needed, dest) from exc
            raise MlxedgeError(f"could not write {dest}: {exc}") from exc
        fsutil.replace_dir(tmp, dest, sources)
    except BaseException:
        fsutil.remove_path(tmp)
        raise
    return {"path": str(dest), "bytes": total, "architecture": loaded.config["model_type"],
            "quantized_modules": len(loaded.quantized), "unquantized_modules": loaded.unquantized,
            "bits": requested.bits if requested else None, "group_size": requested.group_size if requested else None}


def _write_weights(directory: Path, weights: dict) -> int:
    shards, current, size = [], {}, 0
    for name in sorted(weights):
        array = weights[name]
        if current and size + array.nbytes > MAX_SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(directory / name), shard, metadata={"format": "mlx"})
        for key, array in shard.items():
            weight_map[key] = name
            total += array.nbytes
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def _write_config(directory: Path, loaded, checkpoint) -> None:
    """The normalised config (so mlx-lm reads rope settings right) plus mlx-lm's quantization entry."""
    config = {k: v for k, v in loaded.config.items() if k not in ("quantization", "quantization_config")}
    config["torch_dtype"] = str(loaded.dtype).split(".")[-1]
    if loaded.quantized:
        default, _ = Counter(loaded.quantized.values()).most_common(1)[0]
        quantization = default.to_config()
        for path, spec in loaded.quantized.items():
            if spec != default:
                quantization[path] = spec.to_config()
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def _write_tokenizer(directory: Path, checkpoint) -> None:
    tokenizer = checkpoint.load_tokenizer()
    if checkpoint.chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = checkpoint.chat_template
    tokenizer.save_pretrained(str(directory))
    for name in ("generation_config.json",):
        src = Path(checkpoint.path) / name
        if Path(checkpoint.path).is_dir() and src.exists():
            shutil.copy(src, directory / name)
