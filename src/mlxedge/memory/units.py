"""Byte sizes as people write and read them: "6GB" / "512MiB" in, "1.23 GB" out.

The one place sizes are parsed and formatted; the CLI, the plan and the scripts all print through
`format_bytes`, so a figure reads the way `--memory-budget` parses it (GB = 10^9 bytes).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Optional

from ..errors import MlxedgeError

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 10**3, "kib": 1 << 10,
    "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
    "g": 1 << 30, "gb": 10**9, "gib": 1 << 30,
    "t": 1 << 40, "tb": 10**12, "tib": 1 << 40,
}
MAX_SIZE = 2**63 - 1  # what the OS and MLX can be told (a signed 64-bit byte count)
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value) -> int:
    """Bytes from an int or a string such as "6GB" (10^9), "6GiB"/"6G" (2^30), "512MiB", "1.5 GB", "4096".

    Decimal units (KB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB, GiB; bare K, M, G) powers of
    1024. Raises MlxedgeError on anything else, or on a size that is not positive.
    """
    if isinstance(value, bool):
        raise MlxedgeError(f"memory size {value!r} is not a size; use bytes or a string like '6GB' or '512MiB'.")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float) and math.isfinite(value):
        n = int(value)
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)) and m.group(2).lower() in _UNITS:
        n = int(Fraction(m.group(1)) * _UNITS[m.group(2).lower()])  # exact: no float overflow or rounding
    else:
        raise MlxedgeError(f"memory size {value!r} is not a size; use bytes or a string like '6GB' or '512MiB'.")
    if n <= 0:
        raise MlxedgeError(f"memory size {value!r} must be more than zero bytes.")
    if n > MAX_SIZE:
        raise MlxedgeError(f"memory size {str(value)[:40]!r} is more than any machine has (the limit is "
                           f"{format_bytes(MAX_SIZE)}); use a size like '6GB'.")
    return n


def format_bytes(n: Optional[int]) -> str:
    """Bytes in decimal units ("1.23 GB", "512.0 MB"), the way `parse_size` reads "GB"; None (unknown): "-"."""
    if n is None:
        return "-"
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GB" else f"{n / scale:.1f} {unit}"
    return f"{n} B"
