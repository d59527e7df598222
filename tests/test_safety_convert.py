"""`convert --force` may only replace a model directory, never the user's files, and only once the new one is
complete; temporaries have our name pattern and stale ones are cleaned by the next run; a full disk is one line.

Every refusal is checked to leave the directory exactly as it was (names and bytes).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mlxedge
from mlxedge import fsutil
from mlxedge.errors import MlxedgeError
from tiny_models import add_tiny_tokenizer, build_tiny

CONVERT = importlib.import_module("mlxedge.convert")  # the module (mlxedge.convert is the function)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny llama checkpoint with a tokenizer (what convert needs), float32."""
    directory = build_tiny("llama", tmp_path_factory.mktemp("safety-src") / "tiny")
    return add_tiny_tokenizer(directory)


def snapshot(directory: Path) -> dict:
    """Every file under `directory` (hidden ones too) with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "thesis.tex").write_text("\\chapter{Results} years of work")
    (path / "notes.md").write_text("- do not lose me")
    return path


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def temporaries(directory: Path) -> list:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(fsutil.TMP_PREFIX))


# ------------------------------------------------------------------------------------------------ refusals

def test_force_on_the_current_directory_is_refused_and_deletes_nothing(source, tmp_path, monkeypatch):
    cwd = user_folder(tmp_path / "work")
    before, parent_before = snapshot(cwd), sorted(os.listdir(tmp_path))
    monkeypatch.chdir(cwd)
    with pytest.raises(MlxedgeError) as e:
        mlxedge.convert(source, ".", bits=4, force=True)
    assert one_line(e) == f"refusing to replace {cwd}: it is the current directory"
    (cwd / "sub").mkdir()
    monkeypatch.chdir(cwd / "sub")
    with pytest.raises(MlxedgeError) as e:
        mlxedge.convert(source, "..", bits=4, force=True)
    assert one_line(e) == f"refusing to replace {cwd}: it holds the current directory"
    (cwd / "sub").rmdir()
    assert snapshot(cwd) == before and sorted(os.listdir(tmp_path)) == parent_before


def test_force_on_a_folder_that_is_not_a_model_is_refused(source, tmp_path):
    folder = user_folder(tmp_path / "thesis")
    before = snapshot(folder)
    with pytest.raises(MlxedgeError) as e:
        mlxedge.convert(source, folder, bits=4, force=True)
    message = one_line(e)
    assert message.startswith(f"refusing to replace {folder}: it is not a model directory mlxedge wrote")
    assert "notes.md" in message and "thesis.tex" in message
    assert snapshot(folder) == before and sorted(os.listdir(tmp_path)) == ["thesis"]


def test_force_refuses_root_home_the_source_and_its_parents_links_and_files(source, tmp_path, monkeypatch):
    home = user_folder(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    # "/" is checked through the refusal rule alone, never through convert: a regression in the guard must
    # fail this test, not delete the machine's files (an early run of the old code removed /etc this way)
    assert fsutil.replace_refusal(Path("/"), [source]) == "it is the filesystem root"
    cases = {
        str(home): "it is your home directory",
        str(tmp_path): "it holds your home directory",
        str(source): "it is the source",  # a model directory, but the one being read
        str(source.parent): f"it holds the source {source.resolve()}",
    }
    link = tmp_path / "link"
    link.symlink_to(home)
    cases[str(link)] = "it is a symbolic link"
    (tmp_path / "file.bin").write_bytes(b"\0" * 10)
    cases[str(tmp_path / "file.bin")] = "it is a file, not a model directory"
    for dest, reason in cases.items():
        with pytest.raises(MlxedgeError) as e:
            mlxedge.convert(source, dest, bits=4, force=True)
        assert one_line(e) == f"refusing to replace {os.path.abspath(dest)}: {reason}", dest
    assert (home / "notes.md").is_file() and (source / "config.json").is_file() and link.is_symlink()


def test_without_force_an_existing_dest_is_refused_with_the_right_hint(source, tmp_path):
    model = tmp_path / "model"
    mlxedge.convert(source, model, bits=8)
    with pytest.raises(MlxedgeError) as e:
        mlxedge.convert(source, model, bits=4)
    assert one_line(e) == f"{model} already exists; choose another destination or pass force=True (--force) to replace it"
    folder = user_folder(tmp_path / "folder")
    with pytest.raises(MlxedgeError) as e:
        mlxedge.convert(source, folder, bits=4)
    assert one_line(e).startswith(f"{folder} already exists and force=True (--force) would not replace it: "
                                  "it is not a model directory mlxedge wrote")


def test_a_model_directory_with_a_users_file_added_is_refused(source, tmp_path):
    model = tmp_path / "model"
    mlxedge.convert(source, model, bits=8)
    (model / "my-eval-notes.txt").write_text("results")
    before = snapshot(model)
    with pytest.raises(MlxedgeError) as e:
        mlxedge.convert(source, model, bits=4, force=True)
    assert one_line(e) == (f"refusing to replace {model}: it holds files mlxedge did not write (my-eval-notes.txt); "
                           "move them out or choose another destination")
    assert snapshot(model) == before


# ------------------------------------------------------------------------------------------------ replacing

def test_marker_lists_exactly_what_convert_wrote(source, tmp_path):
    model = tmp_path / "model"
    mlxedge.convert(source, model, bits=4)
    marker = json.loads((model / fsutil.MARKER).read_text())
    assert marker["format"] == "mlxedge-model" and marker["bits"] == 4 and marker["source"] == str(source)
    assert sorted(marker["files"]) == sorted(p for p in os.listdir(model) if p != fsutil.MARKER)
    assert {"config.json", "model.safetensors"} <= set(marker["files"])
    assert fsutil.replace_refusal(model) is None


def test_force_replaces_an_mlxedge_model_only_after_the_new_one_is_complete(source, tmp_path, monkeypatch):
    model = tmp_path / "model"
    mlxedge.convert(source, model, bits=8)
    old = snapshot(model)
    seen = {}
    real_replace = fsutil.replace_dir

    def spy(new, dest, sources=()):
        seen["old_intact"] = snapshot(Path(dest)) == old  # the old one untouched while the new one was written
        seen["new_complete"] = (Path(new) / fsutil.MARKER).is_file() and (Path(new) / "tokenizer.json").is_file()
        return real_replace(new, dest, sources)

    monkeypatch.setattr(fsutil, "replace_dir", spy)
    summary = mlxedge.convert(source, model, bits=4, force=True)
    assert seen == {"old_intact": True, "new_complete": True}
    assert summary["bits"] == 4 and json.loads((model / "config.json").read_text())["quantization"]["bits"] == 4
    assert sorted(os.listdir(tmp_path)) == ["model"]  # neither the new temp nor the old one is left


def test_a_failing_forced_convert_leaves_the_old_model_untouched(source, tmp_path, monkeypatch):
    model = tmp_path / "model"
    mlxedge.convert(source, model, bits=8)
    old = snapshot(model)

    def broken(directory, checkpoint):
        raise MlxedgeError("tokenizer exploded")

    monkeypatch.setattr(CONVERT, "_write_tokenizer", broken)
    with pytest.raises(MlxedgeError, match="tokenizer exploded"):
        mlxedge.convert(source, model, bits=4, force=True)
    assert snapshot(model) == old and sorted(os.listdir(tmp_path)) == ["model"]


def test_the_old_directory_comes_back_when_the_final_rename_fails(tmp_path, monkeypatch):
    dest, new = tmp_path / "dest", tmp_path / "new"
    for d, text in ((dest, "old"), (new, "new")):
        d.mkdir()
        (d / "config.json").write_text(text)
        (d / "model.safetensors").write_text(text)
    real_rename, calls = os.rename, []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the old one is aside; moving the new one in fails
            raise OSError(5, "Input/output error")
        return real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        fsutil.replace_dir(new, dest)
    assert (dest / "config.json").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["dest", "new"]


def test_force_replaces_a_plain_model_directory_but_not_one_with_other_files(source, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (plain / name).write_text("{}")
    assert fsutil.replace_refusal(plain) is None
    (plain / "README.md").write_text("my notes about this model")
    assert fsutil.replace_refusal(plain).startswith("it is not a model directory mlxedge wrote (it holds README.md)")
    (plain / "README.md").unlink()
    (plain / "runs").mkdir()
    assert "runs" in fsutil.replace_refusal(plain)
    (plain / "runs").rmdir()
    mlxedge.convert(source, plain, bits=4, force=True)
    assert (plain / fsutil.MARKER).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    mlxedge.convert(source, empty, bits=4, force=True)
    assert (empty / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ temporaries

def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_ours_are_cleaned_and_nothing_else(source, tmp_path):
    now = int(time.time())
    dead, alive = dead_pid(), os.getppid()
    stale = [f".mlxedge-tmp-{dead}-{now}-convert-abcd1234", f".mlxedge-tmp-{alive}-{now - 7 * 3600}-fetch-ab12cd34"]
    kept = [f".mlxedge-tmp-{alive}-{now}-convert-live0001", ".out.x7f3k2", ".fetch-smollm2-x1", "notes.md",
            ".mlxedge-tmp-notes", ".mlxedge-tmp-123-abc-convert-x"]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "payload").write_text("x")
    (tmp_path / f".mlxedge-tmp-{dead}-{now}-old-file0001").write_text("a file temporary")
    stale.append(f".mlxedge-tmp-{dead}-{now}-old-file0001")
    mlxedge.convert(source, tmp_path / "out", bits=4)
    left = set(os.listdir(tmp_path))
    assert left == set(kept) | {"out"}
    assert all((tmp_path / name / "payload").is_file() for name in kept)


def test_temporary_names_carry_pid_time_and_purpose(tmp_path):
    with fsutil.temp_dir(tmp_path, "convert") as directory:
        assert directory.is_dir()
    pid, created, purpose = directory.name[len(fsutil.TMP_PREFIX):].split("-")[:3]
    assert int(pid) == os.getpid() and abs(int(created) - time.time()) < 60 and purpose == "convert"
    assert not fsutil.is_stale(directory.name)  # ours, alive


def test_a_reused_pid_does_not_keep_a_temporary_alive(monkeypatch):
    me = os.getpid()
    started = fsutil._start_time(me)
    if started is None:
        pytest.skip("no /proc here: process start times cannot be read (the age rule applies instead)")
    before_we_started = int(started) - 60  # a temporary "of ours" made before this process existed: PID reuse
    assert fsutil.is_stale(f".mlxedge-tmp-{me}-{before_we_started}-convert-abcd1234")
    assert not fsutil.is_stale(f".mlxedge-tmp-{me}-{int(time.time())}-convert-abcd1234")
    monkeypatch.setattr(fsutil, "_start_time", lambda pid: None)  # where start times are unknown: by age
    assert not fsutil.is_stale(f".mlxedge-tmp-{me}-{before_we_started}-convert-abcd1234")
    assert fsutil.is_stale(f".mlxedge-tmp-{me}-{int(time.time()) - fsutil.STALE_AFTER_S - 5}-convert-abcd1234")


# ------------------------------------------------------------------------------------------------ disk full

@pytest.fixture()
def small_fs(tmp_path):
    """A 256 KB tmpfs (we are root in the test box); skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip() or proc.returncode}); "
                    "the monkeypatched disk-full test still runs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_is_refused_up_front_with_sizes(source, small_fs):
    with pytest.raises(MlxedgeError) as e:
        mlxedge.convert(source, small_fs / "out", bits=None)
    message = one_line(e)
    assert message.startswith(f"no space left on {small_fs} to write {small_fs / 'out'}: ")
    needed, free = [float(x.split()[0]) for x in message.split(": ", 1)[1].split(";")[0].split(", ")]
    assert needed > 4 and 0 < free <= 0.3  # 4 MiB of room for tokenizer files + the weights; a 256 KB disk
    assert os.listdir(small_fs) == []


