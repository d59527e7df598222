"""Speculative decoding speed: plain greedy vs each drafter (prompt lookup, the model itself at 4 bits, auto),
tokens per second and acceptance, on a prompt that repeats its context (rewrite code with one change) and on
free prose. Checks that every drafted output equals plain greedy.

    PYTHONPATH=src python scripts/speculative_speed.py [MODEL] [--max-tokens 128] [--num-draft-tokens 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

CODE = '''def moving_average(values, window):
    """Average of each window of values."""
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''
PROMPTS = {
    "repeats context": "Rewrite this Python function with one change: rename `values` to `xs`. "
                       "Give only the code.\n\n" + CODE,
    "free prose": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--num-draft-tokens", type=int, default=3)
    args = parser.parse_args()

    import mlxedge
    from session_ttft import default_model

    source = args.model or default_model()
    model = mlxedge.load(source)
    draft4 = mlxedge.load(source, bits=4)
    drafts = {"plain": None, "prompt-lookup": "prompt-lookup", "self @4-bit": draft4, "auto": "auto"}
    print(f"{'prompt':18}{'draft':16}{'tok/s':>8}{'tokens':>8}{'proposed':>10}{'accepted':>10}{'accept %':>10}"
          f"{'speedup':>9}  same as plain")
    for name, prompt in PROMPTS.items():
        model.generate(prompt, max_tokens=4)  # warm-up
        base = None
        for label, draft in drafts.items():
            kwargs = {"draft": draft, "num_draft_tokens": args.num_draft_tokens} if draft is not None else {}
            r = model.generate(prompt, max_tokens=args.max_tokens, **kwargs)
            s = r.stats
            if base is None:
                base = r
            tps = s["generation_tps"]
            acc = 100.0 * s["draft_accepted"] / s["draft_proposed"] if s["draft_proposed"] else 0.0
            off = " (turned off)" if s.get("draft_disabled") else ""
            print(f"{name:18}{label:16}{tps:>8.2f}{s['generation_tokens']:>8}{s['draft_proposed']:>10}"
                  f"{s['draft_accepted']:>10}{acc:>9.0f}%{tps / base.stats['generation_tps']:>8.2f}x  "
                  f"{r.tokens == base.tokens}{off}", flush=True)


if __name__ == "__main__":
    main()
