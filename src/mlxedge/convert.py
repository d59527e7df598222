"""Write a model in mlx-lm's on-disk format (safetensors shards + config.json with "quantization").

Any source goes in (HF dir, mlx dir, GGUF, alias); what comes out loads in mlx-lm and in mlxedge.
The write is atomic: everything goes to a temporary sibling directory (fsutil's naming, so a killed run's
leftovers are cleaned by the next one) that is renamed into place at the end; an existing DEST is replaced
only with force=True, only when fsutil says it is a model directory, and only after the new one is complete.
Free space is checked up front from the plan's weight bytes; a disk filling up mid-write is one line too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from . import fsutil
from .adapters import fused_checkpoint, read_adapter
from .errors import MlxedgeError
from .loading import load_checkpoint, resolve_dtype
from .memory.plan import weight_plan
from .quant.affine import QuantSpec, predominant_spec, quantization_summary, validate_settings
from .quant.recipes import Recipe
from .quant.requantize import default_group_size
from .quant.sensitivity import save_sensitivities
from .recipe_search import resolve_quantization
from .sources import open_source

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's shard size
AUTO_FLOAT_BITS = 4  # bits="auto" on a float source: mlx-lm's default
EXTRA_BYTES = 4 << 20  # room asked beyond the weights: config, tokenizer files, marker


def convert(source, dest, bits="auto", group_size: Optional[int] = None, dtype: Optional[str] = None,
            force: bool = False, progress: Optional[Callable[[int, int], None]] = None, adapter=None,
            allow_requantize: bool = False, recipe: Optional[str] = None, target_bpw: Optional[float] = None,
            calibration=None, data_aware: bool = False) -> dict:
    """Convert `source` to an mlx-lm directory at `dest`; returns a summary dict (path, bytes, bits, ...).

    bits "auto": a source stored quantized keeps its precision, a float one becomes 4-bit; None keeps
    float. group_size None: the source's own for a quantized source, else 64. A grid coarser than the
    stored one is refused unless allow_requantize=True (see quant.requantize).
    adapter: a LoRA/DoRA adapter directory fused into the weights before they are quantized.
    recipe: a preset mix (q4_k_m, q3_k_m, q6_k); target_bpw: bits per weight to reach with the mix that
    measured sensitivities favour (written to quant_sensitivity.json); data_aware: choose each group's scale
    and bias by activation-weighted error on the calibration text (a UTF-8 file; default: pydoc's topics).
    A DEST ending in .gguf is written as a GGUF file for llama.cpp and Ollama instead (export/gguf.py).
    """
    dest = fsutil.absolute(dest)
    if dest.suffix.lower() == ".gguf":
        return _convert_to_gguf(source, dest, bits, recipe, target_bpw, data_aware, force, progress)
    sources = [source] + ([adapter] if adapter is not None else [])
    fsutil.refuse_existing(dest, force, sources, flag="force=True (--force)")
    if bits != "auto" and recipe is None and target_bpw is None:
        validate_settings(bits, group_size or 64)  # bad settings fail before the source is opened
    if bits == 32:  # "float32": keep float, stored as float32
        bits, dtype = None, dtype or "float32"
    lora = read_adapter(adapter) if adapter is not None else None
    checkpoint = open_source(source)
    if bits == "auto":
        bits = None if checkpoint.quantization else AUTO_FLOAT_BITS
    group_size = default_group_size(group_size, checkpoint.quantization)
    sources.append(checkpoint.path)
    fsutil.refuse_existing(dest, force, sources, flag="force=True (--force)")
    fsutil.clean_stale_temps(dest.parent)
    if lora is not None:
        checkpoint = fused_checkpoint(checkpoint, lora)
    requested = resolve_quantization(checkpoint, bits, group_size, recipe=recipe, target_bpw=target_bpw,
                                     calibration=calibration, data_aware=data_aware)
    planned_bits = requested.max_bits() if isinstance(requested, Recipe) else (requested.bits if requested else None)
    needed = EXTRA_BYTES + weight_plan(
        checkpoint.config, checkpoint.tensor_infos, bits=planned_bits, group_size=group_size,
        dtype_bytes=resolve_dtype(dtype, checkpoint, for_compute=False).size, quantized=checkpoint.quantization)["bytes"]
    fsutil.check_free_space(dest.parent, needed, dest)
    loaded = load_checkpoint(checkpoint, requested, dtype=dtype, progress=progress, for_compute=False,
                             allow_requantize=allow_requantize)
    with fsutil.temp_dir(dest.parent, "convert", private=False) as tmp:  # removed on any failure or Ctrl-C
        try:
            total = _write_weights(tmp, dict(tree_flatten(loaded.model.parameters())))
            _write_config(tmp, loaded, checkpoint)
            _write_tokenizer(tmp, checkpoint)
            if isinstance(requested, Recipe) and "sensitivity" in requested.notes:
                save_sensitivities(tmp / "quant_sensitivity.json", requested.notes["sensitivity"], loaded.quantized,
                                   target_bpw, group_size)
            fsutil.write_marker(tmp, checkpoint.path, {"bits": requested.bits if isinstance(requested, QuantSpec) else None,
                                                       "group_size": group_size if requested else None,
                                                       "recipe": requested.name if isinstance(requested, Recipe)
                                                       else None})
        except (OSError, RuntimeError) as exc:
            if not fsutil.is_no_space(exc):
                raise
            fsutil.remove_path(tmp)  # now, so the free space below is measured without it
            if isinstance(exc, OSError) or fsutil.free_bytes(dest.parent) < needed:
                raise fsutil.no_space_error(dest.parent, needed, dest) from exc
            raise MlxedgeError(f"could not write {dest}: {exc}") from exc
        fsutil.replace_dir(tmp, dest, sources)
    return {"path": str(dest), "bytes": total, "architecture": loaded.config["model_type"],
            "quantized_modules": len(loaded.quantized), "unquantized_modules": loaded.unquantized,
            **quantization_summary(loaded.quantized),
            "kept_stored_precision": loaded.extra["kept_stored_precision"],
            "requantized_coarser": loaded.extra["requantized_coarser"],
            "recipe": requested.name if isinstance(requested, Recipe) else None,
            "bits_per_weight": 8 * total / max(loaded.parameters, 1)}


def _convert_to_gguf(source, dest: Path, bits, recipe, target_bpw, data_aware, force, progress) -> dict:
    """DEST ending in .gguf: a GGUF file for llama.cpp/Ollama (F32, F16, Q8_0, Q4_0 or the q4_k_m mix)."""
    from .export.gguf import export_gguf, export_type

    if target_bpw is not None or data_aware:
        raise MlxedgeError("GGUF export writes llama.cpp's own block types; target_bpw and data-aware search "
                           "apply to mlx-lm directories only (give a DEST directory).")
    if dest.exists():
        if not force:
            raise MlxedgeError(f"{dest} already exists; choose another destination or pass force=True (--force).")
        if dest.is_symlink() or not dest.is_file() or dest.open("rb").read(4) != b"GGUF":
            raise MlxedgeError(f"refusing to replace {dest}: it is not a GGUF file; --force only replaces those.")
    return export_gguf(source, dest, export_type(bits, recipe), progress=progress)


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
        default = predominant_spec(loaded.quantized)
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

