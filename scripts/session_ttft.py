"""Time to first token of the next chat turn: a session (prefills only the new message) vs generate over the
whole conversation (prefills everything), side by side on the same ~1,000-token conversation.

    PYTHONPATH=src python scripts/session_ttft.py [MODEL] [--history-tokens 1000] [--reps 3]

MODEL defaults to the test fixture's SmolLM2-135M-Instruct Q4_1 GGUF (the default model). The conversation is
built from pydoc's topic texts as user messages with short greedy replies; each rep loads the saved session
file fresh, so every session turn starts from the same cache. Also checks that both greedy replies are equal.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def default_model() -> str:
    from fixture_cache import SMOLLM2_GGUF_NAME, test_cache_dir

    return str(test_cache_dir() / "smollm2-gguf" / SMOLLM2_GGUF_NAME)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--history-tokens", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    import mlxedge
    from pydoc_data.topics import topics

    model = mlxedge.load(args.model or default_model(), context_length=4096)
    session = model.session(system="You are a helpful assistant.")
    texts = [topics[k] for k in sorted(topics) if 400 < len(topics[k]) < 1600]
    i = 0
    while session.cached_tokens < args.history_tokens:
        session.send("Summarize this in one sentence:\n" + texts[i][:1200], max_tokens=24)
        i += 1
    question = "Which of these topics was the most interesting, and why?"
    full = session.messages + [{"role": "user", "content": question}]
    history = len(model.tokenizer.prompt_ids(full))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "conversation.safetensors"
        session.save(path)
        rows = []
        for rep in range(args.reps):
            fresh = model.load_session(path)
            s = fresh.send(question, max_tokens=args.max_tokens)
            g = model.generate(full, max_tokens=args.max_tokens)
            assert s.tokens == g.tokens, "session reply differs from generate over the whole conversation"
            rows.append((s.stats["ttft_s"], g.stats["ttft_s"], s.stats["cached_prompt_tokens"]))
            print(f"rep {rep}: session ttft {s.stats['ttft_s']:.3f}s ({s.stats['prompt_tokens'] - s.stats['cached_prompt_tokens']}"
                  f" new tokens) | re-prefill ttft {g.stats['ttft_s']:.3f}s ({g.stats['prompt_tokens']} tokens)",
                  flush=True)
    ts = statistics.median(r[0] for r in rows)
    tg = statistics.median(r[1] for r in rows)
    print(f"\nconversation: {history} prompt tokens, {rows[0][2]} cached by the session; {args.reps} reps, medians")
    print(f"{'':24}{'TTFT (s)':>10}")
    print(f"{'session (new tokens)':24}{ts:>10.3f}")
    print(f"{'re-prefill everything':24}{tg:>10.3f}")
    print(f"ratio re-prefill/session: {tg / ts:.1f}x; greedy replies identical: yes")


if __name__ == "__main__":
    main()
