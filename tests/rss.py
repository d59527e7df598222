"""Peak resident memory of this process or of a finished child, for tests and the measuring scripts.

Measurement helpers only: the runtime itself needs just the current RSS (memory.budget.current_rss_bytes),
so these live with the tests; scripts/ import them from here (they put tests/ on sys.path).
"""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """Highest resident set size of this process so far (VmHWM on Linux; getrusage elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return rusage_maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def rusage_maxrss_bytes(ru_maxrss: int) -> int:
    """ru_maxrss (from os.wait4 / getrusage) in bytes: KiB on Linux, bytes on macOS."""
    return int(ru_maxrss) if sys.platform == "darwin" else int(ru_maxrss) * 1024
