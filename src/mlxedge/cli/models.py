"""Model management commands: `pull`, `list`, `info`, `convert` (each with --json)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from .errors import handles_errors
from .options import apply_options_of, dtype_option, quantization_options
from .model_loading import load_model, resolve_source
from .progress import progress_bar
from .output import echo_table, emit_json, format_bytes, format_count, format_quantization
from .requantization import cost_line, measure_cost


def bytes_on_disk(path: Path) -> Optional[int]:
    """Size of a model file, or the sum of the files in a checkpoint directory."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return None


def quantization_text(info: dict) -> str:
    """E.g. "4-bit g32 (8-bit where stored so); GGUF Q4_1 ×210, Q8_0 ×1, F32 ×61" or "none (float16)"."""
    text = format_quantization(info) if info.get("bits") else f"none ({info.get('dtype')})"
    blocks = (info.get("gguf") or {}).get("block_types")
    if blocks:
        text += "; GGUF " + ", ".join(f"{name} ×{b.get('tensors')}" for name, b in blocks.items())
    return text


# ------------------------------------------------------------------------------------------------ pull

@click.command("pull")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print name, path and bytes as JSON.")
@handles_errors
def pull_command(name: str, as_json: bool) -> None:
    """Fetch model NAME (an alias, see `mlxedge list --available`) into the local cache."""
    import mlxedge

    with progress_bar(f"Pulling {name}", unit="bytes", enabled=not as_json) as progress:
        result = mlxedge.pull(name, progress=progress)
    if as_json:
        emit_json(result)
    else:
        state = "already cached" if result["already_cached"] else "pulled"
        click.echo(f"{result['name']}: {state} at {result['path']} ({format_bytes(result['bytes'])})")


# ------------------------------------------------------------------------------------------------ list

@click.command("list")
@click.option("--available", is_flag=True, help="Also list the aliases that are not pulled yet.")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@handles_errors
def list_command(available: bool, as_json: bool) -> None:
    """List the models in the local cache: name, source, size, bits."""
    import mlxedge
    from ..paths import cache_root

    models = mlxedge.list_models(available=available)
    if as_json:
        emit_json({"cache_dir": str(cache_root()), "models": models})
        return
    if not models:
        click.echo(f"no models in {cache_root()}; `mlxedge pull smollm2` fetches the default one "
                   "(`mlxedge list --available` shows what can be pulled)")
        return
    rows = [(m["name"] + (" (default)" if m["default"] else ""), m["source"],
             format_bytes(m["bytes"]) if m["cached"] else "not pulled",
             m["bits"] if m["bits"] is not None else "-", m["description"]) for m in models]
    echo_table(rows, ("NAME", "SOURCE", "SIZE", "BITS", "DESCRIPTION"))


# ------------------------------------------------------------------------------------------------ info

def kernels_text(info: dict) -> str:
    """'native cpu (avx2+fma, 2 threads); mode auto; quantized: native 211; gate_up_fused: native 30'."""
    kernels = info.get("kernels") or {}
    parts = [f"{kind}: " + ", ".join(f"{backend} {n}" for backend, n in counts.items())
             for kind, counts in (kernels.get("layers") or {}).items()]
    return "; ".join([str(kernels.get("backend")), f"mode {kernels.get('mode')}", *parts])


@click.command("info")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@handles_errors
def info_command(model: str, as_json: bool) -> None:
    """Architecture, parameters, quantization and bytes on disk / in memory of MODEL (loads it)."""
    path = resolve_source(model, quiet=as_json)
    loaded = load_model(path, quiet=as_json)
    info = dict(loaded.info)
    info["name"] = model
    info["disk_bytes"] = bytes_on_disk(Path(path).expanduser())
    info["memory_bytes"] = info.get("bytes")
    if as_json:
        emit_json(info)
        return
    rows = [
        ("model", model),
        ("source", f"{info.get('source')} ({info.get('source_kind')})"),
        ("architecture", info.get("architecture")),
        ("parameters", f"{format_count(info.get('parameters'))} ({info.get('parameters'):,})"),
        ("quantization", quantization_text(info)),
        ("dtype", info.get("dtype")),
        ("kernels", kernels_text(info)),
        ("context length", info.get("context_length")),
        ("on disk", format_bytes(info["disk_bytes"])),
        ("in memory", f"{format_bytes(info['memory_bytes'])} (weights)"),
    ]
    echo_table(rows)


# ------------------------------------------------------------------------------------------------ convert

