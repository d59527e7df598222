"""The one table renderer of every front-end (list, info, plan, bench, eval): aligned columns or markdown."""

from __future__ import annotations

from typing import Optional, Sequence


def render_table(header: Optional[Sequence], rows: Sequence[Sequence], markdown: bool = False) -> list:
    """Table lines: aligned plain-text columns (no header line when header is None), or a markdown pipe table."""
    rows = [[str(c) for c in r] for r in rows]
    if markdown:
        header = header or [""] * (len(rows[0]) if rows else 0)
        return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
                + ["| " + " | ".join(r) + " |" for r in rows])
    lines = ([list(map(str, header))] if header is not None else []) + rows
    if not lines:
        return []
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines]
