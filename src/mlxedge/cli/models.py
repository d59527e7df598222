"""Model management commands: `pull`, `list`, `info`, `convert` (each with --json)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from ..errors import MlxedgeError
from .common import emit_json, format_bytes, format_count, handles_errors, load_model, progress_bar, resolve_source


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
    bits, group = info.get("bits"), info.get("group_size")
    if not bits:
        text = f"none ({info.get('dtype')})"
    else:
        bits = "/".join(str(b) for b in bits) if isinstance(bits, list) else str(bits)
        group = "/".join(str(g) for g in group) if isinstance(group, list) else str(group)
        text = f"{bits}-bit affine, group size {group}"
    blocks = (info.get("gguf") or {}).get("block_types")
    if blocks:
        text += "; GGUF " + ", ".join(f"{name} ×{b.get('tensors')}" for name, b in blocks.items())
    return text


def _table(rows, header) -> None:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        click.echo("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())


def _header_bits(path: str) -> Optional[int]:
    """The predominant bit width a checkpoint's headers declare (no tensor data read); None when float."""
    from ..sources import open_source

    try:
        quant = open_source(path).quantization
    except MlxedgeError:
        return None
    return quant.get("bits") if quant else None


# ------------------------------------------------------------------------------------------------ pull

@click.command("pull")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print name, path and bytes as JSON.")
@handles_errors
def pull_command(name: str, as_json: bool) -> None:
    """Fetch model NAME (an alias, see `mlxedge list --available`) into the local cache."""
    from ..sources.registry import ALIASES, cached_path

    alias = ALIASES.get(name.strip().lower())
    if alias is None:
        known = ", ".join(sorted(ALIASES))
        raise MlxedgeError(f"no model alias {name!r}; known aliases: {known} (a .gguf file or checkpoint "
                           "directory needs no pull: pass its path to chat/generate)")
    was_cached = cached_path(alias).is_file()
    path = Path(resolve_source(alias.name, quiet=as_json))
    result = {"name": alias.name, "path": str(path), "bytes": path.stat().st_size, "source": alias.requirement,
              "already_cached": was_cached}
    if as_json:
        emit_json(result)
    else:
        state = "already cached" if was_cached else "pulled"
        click.echo(f"{alias.name}: {state} at {path} ({format_bytes(result['bytes'])})")


# ------------------------------------------------------------------------------------------------ list

@click.command("list")
@click.option("--available", is_flag=True, help="Also list the aliases that are not pulled yet.")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@handles_errors
def list_command(available: bool, as_json: bool) -> None:
    """List the models in the local cache: name, source, size, bits."""
    from ..sources.registry import ALIASES, cache_dir, cached_path, list_cached

    cached = {entry["name"]: entry for entry in list_cached()}
    models = []
    for alias in ALIASES.values():
        entry = cached.get(alias.name)
        if entry is None and not available:
            continue
        models.append({"name": alias.name, "cached": entry is not None, "source": f"pypi:{alias.requirement}",
                       "bytes": entry["bytes"] if entry else None,
                       "bits": _header_bits(entry["path"]) if entry else None,
                       "path": entry["path"] if entry else str(cached_path(alias)),
                       "description": alias.description, "default": alias.default})
    if as_json:
        emit_json({"cache_dir": str(cache_dir()), "models": models})
        return
    if not models:
        click.echo(f"no models in {cache_dir()}; `mlxedge pull smollm2` fetches the default one "
                   "(`mlxedge list --available` shows what can be pulled)")
        return
    rows = [(m["name"] + (" (default)" if m["default"] else ""), m["source"],
             format_bytes(m["bytes"]) if m["cached"] else "not pulled",
             m["bits"] if m["bits"] is not None else "-", m["description"]) for m in models]
    _table(rows, ("NAME", "SOURCE", "SIZE", "BITS", "DESCRIPTION"))


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
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key.ljust(width)}  {value}")


# ------------------------------------------------------------------------------------------------ convert

@click.command("convert")
@click.argument("src")
@click.argument("dest", type=click.Path(dir_okay=True, file_okay=True, path_type=Path))
@click.option("--bits", type=click.Choice(["4", "8", "16"]), default="4", show_default=True,
              help="Quantization bits (16 = keep float).")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
              help="Quantization group size.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="dtype of the tensors left unquantized (default: the checkpoint's).")
@click.option("--force", is_flag=True,
              help="Replace DEST if it is a model directory (one mlxedge wrote, or config.json + *.safetensors).")
@click.option("--adapter", default=None, metavar="DIR",
              help="Fuse a LoRA/DoRA adapter directory (mlx-lm or PEFT) into the weights.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@handles_errors
def convert_command(src: str, dest: Path, bits: str, group_size: str, dtype: Optional[str], force: bool,
                    adapter: Optional[str], as_json: bool) -> None:
    """Convert SRC (HF directory, .gguf file or alias) to an mlx-lm directory at DEST.

    The write is atomic: on failure or Ctrl-C nothing is left at DEST.
    """
    import mlxedge
    from ..fsutil import refuse_existing

    refuse_existing(dest, force, [src])  # say so before pulling or converting (the API checks again)
    path = resolve_source(src, quiet=as_json)
    with progress_bar(f"Converting {src}", unit="tensors", enabled=not as_json) as progress:
        summary = mlxedge.convert(path, dest, bits=None if bits == "16" else int(bits), group_size=int(group_size),
                                  dtype=dtype, force=force, progress=progress, adapter=adapter)
    summary["disk_bytes"] = bytes_on_disk(dest)
    if as_json:
        emit_json(summary)
        return
    quant = f"{summary['bits']}-bit, group size {summary['group_size']}" if summary.get("bits") else "float"
    click.echo(f"wrote {dest}: {summary['architecture']}, {quant}, {summary['quantized_modules']} quantized "
               f"modules, {format_bytes(summary['disk_bytes'])} on disk")
