"""What commands print besides errors: aligned tables, JSON, model precision and size, the stats footer."""

from __future__ import annotations

import json
from typing import Optional

import click

from ..memory.units import format_bytes  # noqa: F401  (the command modules print sizes with it)

def echo_table(rows, header=None) -> None:
    """Print rows as aligned columns (a header line first when given); key/value listings pass no header."""
    from ..table import render_table

    for line in render_table(header, rows):
        click.echo(line)


def emit_json(obj) -> None:
    """Print `obj` as indented JSON on stdout (plain types; anything else as its str)."""
    click.echo(json.dumps(obj, indent=2, default=str))


def _values(specs: list, key: str, main) -> str:
    """Every value of `key` among the specs, sorted: "4" or, for a mix of 4- and 8-bit modules, "4/8"."""
    return "/".join(str(v) for v in sorted({s[key] for s in specs})) if specs else str(main)


def format_quantization(info: dict, short: bool = False) -> str:
    """A model's precision from its info: "4/8-bit g32" (short) or "4/8-bit affine, group size 32"; float: dtype."""
    if not info.get("bits"):
        return info.get("dtype") or "float"
    specs = info.get("quantization") or []
    bits, group = _values(specs, "bits", info["bits"]), _values(specs, "group_size", info.get("group_size"))
    return f"{bits}-bit g{group}" if short else f"{bits}-bit affine, group size {group}"


def format_count(n: Optional[int]) -> str:
    """Parameter counts: 134.5M, 7.24B."""
    if n is None:
        return "-"
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}" if unit == "B" else f"{n / scale:.1f}{unit}"
    return str(n)


def stats_footer(stats: dict, finish_reason: Optional[str] = None) -> str:
    """The one-line summary under a reply: tokens, decode speed, time to first token (and why it stopped)."""
    parts = [f"{stats.get('generation_tokens', 0)} tokens",
             f"{stats.get('generation_tps', 0.0):.1f} tok/s",
             f"{stats.get('ttft_s', 0.0):.2f}s to first token"]
    if finish_reason == "length":
        parts.append("stopped at --max-tokens")
    elif finish_reason == "repeating":
        parts.append("stopped: repeating")
    return " · ".join(parts)


def echo_footer(stats: dict, finish_reason: Optional[str] = None) -> None:
    """The footer on stderr, dimmed when stderr is a terminal (click strips the style otherwise)."""
    click.echo(click.style(stats_footer(stats, finish_reason), dim=True), err=True)
