"""Seeded mutations of a tiny GGUF and a tiny safetensors model: every case ends in one clean error line or a
load with finite logits; structurally corrupt files (offsets, types, sizes, counts, truncation) never load.

All cases run in one worker process per target (see fuzz_harness.py), each under a watchdog; a crash or a
hang is reported with the case that caused it. The long run is scripts/fuzz_loaders.py.
"""

from __future__ import annotations

import pytest

from fuzz_harness import Target, is_structural, run_cases, summarize

SEED = 20261202
CASES = {"gguf": 220, "dir": 180}


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    from gguf_tiny import TINY, tiny_model, write_gguf
    from tiny_models import build_tiny

    d = tmp_path_factory.mktemp("fuzz-seeds")
    return {"gguf": Target("tiny-gguf", "gguf", str(write_gguf(tiny_model("llama"), d / "tiny.gguf",
                                                                TINY["llama"]["types"]))),
            "dir": Target("tiny-safetensors", "dir", str(build_tiny("llama", d / "st")))}


@pytest.mark.parametrize("kind", ["gguf", "dir"])
def test_mutants_end_in_a_clean_error_or_a_finite_load(targets, kind, tmp_path):
    results = run_cases(targets[kind], SEED, CASES[kind], tmp_path, case_timeout=30, total_timeout=240)
    summary = "\n".join(f"{n:5d} {k}" for k, n in summarize(results).items())
    assert len(results) == CASES[kind], summary
    bad = [r for r in results if r["outcome"] not in ("error", "loaded")]
    assert not bad, f"{bad[:5]}\n{summary}"
    silent = [r for r in results if r["outcome"] == "loaded" and is_structural(r["kind"])]
    assert not silent, f"structurally corrupt files loaded: {silent[:5]}\n{summary}"
    # the mutations reach the checks they are meant for: most structural cases happen, and all are refused
    structural = [r for r in results if is_structural(r["kind"])]
    assert len(structural) > CASES[kind] // 3, summary
