#!/usr/bin/env python
"""The memory plan's predicted total vs the measured peak RSS while generating 128 tokens at a 2k context.

    python scripts/plan_vs_measured.py [MODEL]      (MODEL defaults to the default alias, smollm2)

The prompt is English prose (pydoc's topics) cut to 2048 - 128 tokens, so prompt + generation fill the
planned 2048-token context; the model is loaded with context_length=2048 and its plan is what `load` used.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # rss.py

import mlxedge  # noqa: E402
from mlxedge.memory.units import format_bytes  # noqa: E402
from rss import peak_rss_bytes  # noqa: E402

CONTEXT, GENERATE = 2048, 128


def main() -> int:
    source = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
    model = mlxedge.load(source, context_length=CONTEXT)
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    # leave room for the chat template's own tokens around the prose
    ids = model.tokenizer.encode(text, add_special_tokens=False)[: CONTEXT - GENERATE - 64]
    result = model.generate(model.tokenizer.decode(ids), max_tokens=GENERATE)
    peak = peak_rss_bytes()
    plan = model.info["memory_plan"]
    print(f"model {source} ({model.info['dtype']}), prompt {result.stats['prompt_tokens']} tokens, "
          f"generated {result.stats['generation_tokens']}")
    for key in ("weight_bytes", "kv_cache_bytes", "activation_bytes", "overhead_bytes"):
        print(f"  plan {key:17s} {format_bytes(plan[key])}")
    error = (plan["total_bytes"] - peak) / peak
    print(f"plan total {format_bytes(plan['total_bytes'])}  measured peak RSS {format_bytes(peak)}  "
          f"difference {100 * error:+.1f}%")
    return 0 if abs(error) <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