@click.command("convert")
@click.argument("src")
@click.argument("dest", type=click.Path(dir_okay=True, file_okay=True, path_type=Path))
@apply_options_of(quantization_options(
    bits_help="Quantization bits (16 = keep float, 32 = keep float as float32). Default: as stored for a "
              "quantized source, else 4.",
    bits_choices=("4", "8", "16", "32")))
@dtype_option("dtype of the tensors left unquantized (default: the checkpoint's).")
@click.option("--force", is_flag=True,
              help="Replace DEST if it is a model directory (one mlxedge wrote, or config.json + *.safetensors) "
                   "or a GGUF file.")
@click.option("--adapter", default=None, metavar="DIR",
              help="Fuse a LoRA/DoRA adapter directory (mlx-lm or PEFT) into the weights.")
@click.option("--recipe", default=None, metavar="NAME",
              help="Per-module mix: q4_k_m, q3_k_m or q6_k (llama.cpp's K-quant patterns).")
@click.option("--target-bpw", type=float, default=None, metavar="X",
              help="Bits per weight to reach, choosing bits per module by measured sensitivity.")
@click.option("--calibration", default=None, metavar="FILE",
              help="Calibration text for --target-bpw/--data-aware (default: Python's pydoc topics).")
@click.option("--data-aware", is_flag=True,
              help="Choose scales by activation-weighted error on the calibration text (imatrix-style).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@handles_errors
def convert_command(src: str, dest: Path, bits: Optional[str], group_size: Optional[int], allow_requantize: bool,
                    dtype: Optional[str], force: bool, adapter: Optional[str], recipe: Optional[str],
                    target_bpw: Optional[float], calibration: Optional[str], data_aware: bool, as_json: bool) -> None:
    """Convert SRC (HF directory, .gguf file or alias) to an mlx-lm directory at DEST (or a GGUF file when
    DEST ends in .gguf: --bits 32 F32, 16 F16, 8 Q8_0 (the default), 4 Q4_0, --recipe q4_k_m the K-quant mix).

    A source stored quantized keeps its precision unless --bits says otherwise; a coarser grid than the
    stored one is refused unless --allow-requantize, which also measures and prints what it cost.
    The write is atomic: on failure or Ctrl-C nothing is left at DEST.
    """
    import mlxedge
    from ..fsutil import refuse_existing

    if dest.suffix.lower() != ".gguf":  # say so before pulling or converting (the API checks again)
        refuse_existing(dest, force, [src])
    path = resolve_source(src, quiet=as_json)
    with progress_bar(f"Converting {src}", unit="tensors", enabled=not as_json) as progress:
        summary = mlxedge.convert(path, dest, bits="auto" if bits is None else None if bits == "16" else int(bits),
                                  group_size=group_size, dtype=dtype, force=force, progress=progress,
                                  adapter=adapter, allow_requantize=allow_requantize, recipe=recipe,
                                  target_bpw=target_bpw, calibration=calibration, data_aware=data_aware)
    summary["disk_bytes"] = bytes_on_disk(dest)
    if summary.get("requantized_coarser"):
        summary["requantization_cost"] = _requantization_cost(path, dest, quiet=as_json)
    if as_json:
        emit_json(summary)
        return
    if "gguf_type" in summary:
        types = ", ".join(f"{n} {t}" for t, n in sorted(summary["tensor_types"].items()))
        click.echo(f"wrote {dest}: {summary['architecture']}, GGUF {summary['gguf_type']} ({types}), "
                   f"{format_bytes(summary['disk_bytes'])} on disk")
        return
    if summary.get("recipe"):
        quant = f"recipe {summary['recipe']}, {summary['bits_per_weight']:.2f} bits per weight"
    else:
        quant = f"{summary['bits']}-bit, group size {summary['group_size']}" if summary.get("bits") else "float"
    click.echo(f"wrote {dest}: {summary['architecture']}, {quant}, {summary['quantized_modules']} quantized "
               f"modules, {format_bytes(summary['disk_bytes'])} on disk")
    if summary["kept_stored_precision"]:
        click.echo(f"kept at their stored precision (embeddings/heads are never re-quantized coarser unless "
                   f"--allow-requantize): {', '.join(summary['kept_stored_precision'])}")
    cost = summary.get("requantization_cost")
    if cost:
        click.echo(cost_line(len(summary["requantized_coarser"]), cost))


def _requantization_cost(source: str, dest: Path, quiet: bool) -> dict:
    """KLD and top-1 agreement of the converted model against the source as stored, on a short text."""
    return measure_cost(source, quiet, model=load_model(str(dest), quiet=quiet))