def test_disk_filling_up_during_the_write_is_one_line_and_leaves_nothing(source, small_fs, monkeypatch):
    # the disk fills up after the up-front check (another writer): MLX's own write fails mid-file
    monkeypatch.setattr(fsutil, "check_free_space", lambda *args: None)
    with pytest.raises(MlxedgeError) as e:  # ~420 KB of float32 weights on a 256 KB disk
        mlxedge.convert(source, small_fs / "out", bits=None, dtype="float32")
    message = one_line(e)
    assert message.startswith(f"no space left on {small_fs} to write {small_fs / 'out'}: ") and "MB needed" in message
    assert isinstance(e.value.__cause__, RuntimeError) and "Unable to write" in str(e.value.__cause__)
    assert os.listdir(small_fs) == []


def test_enospc_from_any_writer_maps_to_the_disk_full_line(source, tmp_path, monkeypatch):
    import errno

    def full(directory, checkpoint):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / "tokenizer.json"))

    monkeypatch.setattr(CONVERT, "_write_tokenizer", full)
    with pytest.raises(MlxedgeError) as e:
        mlxedge.convert(source, tmp_path / "out", bits=4)
    assert one_line(e).startswith(f"no space left on {fsutil.mount_point(tmp_path)} to write {tmp_path / 'out'}: ")
    assert os.listdir(tmp_path) == []


