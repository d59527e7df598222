"""No code from a model directory ever runs: a planted tokenizer with `auto_map` is refused in one line, even
when a 'y' is typed ahead on stdin (piped or on a terminal), and transformers is always told
trust_remote_code=False."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mlxedge
from mlxedge.errors import MlxedgeError
from tiny_models import add_tiny_tokenizer, build_tiny

SRC = str(Path(__file__).resolve().parent.parent / "src")
CLI = ["-c", "from mlxedge.cli import main; main()"]

EVIL = '''
import os, pathlib
pathlib.Path(os.environ["EVIL_MARKER"]).write_text("ran")
from transformers import PreTrainedTokenizerFast

class EvilTokenizer(PreTrainedTokenizerFast):
    pass
'''


@pytest.fixture(scope="module")
def evil_dir(tmp_path_factory) -> Path:
    path = add_tiny_tokenizer(build_tiny("llama", tmp_path_factory.mktemp("evil") / "model"))
    (path / "tokenization_evil.py").write_text(EVIL)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    config_path.write_text(json.dumps(config))
    return path


def _env(marker: Path) -> dict:
    return dict(os.environ, EVIL_MARKER=str(marker), PYTHONPATH=SRC, HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1")


def test_planted_tokenizer_would_run_without_the_guard(evil_dir, tmp_path):
    """The fixture has teeth: transformers' default (no trust_remote_code) runs the planted code on a typed 'y'."""
    marker = tmp_path / "ran"
    code = f"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained({str(evil_dir)!r})"
    subprocess.run([sys.executable, "-c", code], input="y\n", text=True, capture_output=True, env=_env(marker),
                   timeout=120)
    assert marker.exists()


def test_api_refuses_remote_code_in_one_line(evil_dir, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    model = mlxedge.load(str(evil_dir), dtype="float32")  # the weights are fine; the tokenizer is not
    with pytest.raises(MlxedgeError) as e:
        model.tokenizer.encode("hi")
    message = str(e.value)
    assert "\n" not in message and "auto_map" in message and "tokenization_evil" in message
    assert not marker.exists()


def test_transformers_is_told_trust_remote_code_false(evil_dir, tmp_path, monkeypatch):
    """Even past mlxedge's own check, transformers may not run the code (nor ask about it)."""
    import mlxedge.sources.tokenizers as tok

    marker = tmp_path / "ran"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    monkeypatch.setattr(tok, "refuse_remote_code", lambda path: None)
    seen = {}
    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(spy))
    with pytest.raises(MlxedgeError) as e:
        tok.load_tokenizer(evil_dir)
    assert seen.get("trust_remote_code") is False
    assert "\n" not in str(e.value) and not marker.exists()


def test_cli_with_y_piped_on_stdin(evil_dir, tmp_path):
    marker = tmp_path / "ran"
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, *CLI, "generate", str(evil_dir), "-p", "hi", "-n", "1", "--dtype", "float32"],
                          input="y\ny\n", text=True, capture_output=True, env=_env(marker), timeout=300, cwd=out)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("Loading", "\r"))]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:] and "auto_map" in lines[-1]
    assert not marker.exists() and list(out.iterdir()) == []


def test_cli_on_a_terminal_typing_y(evil_dir, tmp_path):
    import pexpect
    marker = tmp_path / "ran"
    child = pexpect.spawn(sys.executable, [*CLI, "generate", str(evil_dir), "-p", "hi", "-n", "1", "--dtype", "float32"],
                          env=_env(marker), encoding="utf-8", timeout=300)
    child.sendline("y")  # typed ahead, before any prompt could appear
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus not in (0, None)
    assert "error:" in child.before and "auto_map" in child.before and "[y/N]" not in child.before
    assert not marker.exists()
