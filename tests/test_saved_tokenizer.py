"""SavedTokenizer (the `tokenizers` library alone) against transformers, on the very same saved tokenizer files.

The GGUF tokenizer cache holds what transformers' `save_pretrained` wrote; later starts read it back with
`SavedTokenizer` to keep transformers out of the process. These tests build the cache for the real
SmolLM2 GGUF, for tiny GGUFs of three architectures (each gives transformers another tokenizer class) and,
where the alias is already cached on this machine, for Gemma 3 270M (a SentencePiece vocabulary of 262k),
then compare encode (with and without special tokens), decode (with and without skipping them, on the
encoded texts and on random ids), special tokens, vocabulary and chat template with transformers' own
`AutoTokenizer` loading the same directory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlxedge.sources import tokenizer_cache
from mlxedge.sources.saved_tokenizer import SavedTokenizer, usable

TEXTS = ["Hello, world!", "안녕하세요, 세계 🙂 — naïve café", "def f(x):\n    return x ** 2  # square\n",
         "<|im_start|>user\nWhat is 2+2?<|im_end|>\n", "<bos><start_of_turn>user\nhi<end_of_turn>\n",
         "   leading spaces and\ttabs\n\n", "", " ", "\n\n\n", "a  b   c", "ĠĊ Ġ raw byte-level symbols", "\u00a0\u2028\x00"]


def _prose(n: int = 40) -> list:
    from pydoc_data.topics import topics

    return [text[:2000] for _, text in sorted(topics.items())[:n]]


def assert_same_tokenizer(saved: SavedTokenizer, reference, random_decodes: int = 200) -> None:
    for text in TEXTS + _prose():
        for special in (True, False):
            assert saved.encode(text, add_special_tokens=special) == \
                reference.encode(text, add_special_tokens=special), (text[:60], special)
        ids = reference.encode(text)
        for skip in (False, True):
            assert saved.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    rng = random.Random(0)
    for _ in range(random_decodes):  # ids that no text produced: lone bytes, special tokens mid-sequence
        ids = [rng.randrange(len(reference)) for _ in range(rng.randrange(1, 24))]
        for skip in (False, True):
            assert saved.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip), ids
    assert len(saved) == len(reference)
    assert saved.get_vocab() == reference.get_vocab()
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(saved, name) == getattr(reference, name), name
        assert getattr(saved, name + "_id") == getattr(reference, name + "_id"), name
    assert saved.chat_template == reference.chat_template


def _cached_dir(gguf: Path, home: Path, monkeypatch) -> Path:
    monkeypatch.setenv("MLXEDGE_HOME", str(home))
    tokenizer_cache.load_gguf_tokenizer(gguf)
    (entry,) = (home / "tokenizers").iterdir()
    return entry


def _reference(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


@pytest.mark.slow
def test_smollm2_saved_tokenizer_equals_transformers(smollm2_gguf, tmp_path, monkeypatch):
    directory = _cached_dir(smollm2_gguf, tmp_path, monkeypatch)
    assert usable(directory)
    saved = SavedTokenizer(directory)
    assert "<|im_start|>" in saved.chat_template
    assert_same_tokenizer(saved, _reference(directory))


# gemma3_text is left out here: on the tiny byte vocabulary transformers' own Gemma tokenizer fails (no unk
# token for characters outside it); the real Gemma 3 270M vocabulary is compared below
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi3"])
def test_tiny_gguf_tokenizers_of_each_class_equal_transformers(model_type, tmp_path, monkeypatch):
    from gguf_tiny import tiny_model, write_gguf

    gguf = write_gguf(tiny_model(model_type), tmp_path / "tiny.gguf", {})
    directory = _cached_dir(gguf, tmp_path / "home", monkeypatch)
    assert usable(directory), json.loads((directory / "tokenizer_config.json").read_text())
    assert_same_tokenizer(SavedTokenizer(directory), _reference(directory), random_decodes=50)


@pytest.mark.slow
def test_gemma3_270m_saved_tokenizer_equals_transformers(tmp_path, monkeypatch):
    from mlxedge.sources.registry import ALIASES, cached_path

    gguf = cached_path(ALIASES["gemma3-270m"])
    if not gguf.is_file():
        pytest.skip("gemma3-270m is not in this machine's model cache (mlxedge pull gemma3-270m)")
    link = tmp_path / gguf.name
    link.symlink_to(gguf)  # read only: the cache entry is built under tmp_path
    directory = _cached_dir(link, tmp_path / "home", monkeypatch)
    assert usable(directory)
    assert_same_tokenizer(SavedTokenizer(directory), _reference(directory), random_decodes=100)


def test_a_class_it_does_not_reproduce_is_left_to_transformers(smollm2_gguf, tmp_path, monkeypatch):
    directory = _cached_dir(smollm2_gguf, tmp_path, monkeypatch)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    for change in ({"tokenizer_class": "LlamaTokenizer"}, {"clean_up_tokenization_spaces": True},
                   {"auto_map": {"AutoTokenizer": ["x.Tok", None]}}):
        config_file.write_text(json.dumps({**config, **change}))
        assert not usable(directory), change
        loaded = tokenizer_cache.load_gguf_tokenizer(smollm2_gguf)
        assert not isinstance(loaded, SavedTokenizer), change
    config_file.write_text(json.dumps(config))
    assert isinstance(tokenizer_cache.load_gguf_tokenizer(smollm2_gguf), SavedTokenizer)


def test_save_pretrained_writes_what_transformers_reads(smollm2_gguf, tmp_path, monkeypatch):
    saved = SavedTokenizer(_cached_dir(smollm2_gguf, tmp_path / "home", monkeypatch))
    saved.chat_template = "{{ messages[0]['content'] }}"
    out = tmp_path / "out"
    saved.save_pretrained(out)
    reread = _reference(out)
    assert reread.chat_template == saved.chat_template
    assert reread.encode(TEXTS[1]) == saved.encode(TEXTS[1])


CHILD = r"""
import json, sys
sys.modules["torch"] = None  # as the mlxedge program does
from mlxedge.sources.tokenizer_cache import load_gguf_tokenizer
tok = load_gguf_tokenizer(sys.argv[1])
print(json.dumps({"class": type(tok).__name__, "transformers": "transformers" in sys.modules,
                  "ids": tok.encode("Hi there")}))
"""


@pytest.mark.slow
def test_a_cached_tokenizer_loads_without_importing_transformers(smollm2_gguf, tmp_path):
    env = dict(os.environ, MLXEDGE_HOME=str(tmp_path), PYTHONPATH=os.pathsep.join(sys.path))

    def child() -> dict:
        out = subprocess.run([sys.executable, "-c", CHILD, str(smollm2_gguf)], capture_output=True, text=True,
                             env=env, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, second = child(), child()
    assert first["transformers"] is True  # the first start builds it with transformers...
    assert second == {**first, "transformers": False}  # ...later ones read it back without
    assert second["class"] == "SavedTokenizer"