def test_a_ctrl_c_at_any_point_of_a_temporary_leaves_nothing(tmp_path, monkeypatch):
    """The temporary is named first and created inside the guard: a Ctrl-C right after the mkdir (before
    any caller code could register it for cleanup) or inside the block leaves no directory behind."""
    with pytest.raises(KeyboardInterrupt):
        with fsutil.temp_dir(tmp_path, "convert", private=False):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []

    real_mkdir = Path.mkdir

    def mkdir_then_ctrl_c(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if self.name.startswith(fsutil.TMP_PREFIX):
            raise KeyboardInterrupt  # the signal lands as mkdir returns

    monkeypatch.setattr(Path, "mkdir", mkdir_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        with fsutil.temp_dir(tmp_path, "fetch", always=True):
            pass
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    with fsutil.temp_dir(tmp_path, "fetch", always=True) as work:
        (work / "part").write_text("x")
    assert list(tmp_path.iterdir()) == []  # `always`: gone after a normal end too
    with fsutil.temp_dir(tmp_path, "convert", private=False) as kept:
        pass
    assert kept.is_dir() and (kept.stat().st_mode & 0o777) == 0o777 & ~_current_umask()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_ctrl_c_between_the_two_renames_of_a_replace_puts_the_old_directory_back(tmp_path, monkeypatch):
    """replace_dir moves dest aside, then new into place: interrupted between the two, dest is restored."""
    dest, new = tmp_path / "model", tmp_path / "new"
    for d, text in ((dest, "old"), (new, "new")):
        d.mkdir()
        (d / "config.json").write_text(text)
        fsutil.write_marker(d, tmp_path / "src", {})
    real_rename, calls = os.rename, []

    def rename_then_ctrl_c(src, dst):
        real_rename(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            raise KeyboardInterrupt  # lands right after dest was moved aside

    monkeypatch.setattr(os, "rename", rename_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        fsutil.replace_dir(new, dest)
    monkeypatch.undo()
    assert (dest / "config.json").read_text() == "old"
    assert (new / "config.json").read_text() == "new"
