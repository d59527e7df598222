"""config.json (and the files read with it) validated once, up front: each bad value is one line naming the
key, the value and what was expected, from the API and from the CLI (one `error:` line, non-zero exit,
nothing written). Also: absurd sizes refused by the plan at once, and memory sizes parsed without overflow."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import mlxedge
from mlxedge.cli import main
from mlxedge.errors import MlxedgeError, SourceError
from tiny_models import build_tiny

SRC = str(Path(__file__).resolve().parent.parent / "src")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("cfg") / "good")


def _with_config(good, tmp_path, edit) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(good, dest)
    config = json.loads((dest / "config.json").read_text())
    edit(config)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def _set(key, value):
    return lambda c: c.__setitem__(key, value)


def _drop(key):
    return lambda c: c.pop(key)


CASES = [
    ("missing-hidden", _drop("hidden_size"), "required key 'hidden_size' is missing"),
    ("missing-heads", _drop("num_attention_heads"), "required key 'num_attention_heads' is missing"),
    ("missing-layers", _drop("num_hidden_layers"), "required key 'num_hidden_layers' is missing"),
    ("missing-vocab", _drop("vocab_size"), "required key 'vocab_size' is missing"),
    ("float-hidden", _set("hidden_size", 64.5), "'hidden_size' is 64.5, expected an integer from 1"),
    ("bool-hidden", _set("hidden_size", True), "'hidden_size' is True, expected an integer"),
    ("zero-hidden", _set("hidden_size", 0), "'hidden_size' is 0, expected an integer"),
    ("negative-heads", _set("num_attention_heads", -4), "'num_attention_heads' is -4"),
    ("zero-vocab", _set("vocab_size", 0), "'vocab_size' is 0"),
    ("zero-head-dim", _set("head_dim", 0), "'head_dim' is 0"),
    ("zero-positions", _set("max_position_embeddings", 0), "'max_position_embeddings' is 0"),
    ("null-intermediate", _set("intermediate_size", None), "'intermediate_size' is None"),
    ("kv-not-divisor", _set("num_key_value_heads", 3), "'num_key_value_heads' is 3, expected a divisor"),
    ("list-model-type", _set("model_type", ["llama"]), "'model_type' is ['llama'], expected a string"),
    ("rope-not-dict", _set("rope_parameters", "fast"), "'rope_parameters' is 'fast', expected an object"),
    ("quant-not-dict", _set("quantization", 4), "'quantization' is 4, expected an object"),
    ("quant-bits-99", _set("quantization", {"bits": 99, "group_size": 64}), "'quantization.bits' is 99, expected one of"),
    ("quant-group-0", _set("quantization", {"bits": 4, "group_size": 0}), "'quantization.group_size' is 0"),
    ("eos-string", _set("eos_token_id", "x"), "'eos_token_id' is 'x', expected a token id"),
    ("eos-list-mixed", _set("eos_token_id", [2, "x"]), "'eos_token_id' is [2, 'x']"),
    ("absurd-layers", _set("num_hidden_layers", 10**9), "'num_hidden_layers' is 1000000000 but the weights hold"),
]


@pytest.mark.parametrize("edit,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_value_is_one_line_naming_the_key(good, tmp_path, edit, needle):
    path = _with_config(good, tmp_path, edit)
    with pytest.raises(SourceError) as e:
        mlxedge.load(str(path), dtype="float32", context_length=64)
    message = str(e.value)
    assert "\n" not in message and needle in message and "config.json" in message, message


def test_config_that_is_not_an_object(good, tmp_path):
    path = _with_config(good, tmp_path, lambda c: None)
    (path / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(SourceError) as e:
        mlxedge.load(str(path))
    assert "holds list JSON, expected an object" in str(e.value)


@pytest.mark.parametrize("name", ["config.json", "chat_template.jinja", "tokenizer_config.json",
                                  "generation_config.json"])
def test_invalid_utf8_is_one_line_naming_the_file(good, tmp_path, name):
    path = _with_config(good, tmp_path, lambda c: None)
    original = (path / name).read_bytes() if (path / name).exists() else b'{"a": "b"}'
    (path / name).write_bytes(original[:1] + b"\xff\xfe" + original[1:])
    with pytest.raises(SourceError) as e:
        mlxedge.load(str(path), dtype="float32", context_length=64)
    message = str(e.value)
    assert "\n" not in message and name in message and "not valid UTF-8" in message


def test_generation_config_eos_is_checked(good, tmp_path):
    path = _with_config(good, tmp_path, lambda c: None)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, {"x": 1}]}))
    with pytest.raises(SourceError) as e:
        mlxedge.load(str(path))
    assert "generation_config.json" in str(e.value) and "'eos_token_id'" in str(e.value)


@pytest.mark.parametrize("size", ["1000000000000TB", "9" * 40, 2**70])
def test_huge_memory_budget_is_a_clean_error(good, size):
    with pytest.raises(MlxedgeError) as e:
        mlxedge.load(str(good), memory_budget=size)
    assert "more than any machine has" in str(e.value)


def test_memory_sizes_are_parsed_exactly():
    from mlxedge.memory.units import parse_size

    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("0.1KiB") == 102 and parse_size("8TiB") == 8 << 40


# --------------------------------------------------------------------------------------------------- CLI

CLI_CASES = [c for c in CASES if c[0] in ("float-hidden", "eos-string", "absurd-layers", "quant-bits-99",
                                           "list-model-type")]


@pytest.mark.parametrize("edit,needle", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
@pytest.mark.parametrize("command", ["generate", "convert", "plan"])
def test_cli_gives_one_error_line_and_writes_nothing(good, tmp_path, monkeypatch, edit, needle, command):
    path = _with_config(good, tmp_path, edit)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = sorted(p.name for p in path.iterdir())
    args = {"generate": ["generate", str(path), "-p", "hi", "-n", "1", "--dtype", "float32"],
            "convert": ["convert", str(path), str(work / "out"), "--bits", "4"],
            "plan": ["plan", str(path)]}[command]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], result.output
    assert "Traceback" not in result.output and "a bug in mlxedge" not in result.output
    assert list(work.iterdir()) == [] and sorted(p.name for p in path.iterdir()) == before


def test_cli_huge_memory_budget_in_a_real_process(good, tmp_path):
    proc = subprocess.run([sys.executable, "-c", "from mlxedge.cli import main; main()", "plan", str(good),
                           "--memory-budget", "1000000000000TB"], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: memory size '1000000000000TB' is more than any")
    assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == []
