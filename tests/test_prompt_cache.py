"""Prompt-cache files (API and `mlxedge cache-prompt` / `generate --prompt-cache`) and the chat REPL's session:
answers equal an uncached run, only the new part is prefilled, foreign files are refused in one line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import mlxedge
from mlxedge.cli import main
from mlxedge.cli.chat import _command
from mlxedge.cli.chat_session import ChatSession
from mlxedge.errors import GenerationError, SourceError
from tiny_chat import tiny_chat, tiny_chat_model  # noqa: F401 (tiny_chat: a fixture)
from tiny_chat import tiny_chat_loaded as model  # noqa: F401 (a fixture)

DOCUMENT = ("The lighthouse stands on a rock at the mouth of the bay. Its keeper climbs one hundred and twelve "
            "steps every evening to light the lamp, and writes the weather in a book. ") * 3


@pytest.mark.parametrize("raw", [False, True])
def test_cached_prompt_answers_as_the_whole_prompt_would(model, tmp_path, raw):
    path = tmp_path / "doc.safetensors"
    info = model.cache_prompt(DOCUMENT, path, raw=raw, system=None)
    question = "\nHow many steps does the keeper climb?"
    expected = model.generate(DOCUMENT + question, raw=raw, max_tokens=12)
    for _ in range(2):  # the file is not changed by using it
        result = model.generate(question, prompt_cache=path, raw=raw, max_tokens=12)
        assert result.tokens == expected.tokens
        assert result.stats["prompt_tokens"] == expected.stats["prompt_tokens"]
        assert info["tokens"] - 2 <= result.stats["cached_prompt_tokens"] <= info["tokens"]


def test_prompt_cache_refusals(model, tiny_chat, tmp_path):
    path = tmp_path / "doc.safetensors"
    model.cache_prompt(DOCUMENT, path)
    with pytest.raises(GenerationError, match="continues the cached prefix"):
        model.generate([{"role": "user", "content": "x"}], prompt_cache=path)
    with pytest.raises(GenerationError, match="made with the chat template"):
        model.generate("x", prompt_cache=path, raw=True)
    with pytest.raises(SourceError, match="another model"):
        mlxedge.load(tiny_chat, bits=8, group_size=32).generate("x", prompt_cache=path)
    with pytest.raises(SourceError, match="no such cache file"):
        model.generate("x", prompt_cache=tmp_path / "missing.safetensors")
    session = model.session()
    session.send("hi", max_tokens=2)
    session.save(tmp_path / "s.safetensors")
    with pytest.raises(SourceError, match="session cache, not a prompt"):
        model.generate("x", prompt_cache=tmp_path / "s.safetensors")


def test_cli_cache_prompt_then_generate(tiny_chat, tmp_path):
    runner = CliRunner()
    path = str(tmp_path / "doc.safetensors")
    done = runner.invoke(main, ["cache-prompt", str(tiny_chat), "-p", "-", "-o", path], input=DOCUMENT)
    assert done.exit_code == 0, done.output
    assert "cached" in done.output
    question = "\nWhat does the keeper write?"
    cached = runner.invoke(main, ["generate", str(tiny_chat), "--prompt-cache", path, "-p", question, "-n", "8",
                                  "--json"])
    plain = runner.invoke(main, ["generate", str(tiny_chat), "-p", DOCUMENT + question, "-n", "8", "--json"])
    assert cached.exit_code == 0 and plain.exit_code == 0, cached.output + plain.output
    a, b = json.loads(cached.stdout), json.loads(plain.stdout)
    assert a["tokens"] == b["tokens"] and a["stats"]["cached_prompt_tokens"] > 40
    other = runner.invoke(main, ["generate", str(tiny_chat), "--bits", "8", "--group-size", "32",
                                 "--prompt-cache", path, "-p", "x"])
    assert other.exit_code == 1
    error = [line for line in other.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "another model" in error[0]
    bad = runner.invoke(main, ["cache-prompt", str(tiny_chat), "-p", "x", "-o", str(tmp_path / "x.bin")])
    assert bad.exit_code == 2 and not (tmp_path / "x.bin").exists()


def test_generate_cli_draft_flags(tiny_chat):
    runner = CliRunner()
    args = ["generate", str(tiny_chat), "-p", "one two one two one two", "--raw", "-n", "12", "--json"]
    plain = json.loads(runner.invoke(main, args).stdout)
    lookup = json.loads(runner.invoke(main, args + ["--draft", "prompt-lookup", "--num-draft-tokens", "4"]).stdout)
    drafted = json.loads(runner.invoke(main, args + ["--draft", str(tiny_chat), "--draft-bits", "4"]).stdout)
    assert plain["tokens"] == lookup["tokens"] == drafted["tokens"]
    assert lookup["stats"]["draft_proposed"] > 0 and drafted["stats"]["draft_proposed"] > 0


def test_chat_repl_session_save_and_resume(model, tiny_chat, tmp_path, capsys):
    chat = ChatSession(model, "Be brief.", max_tokens=8, sampling={}, show_stats=False)
    chat.reply("Hello there")
    chat.reply("Tell me more")
    stats = chat.stats_text()
    assert "cached" in stats and chat.last_stats["cached_prompt_tokens"] > 10  # the second turn reused the first
    path = tmp_path / "chat.safetensors"
    assert _command(chat, f"/save {path}") and path.exists()
    expected = chat.session.send("And then?", max_tokens=8)
    runner = CliRunner()
    resumed = runner.invoke(main, ["chat", str(tiny_chat), "--resume", str(path), "-n", "8", "--no-stats",
                                   "--temperature", "0", "--repetition-penalty", "1"],  # chat samples by default
                            input="And then?")
    assert resumed.exit_code == 0, resumed.output
    assert expected.text in resumed.stdout and "resumed 2 exchanges" in resumed.output
