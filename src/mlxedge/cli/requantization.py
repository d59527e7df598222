"""The measured cost of putting weights stored quantized onto a coarser grid, as convert, bench and eval print it.

Such a re-quantization is refused unless --allow-requantize is given (quant.requantize); with it, each
command measures what it cost — mean KL divergence and top-1 agreement of the re-quantized model against
the source as stored, on a short stretch of the built-in text — and prints one line per variant.
"""

from __future__ import annotations

from typing import Optional

from .model_loading import load_model
from .progress import progress_bar


def cost_line(count: int, cost: dict, label: Optional[str] = None) -> str:
    """E.g. `q4 g64: re-quantized 210 modules onto a coarser grid; measured cost against the source on 255
    tokens of built-in text: mean KLD 0.4123, top-1 agreement 61.2%`."""
    return ((f"{label}: " if label else "") +
            f"re-quantized {count} modules onto a coarser grid; measured cost against the source on "
            f"{cost['tokens_scored']} tokens of {cost.get('text', 'built-in text')}: mean KLD {cost['kld_mean']:.4f}, "
            f"top-1 agreement {100 * cost['top1_agreement']:.1f}%")


def measure_cost(source: str, quiet: bool, model=None, **load) -> dict:
    """KLD and top-1 agreement of `model` (else `source` loaded with `load`) against `source` as stored."""
    from ..evaluate import requantization_cost

    reference = load_model(source, quiet=quiet)
    requantized = model if model is not None else load_model(source, quiet=quiet, **load)
    with progress_bar("Measuring the cost", unit="forward passes", enabled=not quiet) as progress:
        return requantization_cost(reference, requantized, progress=progress)


__all__ = ["cost_line", "measure_cost"]
