"""Write a model in mlx-lm's on-disk format (safetensors shards + config.json with "quantization").

Any source goes in (HF dir, mlx dir, GGUF, alias); what comes out loads in mlx-lm and in mlxedge.
The write is atomic: everything goes to a temporary sibling directory that is renamed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .errors import MlxedgeError
from .loading import load_checkpoint
from .quant.affine import validate_settings
from .quant.recipes import Recipe
from .quant.sensitivity import save_sensitivities
from .recipe_search import resolve_quantization
from .sources import open_source

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's shard size


def convert(source, dest, bits: Optional[int] = 4, group_size: int = 64, dtype: Optional[str] = None,
            force: bool = False, progress: Optional[Callable[[int, int], None]] = None, recipe: Optional[str] = None,
            target_bpw: Optional[float] = None, calibration=None, data_aware: bool = False) -> dict:
    """Convert `source` to an mlx-lm directory at `dest`; returns a summary dict (path, bytes, bits, ...).

    recipe: a preset mix (q4_k_m, q3_k_m, q6_k); target_bpw: bits per weight to reach with the mix that
    measured sensitivities favour (written to quant_sensitivity.json); data_aware: choose each group's scale
    and bias by activation-weighted error on the calibration text (a UTF-8 file; default: pydoc's topics).
    """
    dest = Path(dest).expanduser()
    if dest.suffix.lower() == ".gguf":
        return _convert_to_gguf(source, dest, bits, recipe, target_bpw, data_aware, force, progress)
    if dest.exists() and not force:
        raise MlxedgeError(f"{dest} already exists; choose another destination or pass force=True (--force).")
    requested = validate_settings(bits, group_size) if recipe is None and target_bpw is None else None
    checkpoint = open_source(source)
    requested = resolve_quantization(checkpoint, bits, group_size, recipe=recipe, target_bpw=target_bpw,
                                     calibration=calibration, data_aware=data_aware)
    loaded = load_checkpoint(checkpoint, requested, dtype=dtype, progress=progress, for_compute=False)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        total = _write_weights(tmp, dict(tree_flatten(loaded.model.parameters())))
        _write_config(tmp, loaded, checkpoint)
        _write_tokenizer(tmp, checkpoint)
        if isinstance(requested, Recipe) and "sensitivity" in requested.notes:
            save_sensitivities(tmp / "quant_sensitivity.json", requested.notes["sensitivity"], loaded.quantized,
                               target_bpw, group_size)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": str(dest), "bytes": total, "architecture": loaded.config["model_type"],
            "quantized_modules": len(loaded.quantized), "unquantized_modules": loaded.unquantized,
            "bits": _summary_bits(requested), "group_size": group_size if requested else None,
            "recipe": requested.name if isinstance(requested, Recipe) else None,
            "bits_per_weight": 8 * total / max(loaded.parameters, 1)}


def _convert_to_gguf(source, dest: Path, bits, recipe, target_bpw, data_aware, force, progress) -> dict:
    """DEST ending in .gguf: a GGUF file for llama.cpp/Ollama (F16, Q8_0, Q4_0 or the q4_k_m mix)."""
    from .export.gguf import export_gguf, export_type

    if target_bpw is not None or data_aware:
        raise MlxedgeError("GGUF export writes llama.cpp's own block types; target_bpw and data-aware search "
                           "apply to mlx-lm directories only (give a DEST directory).")
    if dest.exists() and not force:
        raise MlxedgeError(f"{dest} already exists; choose another destination or pass force=True (--force).")
    return export_gguf(source, dest, export_type(bits, recipe), progress=progress)


def _summary_bits(requested):
    if isinstance(requested, Recipe):
        return None
    return requested.bits if requested else None


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
