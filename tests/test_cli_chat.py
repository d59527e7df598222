"""`mlxedge chat` driven like a person, through a real pseudo-terminal (pexpect), on the real default model.

The default alias `smollm2` is served from a cache directory (MLXEDGE_HOME) that holds the test fixture's
GGUF, so nothing is downloaded. Decoding is greedy, so the replies are deterministic; the asserts are on
what a person would check on the screen (the reply uses what the first turn said, /reset forgets it,
Ctrl-C stops a long reply and gives the prompt back) and on the exit status.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

MLXEDGE = str(Path(sys.executable).with_name("mlxedge"))
PROMPT = ">>> "
# float32 activations: MLX's CPU build runs float16 quantized matmuls far slower (see the issue note)
CHAT_ARGS = ["chat", "--dtype", "float32", "--max-tokens", "40"]
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
    child = pexpect.spawn(MLXEDGE, list(args), env=env, encoding="utf-8", timeout=240, dimensions=(50, 200))
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
