"""Safe writes of mlxedge's outputs: our temporary names, cleaning the ones a killed run left behind, what
`--force` may replace, free-space checks, and the atomic directory swap.

- Temporaries are named `.mlxedge-tmp-<pid>-<unix time>-<purpose>-<random>` and made beside their final
  place (same filesystem, so the final step is a rename). `clean_stale_temps(dir)` removes only entries of
  that pattern whose process is gone (PID dead, or reused by a later process; without /proc: older than
  STALE_AFTER_S); nothing else is ever touched.
- `replace_refusal(dest, sources)` says why `dest` must not be replaced (or None). Never replaced: a
  symbolic link, a file, `/`, the home directory or a parent of it, the current directory or a parent of it
  (so `.` and `..`), the source or a directory holding it. Replaced: an empty directory; a directory
  mlxedge wrote (its MARKER lists the files it wrote and the directory holds nothing else); a directory
  that is recognisably a model (config.json and *.safetensors, every entry a known model file).
- `replace_dir(new, dest)` swaps a complete new directory in: the old one is renamed aside (a temporary
  name), the new one renamed into place, and only then the old one deleted; a failure puts the old back.
- `check_free_space(dir, needed, dest)` and `no_space_error(...)` give the one-line disk-full message.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterable, Iterator, List, Optional

from .errors import MlxedgeError

TMP_PREFIX = ".mlxedge-tmp-"
_TMP_NAME = re.compile(r"^\.mlxedge-tmp-(\d+)-(\d+)-[a-z0-9]+-")
STALE_AFTER_S = 24 * 3600  # where a PID's start time cannot be read: this old is stale even if the PID lives

MARKER = ".mlxedge-model.json"  # written into every directory mlxedge convert produces
MARKER_FORMAT = "mlxedge-model"
# a directory without our marker is still replaceable when it holds only these (an mlx-lm / HF model)
MODEL_FILE_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                       "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                       "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                       MARKER)


# ------------------------------------------------------------------------------------------------ temporaries

def temp_name(purpose: str) -> str:
    """A fresh temporary name of ours (not created): `.mlxedge-tmp-<pid>-<time>-<purpose>-<random>`."""
    return f"{TMP_PREFIX}{os.getpid()}-{int(time.time())}-{purpose}-{secrets.token_hex(4)}"


@contextmanager
def temp_dir(parent: Path, purpose: str, *, private: bool = True, always: bool = False) -> Iterator[Path]:
    """Our temporary directory inside `parent` (created if needed), removed if the block raises anything
    (Ctrl-C included), or whenever it ends with `always`.

    It is named before it exists and created inside the guard, so an interrupt at any moment — even between
    the mkdir and the caller's own `try` — cannot leave it behind. `private`: mode 0700 (downloads); else an
    ordinary directory (the umask's mode), e.g. one that becomes the user's model directory."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / temp_name(purpose)
    try:
        path.mkdir(mode=0o700 if private else 0o777)
        yield path
    except BaseException:
        remove_path(path)
        raise
    if always:
        remove_path(path)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def _start_time(pid: int) -> Optional[float]:
    """When process `pid` started (unix time), from /proc on Linux; None where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, counted after the command name
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def is_stale(name: str, now: Optional[float] = None, max_age_s: float = STALE_AFTER_S) -> bool:
    """Whether `name` is a temporary of ours left by a process that is gone: its PID is dead, or the PID now
    belongs to a process started after the temporary was made (reused); where start times cannot be read,
    a temporary older than max_age_s counts as left behind."""
    match = _TMP_NAME.match(name)
    if match is None:
        return False
    pid, created = int(match[1]), int(match[2])
    if pid != os.getpid() and not _pid_alive(pid):
        return True
    started = _start_time(pid)
    if started is not None:
        return started > created + 2  # 2 s: the start time is read in clock ticks, the name in whole seconds
    return (time.time() if now is None else now) - created > max_age_s


def remove_path(path: Path) -> None:
    """Delete a file, a link (never its target) or a directory tree; missing is fine."""
    path = Path(path)
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)
    except FileNotFoundError:
        pass


def clean_stale_temps(directory: Path, max_age_s: float = STALE_AFTER_S) -> List[Path]:
    """Remove stale temporaries of ours (see `is_stale`) directly inside `directory`; returns what went."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for name in names:
        if is_stale(name, max_age_s=max_age_s):
            try:
                remove_path(Path(directory) / name)
                removed.append(Path(directory) / name)
            except OSError:
                pass  # another run may be removing it too; never fail the real work over litter
    return removed


# ------------------------------------------------------------------------------------------------ replacing

def absolute(path) -> Path:
    """`path` made absolute without resolving symbolic links (so a link stays recognisable as one)."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def write_marker(directory: Path, source: str, extra: Optional[dict] = None) -> None:
    """Record in `directory` that mlxedge wrote it: version, source, time and the files it holds."""
    try:
        from importlib.metadata import version
        mlxedge_version = version("mlxedge")
    except Exception:  # running from a source tree
        mlxedge_version = "unknown"
    files = sorted(name for name in os.listdir(directory) if name != MARKER)
    marker = {"format": MARKER_FORMAT, "mlxedge_version": mlxedge_version, "source": str(source),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files, **(extra or {})}
    (Path(directory) / MARKER).write_text(json.dumps(marker, indent=2))


def _marker_files(directory: Path) -> Optional[set]:
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT or not isinstance(marker.get("files"), list):
        return None
    return {str(f) for f in marker["files"]} | {MARKER}


def _content_refusal(directory: Path) -> Optional[str]:
    try:
        entries = sorted(os.listdir(directory))
    except OSError as exc:
        return f"it cannot be read ({exc.strerror})"
    if not entries:
        return None
    written = _marker_files(directory)
    if written is not None:
        foreign = [e for e in entries if e not in written]
        if foreign:
            return (f"it holds files mlxedge did not write ({', '.join(foreign[:3])}"
                    f"{', ...' if len(foreign) > 3 else ''}); move them out or choose another destination")
        return None
    unknown = [e for e in entries
               if (directory / e).is_dir() or not any(fnmatch(e, p) for p in MODEL_FILE_PATTERNS)]
    has_model = "config.json" in entries and any(fnmatch(e, "*.safetensors") for e in entries)
    if not has_model or unknown:
        detail = f" (it holds {', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''})" if unknown else ""
        return (f"it is not a model directory mlxedge wrote{detail}; --force only replaces those "
                "(choose another destination or delete it yourself)")
    return None


def replace_refusal(dest, sources: Iterable = ()) -> Optional[str]:
    """Why the existing `dest` must not be replaced by a new model directory; None when it may be."""
    dest = absolute(dest)
    if dest.is_symlink():
        return "it is a symbolic link"
    real = dest.resolve()
    if real == Path(real.anchor):
        return "it is the filesystem root"
    for where, this, holds in ((Path.home, "it is your home directory", "it holds your home directory"),
                               (Path.cwd, "it is the current directory", "it holds the current directory")):
        try:
            protected = where().resolve()
        except (OSError, RuntimeError):  # no HOME / a deleted working directory: nothing to protect there
            continue
        if _inside(protected, real):
            return this if real == protected else holds
    for source in sources:
        if source is None or not absolute(source).exists():
            continue
        src = absolute(source).resolve()
        if _inside(src, real):
            return "it is the source" if src == real else f"it holds the source {src}"
    if not real.is_dir():
        return "it is a file, not a model directory"
    return _content_refusal(real)


def refuse_existing(dest, force: bool, sources: Iterable = (), flag: str = "--force") -> None:
    """Raise one line when `dest` exists and must not (or may not, without force) be replaced."""
    dest = absolute(dest)
    if not (dest.exists() or dest.is_symlink()):
        return
    reason = replace_refusal(dest, sources)
    if not force:
        if reason is None:
            raise MlxedgeError(f"{dest} already exists; choose another destination or pass {flag} to replace it")
        raise MlxedgeError(f"{dest} already exists and {flag} would not replace it: {reason}")
    if reason is not None:
        raise MlxedgeError(f"refusing to replace {dest}: {reason}")


def replace_dir(new: Path, dest, sources: Iterable = ()) -> None:
    """Move the complete directory `new` to `dest` (same filesystem); an existing `dest` is removed only
    after the new one is in place, and put back if the swap fails. Rechecks `replace_refusal` first."""
    dest = absolute(dest)
    if not (dest.exists() or dest.is_symlink()):
        os.rename(new, dest)
        return
    refuse_existing(dest, True, sources)
    aside = dest.parent / temp_name("old")
    try:  # both renames inside: a Ctrl-C between them finds dest gone and aside present, and puts it back
        os.rename(dest, aside)
        os.rename(new, dest)
    except BaseException:
        if not os.path.lexists(dest) and os.path.lexists(aside):
            os.rename(aside, dest)
        raise
    remove_path(aside)


# ------------------------------------------------------------------------------------------------ free space

def _existing(path) -> Path:
    path = absolute(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path) -> int:
    """Free bytes (for an unprivileged user) on the filesystem that holds, or would hold, `path`."""
    return shutil.disk_usage(_existing(path)).free


def mount_point(path) -> Path:
    """The mount point of the filesystem holding `path` (the nearest existing ancestor's)."""
    path = _existing(path).resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _mb(n: int) -> str:
    return f"{max(0, n) / 1e6:.1f} MB" if n < 10e6 else f"{n / 1e6:.0f} MB"


def no_space_error(directory, needed: int, dest) -> MlxedgeError:
    """The one-line disk-full error: where, how much is needed and how much is free."""
    try:
        free = free_bytes(directory)
    except OSError:
        free = 0
    return MlxedgeError(f"no space left on {mount_point(directory)} to write {absolute(dest)}: "
                        f"{_mb(needed)} needed, {_mb(free)} free; free some space or choose another destination")


def check_free_space(directory, needed: int, dest) -> None:
    """Raise the disk-full error up front when `directory`'s filesystem has less than `needed` bytes free."""
    try:
        free = free_bytes(directory)
    except OSError:
        return  # cannot tell: let the write itself report
    if free < needed:
        raise no_space_error(directory, needed, dest)


def is_no_space(exc: BaseException) -> bool:
    """Whether a write failure means the disk is full: ENOSPC/EDQUOT, or MLX's "[write] Unable to write"."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, RuntimeError) and "Unable to write" in str(exc)
