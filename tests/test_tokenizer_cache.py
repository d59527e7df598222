"""The GGUF tokenizer: built without torch exactly as transformers builds it, cached, rebuilt when the file changes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlxedge.sources import tokenizer_cache

TEXTS = ["Hello, world!", "안녕하세요, 세계 🙂 — naïve café", "def f(x):\n    return x ** 2  # square\n",
         "<|im_start|>user\nWhat is 2+2?<|im_end|>\n", "   leading spaces and\ttabs\n\n"]

CHILD = r"""
import json, sys
sys.modules["torch"] = None  # as the mlxedge program does
from mlxedge.sources.tokenizer_cache import load_gguf_tokenizer
tok = load_gguf_tokenizer(sys.argv[1])
texts = json.loads(sys.argv[2])
print(json.dumps({"ids": [tok.encode(t) for t in texts], "decoded": [tok.decode(tok.encode(t)) for t in texts],
                  "special": [tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token], "size": len(tok),
                  "torch": sys.modules.get("torch") is not None}))
"""


def _facts(tok) -> dict:
    return {"ids": [tok.encode(t) for t in TEXTS], "decoded": [tok.decode(tok.encode(t)) for t in TEXTS],
            "special": [tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token], "size": len(tok)}


def _child(gguf: Path, home: Path) -> dict:
    env = dict(os.environ, MLXEDGE_HOME=str(home), PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", CHILD, str(gguf), json.dumps(TEXTS)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    """transformers' own GGUF tokenizer (it imports torch here, which the test extra installs)."""
    from transformers import AutoTokenizer

    return _facts(AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name))


def test_metadata_reader_equals_transformers_reader(smollm2_gguf):
    from transformers.integrations.gguf.reader import read_gguf_metadata

    keep = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
    ours = tokenizer_cache.read_gguf_metadata(str(smollm2_gguf), keep)
    theirs = read_gguf_metadata(str(smollm2_gguf), keep)
    assert ours[1] == theirs[1]
    assert set(ours[0]) == set(theirs[0])
    differing = [k for k in ours[0] if ours[0][k] != theirs[0][k]]
    assert not differing, differing


@pytest.mark.slow
def test_built_without_torch_then_from_cache_equals_transformers_own(smollm2_gguf, reference, tmp_path):
    first = _child(smollm2_gguf, tmp_path)  # builds through the torch-free reader and saves
    entries = list((tmp_path / "tokenizers").iterdir())
    assert len(entries) == 1 and (entries[0] / "tokenizer.json").is_file()
    second = _child(smollm2_gguf, tmp_path)  # loads the saved tokenizer
    for got in (first, second):
        assert got.pop("torch") is False
        assert got == json.loads(json.dumps(reference))


def test_a_changed_file_is_built_again_and_an_unchanged_one_is_not(smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("MLXEDGE_HOME", str(tmp_path / "home"))
    gguf = tmp_path / smollm2_gguf.name
    shutil.copyfile(smollm2_gguf, gguf)
    built = []
    real_build = tokenizer_cache._build
    monkeypatch.setattr(tokenizer_cache, "_build", lambda path: built.append(path) or real_build(path))

    first = tokenizer_cache.load_gguf_tokenizer(gguf)
    again = tokenizer_cache.load_gguf_tokenizer(gguf)
    assert len(built) == 1
    assert _facts(again) == _facts(first)

    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # "replaced": another mtime
    tokenizer_cache.load_gguf_tokenizer(gguf)
    assert len(built) == 2
    assert len(list((tmp_path / "home" / "tokenizers").iterdir())) == 2


def test_an_unwritable_cache_is_not_an_error(smollm2_gguf, tmp_path):
    class Saves:
        def save_pretrained(self, directory):
            Path(directory, "tokenizer.json").write_text("{}")

    home = tmp_path / "not-a-directory"
    home.write_text("")  # every mkdir under it fails, as on a read-only home
    tokenizer_cache._save(Saves(), home / "tokenizers" / "key", smollm2_gguf)  # no exception
    assert home.is_file()
    tokenizer_cache._save(Saves(), tmp_path / "ok" / "key", smollm2_gguf)
    assert sorted(p.name for p in (tmp_path / "ok" / "key").iterdir()) == [tokenizer_cache.STAMP, "tokenizer.json"]
    assert [p.name for p in (tmp_path / "ok").iterdir()] == ["key"]  # no temporary directory left behind
