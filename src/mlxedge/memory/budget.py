"""How much memory a model process may use on this device: one probe per platform, or the user's figure.

- macOS: Metal's recommended working set (`mx.device_info()`), else 75% of total memory.
- Linux: what this process holds plus what it could still get: the smaller of MemAvailable and the tightest
  memory cgroup's headroom (v2 `memory.max`, v1 `memory.limit_in_bytes`, walking up to the mount root).
- an override ("6GB") wins over any probe.

Probes return raw facts as plain dicts, so tests feed fakes (`device_budget(probe=...)`, `linux_probe(root)`).
Imports only the standard library (mlx on macOS, psutil where installed, both on first use).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import MlxedgeError
from .units import parse_size


def _proc_status_kb(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc VmRSS; psutil; macOS `ps`): the budget counts it."""
    rss = _proc_status_kb("VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil  # optional

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(os.getpid())], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) * 1024


@dataclass(frozen=True)
class Budget:
    """The bytes a model process may use in total, and where that figure came from."""

    bytes: int
    source: str  # "override", "metal recommended working set", "MemAvailable", "cgroup memory.max", ...
    details: dict = field(default_factory=dict)


_UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as 9223372036854771712


def _parse_meminfo(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1)
    return out


def _parse_stat(text: str) -> dict:
    """cgroup memory.stat: "key value" lines."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text()
    except OSError:
        return None


def _cgroup_dirs(root: Path, proc_cgroup: str) -> list:
    """Candidate memory-cgroup directories for this process, innermost first: (version, dir)."""
    dirs = []
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, rel = parts
        rel = rel.strip().lstrip("/")
        if hier == "0" and controllers == "":
            base, version = root / "sys/fs/cgroup", 2
        elif "memory" in controllers.split(","):
            base, version = root / "sys/fs/cgroup/memory", 1
        else:
            continue
        # Walk from our own cgroup up to the mount root: a parent's limit binds us too. Inside a container the
        # mount root *is* our cgroup and the recorded path does not exist; the walk ends at the root anyway.
        path = Path(rel) if rel else None
        while path is not None:
            dirs.append((version, base / path))
            path = path.parent if str(path.parent) not in (".", "") else None
        dirs.append((version, base))
    return dirs


def linux_probe(root: Path = Path("/")) -> dict:
    """Raw Linux facts for `device_budget`: /proc/meminfo text and the tightest memory cgroup's files.

    `root` lets tests point the probe at a fake filesystem.
    """
    facts: dict[str, Any] = {"platform": "linux", "meminfo": _read_text(root / "proc/meminfo") or ""}
    proc_cgroup = _read_text(root / "proc/self/cgroup") or ""
    best = None
    for version, d in _cgroup_dirs(root, proc_cgroup):
        names = ("memory.max", "memory.current") if version == 2 else ("memory.limit_in_bytes", "memory.usage_in_bytes")
        limit_text = _read_text(d / names[0])
        if limit_text is None:
            continue
        limit = _parse_cgroup_limit(limit_text)
        if limit is None:
            continue
        if best is None or limit < best["limit"]:
            usage_text = _read_text(d / names[1])
            best = {"version": version, "dir": str(d), "limit": limit,
                    "usage": int(usage_text.strip()) if usage_text and usage_text.strip().isdigit() else None,
                    "stat": _read_text(d / "memory.stat") or ""}
    facts["cgroup"] = best
    return facts


def _parse_cgroup_limit(text: str) -> Optional[int]:
    text = text.strip()
    if text == "max" or not text.isdigit():
        return None
    value = int(text)
    return None if value >= _UNLIMITED else value


def _darwin_probe() -> dict:
    import mlx.core as mx

    info = {}
    if mx.metal.is_available():
        info = dict(mx.device_info())
    total = None
    try:
        total = int(subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True,
                                   check=True).stdout.strip())
    except (OSError, ValueError, subprocess.CalledProcessError):
        pass
    return {"platform": "darwin", "device_info": info, "memory_size": total}


def system_probe() -> dict:
    """The real probe for this machine (see `device_budget`)."""
    if sys.platform == "darwin":
        facts = _darwin_probe()
    elif sys.platform.startswith("linux"):
        facts = linux_probe()
    else:
        facts = {"platform": sys.platform}
    facts["rss"] = current_rss_bytes()
    return facts


def device_budget(override=None, *, probe: Optional[Callable[[], dict]] = None) -> Budget:
    """The memory a model process may use in total on this device.

    override: bytes or a size string ("6GB"); wins over any probe.
    probe:    returns raw facts (default `system_probe`); tests pass fakes:
              {"platform": "darwin", "device_info": {"memory_size": .., "max_recommended_working_set_size": ..}}
              {"platform": "linux", "meminfo": "<text of /proc/meminfo>", "rss": <bytes this process holds>,
               "cgroup": None | {"version": 1|2, "limit": bytes, "usage": bytes|None, "stat": "<memory.stat>"}}

    macOS: Metal's recommended working set (what the GPU may keep resident), else 75% of total memory.
    Linux: what the process holds now plus what it could still get: the smaller of MemAvailable and the
    cgroup headroom (limit − usage + reclaimable page cache).
    """
    if override is not None:
        return Budget(parse_size(override), "override")
    facts = (probe or system_probe)()
    platform = facts.get("platform", "")
    if platform == "darwin":
        info = facts.get("device_info") or {}
        total = info.get("memory_size") or facts.get("memory_size")
        recommended = info.get("max_recommended_working_set_size")
        if recommended:
            value = min(int(recommended), int(total)) if total else int(recommended)
            return Budget(value, "metal recommended working set", {"memory_size": total, "recommended": recommended})
        if total:
            return Budget(int(total) * 3 // 4, "75% of total memory", {"memory_size": total})
        raise MlxedgeError("cannot tell how much memory this Mac has; pass memory_budget= (e.g. '6GB').")
    if platform == "linux":
        rss = int(facts.get("rss") or 0)
        meminfo = _parse_meminfo(facts.get("meminfo") or "")
        available = meminfo.get("MemAvailable")
        if available is None and "MemFree" in meminfo:
            available = meminfo["MemFree"] + meminfo.get("Cached", 0)
        details = {"MemAvailable": available, "rss": rss}
        candidates = []
        if available is not None:
            candidates.append((available + rss, "MemAvailable"))
        cg = facts.get("cgroup")
        if cg and cg.get("limit"):
            limit = int(cg["limit"])
            usage = cg.get("usage")
            stat = _parse_stat(cg.get("stat") or "")
            reclaimable = stat.get("inactive_file", stat.get("total_inactive_file", 0))
            headroom = limit if usage is None else max(0, limit - int(usage) + reclaimable)
            name = "cgroup memory.max" if cg.get("version") == 2 else "cgroup memory.limit_in_bytes"
            details.update(cgroup_limit=limit, cgroup_usage=usage)
            candidates.append((min(limit, headroom + rss), name))
        if not candidates:
            raise MlxedgeError("cannot read /proc/meminfo to size the memory budget; pass memory_budget= (e.g. '6GB').")
        value, source = min(candidates)
        return Budget(int(value), source, details)
    try:
        import psutil

        vm = psutil.virtual_memory()
        return Budget(int(vm.available) + int(facts.get("rss") or 0), "available memory (psutil)")
    except ImportError:
        raise MlxedgeError(f"cannot size the memory budget on {platform!r}; pass memory_budget= (e.g. '6GB').") from None
