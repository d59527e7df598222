#!/usr/bin/env python
"""Time `mlxedge chat` as a person meets it: start it in a pseudo-terminal, ask one ~40-token question at
the prompt, and read the reply's footer (tokens · tok/s · time to first token) — what `make chat` shows.

Also reports the wall time from launch to the `>>> ` prompt and from pressing Enter to the first character
of the reply on the terminal. Needs pexpect (the test extra installs it).

    python scripts/chat_first_answer.py [MODEL] [--runs 3] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

import pexpect

QUESTION = ("I am planning a short hiking trip to the mountains next weekend with two friends who have never "
            "hiked before. What three things should we pack, and why is each one important for our safety?")
FOOTER = re.compile(r"(\d+) tokens · ([\d.]+) tok/s · ([\d.]+)s to first token")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def one_run(model: str, max_tokens: int) -> dict:
    started = time.monotonic()
    child = pexpect.spawn(sys.executable, ["-m", "mlxedge.cli", "chat", model, "--max-tokens", str(max_tokens)],
                          encoding="utf-8", timeout=300, dimensions=(50, 200), env=dict(os.environ))
    child.expect(">>> ")
    ready = time.monotonic() - started
    child.sendline(QUESTION)
    sent = time.monotonic()
    child.expect(re.escape(QUESTION[-20:]))  # the echoed question
    child.expect(r"\S")  # the first character the reply draws
    first_char = time.monotonic() - sent
    child.expect(FOOTER)
    tokens, tps, ttft = child.match.groups()
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    return {"to_prompt_s": ready, "first_char_s": first_char, "tokens": int(tokens), "tok_s": float(tps),
            "ttft_s": float(ttft)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    from mlxedge import load

    tokenizer = load(args.model).tokenizer
    question_tokens = len(tokenizer.encode(QUESTION))
    prompt_tokens = len(tokenizer.prompt_ids([{"role": "user", "content": QUESTION}]))
    runs = [one_run(args.model, args.max_tokens) for _ in range(args.runs)]
    load_avg = os.getloadavg()[0]
    print(f"mlxedge chat {args.model}: a {question_tokens}-token question ({prompt_tokens} prompt tokens with the "
          f"chat template), "
          f"{args.runs} runs, load average {load_avg:.1f} on {os.cpu_count()} cores")
    for key in ("to_prompt_s", "first_char_s", "ttft_s", "tok_s", "tokens"):
        values = [r[key] for r in runs]
        print(f"  {key:13s} median {statistics.median(values):8.2f}   runs {[round(v, 2) for v in values]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
