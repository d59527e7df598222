"""English prose every Python ships with (pydoc's topic texts, ≈465k characters): the text mlxedge measures on.

One source for every use: evaluation reads it in key order, benchmarks cut their prompts from it, and the
calibration of data-aware quantization reads it in reverse key order (so it does not score on what it saw).
"""

from __future__ import annotations


def builtin_text(reverse: bool = False) -> str:
    """pydoc's topic texts joined by newlines, in key order (reverse=True: reverse key order)."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics, reverse=reverse))
