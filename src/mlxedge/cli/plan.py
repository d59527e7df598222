"""`mlxedge plan`: how much memory MODEL would take at given settings, against this device's budget."""

from __future__ import annotations

from typing import Optional

import click

from .errors import handles_errors
from .options import apply_options_of, dtype_option, quantization_options
from .model_loading import resolve_source
from .output import echo_table, emit_json, format_bytes


def plan_rows(plan: dict) -> list:
    """(label, value) rows of a plan dict, for the table."""
    settings = plan.get("settings") or {}
    bits = settings.get("bits")
    stored = ((plan.get("breakdown") or {}).get("weights") or {}).get("stored_quantized")
    rows = [
        ("bits", str(bits) if bits is not None else "as stored" if stored else "float"),
        ("group size", str(settings.get("group_size", "-"))),
        ("context length", str(settings.get("context_length", "-"))),
        ("weights", format_bytes(plan["weight_bytes"])),
        ("KV cache", format_bytes(plan["kv_cache_bytes"])),
        ("activations", format_bytes(plan["activation_bytes"])),
        ("runtime overhead", format_bytes(plan["overhead_bytes"])),
        ("total", format_bytes(plan["total_bytes"])),
        ("budget", format_bytes(plan["budget_bytes"]) + (f" ({plan['budget_source']})"
                                                         if plan.get("budget_source") else "")),
        ("fits", "yes" if plan["fits"] else "no"),
    ]
    if plan.get("note"):
        rows.append(("note", plan["note"]))
    return rows


@click.command("plan")
@click.argument("model")
@apply_options_of(quantization_options(bits_help="Quantize while loading (16 = keep float). Default: as stored.")[:2])
@dtype_option("dtype of unquantized tensors (default: the loader's for this device).")
@click.option("--context-length", type=click.IntRange(min=1), default=None,
              help="Tokens of KV cache to plan for (default: the model's, capped by the runtime).")
@click.option("--memory-budget", default=None, metavar="SIZE",
              help="Budget to check against, e.g. 6GB or 512MiB (default: what this device allows).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@handles_errors
def plan_command(model: str, bits: Optional[str], group_size: Optional[int], dtype: Optional[str],
                 context_length: Optional[int], memory_budget: Optional[str], as_json: bool) -> None:
    """Memory MODEL would need (weights, KV cache, activations) and whether it fits; reads headers only."""
    import mlxedge

    path = resolve_source(model, quiet=as_json)
    plan = mlxedge.plan(path, bits=None if bits in (None, "16") else int(bits), group_size=group_size,
                        dtype=dtype, context_length=context_length, memory_budget=memory_budget)
    plan = plan.to_dict() if hasattr(plan, "to_dict") else dict(plan)
    if as_json:
        emit_json(plan)
        return
    echo_table(plan_rows(plan))
