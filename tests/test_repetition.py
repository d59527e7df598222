"""The repetition guard: loops of any period end the reply ("repeating"); prose, code and lists never trip it."""

from __future__ import annotations

import pytest

from mlxedge.generate.repetition import RepetitionGuard


def _first_trip(tokens, **kwargs):
    guard = RepetitionGuard(**kwargs)
    for i, token in enumerate(tokens):
        if guard.feed(token):
            return i + 1, guard.period
    return None, 0


@pytest.mark.parametrize("period", [1, 2, 7, 12, 30, 64])
def test_a_loop_of_any_period_trips_once_it_is_long_enough(period):
    intro = list(range(1000, 1040))  # a reply that starts well, then loops
    span = list(range(2000, 2000 + period))
    tokens = intro + span * 200
    at, found = _first_trip(tokens)
    need = max(3 * period, 48)
    assert at == len(intro) + need  # exactly when the tail first holds `need` periodic tokens
    assert found == period


def test_a_period_longer_than_the_window_is_not_reported():
    assert _first_trip(list(range(65)) * 10, max_period=64) == (None, 0)


def test_two_repeats_of_a_line_are_allowed():
    line = list(range(10, 22))  # a 12-token line; 4 copies are needed (48 tokens)
    assert _first_trip(line * 3 + [5])[0] is None
    assert _first_trip(line * 4)[0] == 48


def test_real_text_never_trips(smollm2_hf):
    """Prose, code and a numbered list, tokenized by the real tokenizer: no false alarm."""
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    prose = " ".join(topics[k] for k in sorted(topics)[:40])
    code = "\n".join(f"    x{i} = compute(x{i - 1}, step={i})" for i in range(1, 200))
    listing = "\n".join(f"{i}. item" for i in range(1, 300))
    table = "\n".join("| --- | --- | --- |" if i % 10 == 0 else f"| a{i} | b{i} | c{i} |" for i in range(200))
    for text in (prose, code, listing, table):
        ids = tok.encode(text)
        assert _first_trip(ids) == (None, 0), text[:80]


def test_the_loop_ends_a_looping_reply_with_finish_reason_repeating(smollm2_hf):
    """Through the real generation loop, with a scripted model that loops forever."""
    from test_generation import ScriptedModel
    from transformers import AutoTokenizer

    from mlxedge.generate.loop import generate_stream
    from mlxedge.generate.sampler import SamplingParams

    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    line = tok.encode(" The sea is blue and wide.\n", add_special_tokens=False)
    script = tok.encode("A poem:\n", add_special_tokens=False) + line * 100
    prompt = tok.encode("Write a poem.")
    model = ScriptedModel(script, len(tok), len(prompt))
    events = list(generate_stream(model, tok, prompt, eos_ids=[2], sampling=SamplingParams(), max_tokens=1000))
    assert events[-1].finish_reason == "repeating"
    generated = sum(1 for e in events if e.token is not None)
    assert generated < 100  # stopped after a few copies, not at the limit
    text = "".join(e.text for e in events)
    assert 2 <= text.count("The sea is blue") <= 8
