"""`mlxedge chat` driven like a person, through a real pseudo-terminal (pexpect), on the real default model.

The default alias `smollm2` is served from a cache directory (MLXEDGE_HOME) that holds the test fixture's
GGUF, so nothing is downloaded. The conversation test decodes greedily (chat samples by default), so its
replies are deterministic; the poem test keeps the default sampling with a fixed seed. The asserts are on
what a person would check on the screen (the reply uses what the first turn said, /reset forgets it,
Ctrl-C stops a long reply and gives the prompt back) and on the exit status.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pexpect
import pytest

import mlxedge.cpu as cpu
from test_cli import default_sigint

MLXEDGE = str(Path(sys.executable).with_name("mlxedge"))
PROMPT = ">>> "
# float32 activations: MLX's CPU build runs float16 quantized matmuls far slower (see the issue note)
CHAT_ARGS = ["chat", "--dtype", "float32", "--max-tokens", "40", "--temperature", "0", "--repetition-penalty", "1"]
CONTEXT = re.compile(r"context:\s+(\d+) of")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlxedge_home(smollm2_gguf, tmp_path_factory) -> Path:
    """An MLXEDGE_HOME whose cache already holds smollm2, where the registry looks for it."""
    from mlxedge.sources.registry import ALIASES, DEFAULT_ALIAS

    home = tmp_path_factory.mktemp("mlxedge-home")
    target = home / "models" / DEFAULT_ALIAS / ALIASES[DEFAULT_ALIAS].filename
    target.parent.mkdir(parents=True)
    target.symlink_to(smollm2_gguf)
    return home


def spawn_chat(home: Path, args=CHAT_ARGS):
    env = dict(os.environ, MLXEDGE_HOME=str(home), TERM="xterm", HOME=str(home))
    child = pexpect.spawn(MLXEDGE, list(args), env=env, encoding="utf-8", timeout=240, dimensions=(50, 200),
                          preexec_fn=default_sigint)
    return child


def reply_to(child, message: str) -> str:
    """Type a message, wait for the prompt to come back, return what was printed in between (no ANSI)."""
    child.sendline(message)
    child.expect_exact(PROMPT)
    screen = ANSI.sub("", child.before)
    return screen.split(message, 1)[-1]  # drop the echo of what was typed


def test_chat_like_a_person(mlxedge_home):
    child = spawn_chat(mlxedge_home)
    child.expect_exact(PROMPT)
    assert "mlxedge chat" in child.before and "smollm2" in child.before  # the banner names the model

    first = reply_to(child, "The password is tulip.")
    assert "tok/s" in first and "to first token" in first  # the footer under every reply

    second = reply_to(child, "What is the password?")
    assert "tulip" in second.lower()  # only the first turn could have told it

    assert "conversation cleared" in reply_to(child, "/reset")
    forgotten = reply_to(child, "What is the password?")
    assert "tulip" not in forgotten.lower()
    assert "tok/s" in forgotten

    context_before = CONTEXT.search(reply_to(child, "/stats")).group(1)

    # a long reply, stopped with Ctrl-C once some of it is on the screen
    story = "Tell me a very long story about a dragon who learns to bake bread."
    child.sendline(story)
    child.expect_exact(story)  # the echo of the typed line
    child.expect(r"\w+ \w+ \w+ \w+ \w+")  # then the reply is streaming
    child.sendintr()
    child.expect_exact("[interrupted]")
    child.expect_exact(PROMPT)
    # the interrupted exchange is not in the history: only the post-/reset question and answer are
    stats = reply_to(child, "/stats")
    assert "exchanges in history: 1;" in stats
    assert "dropped from the conversation" in stats
    assert CONTEXT.search(stats).group(1) == context_before  # the dropped reply's tokens are not counted

    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_at_the_prompt_stays_and_ctrl_d_leaves_with_status_0(mlxedge_home):
    child = spawn_chat(mlxedge_home, ["chat", "--dtype", "float32", "--no-stats"])
    child.expect_exact(PROMPT)
    child.send("half a line")
    child.expect_exact("half a line")  # like a person: Ctrl-C once the typed text shows (readline is reading)
    child.sendintr()
    child.expect_exact("/exit or Ctrl-D leaves")
    child.expect_exact(PROMPT)
    assert "unknown command /nope" in reply_to(child, "/nope")
    assert "/reset" in reply_to(child, "/help")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_a_poem_ends_by_itself_with_the_default_settings(mlxedge_home):
    """Default sampling and limit (only a seed, for a repeatable run): the reply ends without looping."""
    child = spawn_chat(mlxedge_home, ["chat", "--seed", "0"])
    child.expect_exact(PROMPT)
    assert "temperature 0.8" in child.before  # the banner states the sampling settings in use
    child.timeout = 900
    reply = reply_to(child, "Write a short poem about the sea.")
    footer = [line for line in reply.splitlines() if "tok/s" in line]
    assert footer and "--max-tokens" not in footer[-1]  # it ended by itself, well within 1024 tokens
    lines = [line.strip().lower() for line in reply.splitlines() if line.strip() and "tok/s" not in line]
    assert lines, reply
    assert max(lines.count(line) for line in lines) <= 2, reply
    child.sendline("/exit")
    child.expect(pexpect.EOF)


# ------------------------------------------------------------------------------------------------ second start

STARTUP = re.compile(r"startup: ready .*?kernel verdicts: (\d+) measured, (\d+) cached.*?"
                     r"transformers (not imported|imported), torch (not imported|imported)")


def _snapshot(directory: Path) -> dict:
    """Every file and directory under `directory`: (inode, size, mtime) — a rebuild or rewrite changes it."""
    return {str(p.relative_to(directory)): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
            for p in [directory, *directory.rglob("*")]}


def _start_and_leave(home: Path, kernel_cache: Path):
    """Start `mlxedge chat --debug` on the default model, wait for the prompt, leave; the --debug start-up line."""
    env = dict(os.environ, MLXEDGE_HOME=str(home), TERM="xterm", HOME=str(home),
               MLXEDGE_KERNEL_CACHE=str(kernel_cache))
    env.pop("MLXEDGE_KERNELS", None)  # the default (auto) kernel choice, which measures on a first load
    child = pexpect.spawn(MLXEDGE, ["chat", "--debug"], env=env, encoding="utf-8", timeout=600,
                          dimensions=(50, 200), preexec_fn=default_sigint)
    child.expect_exact(PROMPT)
    found = STARTUP.search(ANSI.sub("", child.before))
    assert found, child.before
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    measured, cached, transformers, torch = found.groups()
    return int(measured), int(cached), transformers == "imported", torch == "imported"


def test_the_second_chat_start_reuses_the_tokenizer_and_the_kernel_verdicts(smollm2_gguf, tmp_path):
    """First start: builds the GGUF tokenizer (with transformers) and measures the kernel per layer shape
    (where the native kernels load; without them there is nothing to measure, and the tokenizer half holds).
    Second start: reads both back — the cache files are untouched, nothing is measured (unless a verdict
    taken on a busy machine is being re-measured on a quiet one, once), transformers is not imported."""
    home = tmp_path / "home"
    target = home / "models" / "smollm2" / smollm2_gguf.name
    target.parent.mkdir(parents=True)
    target.symlink_to(smollm2_gguf)
    kernel_cache = tmp_path / "kernel-selection.json"

    measured, cached, transformers, torch = _start_and_leave(home, kernel_cache)
    assert cached == 0 and transformers and not torch
    tokenizers = _snapshot(home / "tokenizers")
    assert any(name.endswith("tokenizer.json") for name in tokenizers)
    if not cpu.available():  # no kernel besides MLX's built-in on this machine: nothing to measure or keep
        assert measured == 0 and not kernel_cache.exists()
        measured, cached, transformers, torch = _start_and_leave(home, kernel_cache)
        assert (measured, cached, transformers, torch) == (0, 0, False, False)
        assert _snapshot(home / "tokenizers") == tokenizers
        return
    assert measured > 0
    verdicts = json.loads(kernel_cache.read_text())
    ((device, first),) = verdicts.items()
    assert len(first) == measured
    provisional = {key for key, entry in first.items() if entry["quiet"] is False}

    measured, cached, transformers, torch = _start_and_leave(home, kernel_cache)
    assert not transformers and not torch
    assert _snapshot(home / "tokenizers") == tokenizers  # not rebuilt, not rewritten
    assert measured + cached == len(first) and measured <= len(provisional)
    second = json.loads(kernel_cache.read_text())[device]
    assert second.keys() == first.keys()
    changed = {key for key in first if second[key] != first[key]}
    assert len(changed) == measured and changed <= provisional  # only busy verdicts, re-measured quietly
    assert all(second[key]["quiet"] is True for key in changed)
