"""The generation loop: streaming deltas, UTF-8 safety, stop strings, limits, cancellation, stats."""

import mlx.core as mx
import mlx.nn as nn
import pytest

import mlxedge
from mlxedge.errors import GenerationError
from mlxedge.generate.loop import generate_stream
from mlxedge.generate.sampler import SamplingParams


class _Counter:
    def __init__(self):
        self.offset = 0

    @property
    def state(self):
        return mx.array(self.offset)


class ScriptedModel(nn.Module):
    """A 'model' whose greedy continuation is a fixed token script: drives the real loop deterministically."""

    def __init__(self, script, vocab_size, prompt_len):
        super().__init__()
        self.script, self.vocab_size, self.prompt_len = list(script), vocab_size, prompt_len

    def make_cache(self):
        return [_Counter()]

    def __call__(self, tokens, cache):
        cache[0].offset += tokens.shape[1]
        index = cache[0].offset - self.prompt_len
        token = self.script[index] if 0 <= index < len(self.script) else 0
        return (mx.arange(self.vocab_size) == token).astype(mx.float32)[None, None] * 10.0


@pytest.fixture(scope="module")
def tokenizer(smollm2_hf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_hf)


def _run(tokenizer, text, *, stop=None, max_tokens=200, eos=2, cancel=None):
    script = tokenizer.encode(text, add_special_tokens=False) + [eos]
    prompt = tokenizer.encode("Say something:")
    model = ScriptedModel(script, len(tokenizer), len(prompt))
    events = list(generate_stream(model, tokenizer, prompt, eos_ids=[eos], sampling=SamplingParams(),
                                  max_tokens=max_tokens, stop=stop, cancel=cancel))
    return script, events


def test_korean_stream_never_splits_a_character(tokenizer):
    text = "안녕하세요, 세계! 한국어 텍스트를 스트리밍합니다. 🌍 mixed with English and code: x = 1"
    script, events = _run(tokenizer, text)
    deltas = [e.text for e in events]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    assert events[-1].finish_reason == "stop"
    assert [e.token for e in events if e.token is not None] == script[:-1]
    assert sum(1 for e in events[:-1] if e.text == "") > 0  # some Korean characters spanned several tokens


def test_stop_string_is_cut_and_never_shown(tokenizer):
    _, events = _run(tokenizer, "The answer is 42.\nUser: and then", stop=["\nUser:"])
    assert "".join(e.text for e in events) == "The answer is 42."
    assert events[-1].finish_reason == "stop"


def test_partial_stop_string_is_released_at_the_end(tokenizer):
    _, events = _run(tokenizer, "Ends with ###", stop=["####"])
    assert "".join(e.text for e in events) == "Ends with ###"


def test_max_tokens_finishes_with_length(tokenizer):
    script, events = _run(tokenizer, "one two three four five six seven eight nine ten", max_tokens=4)
    tokens = [e.token for e in events if e.token is not None]
    assert tokens == script[:4]
    assert events[-1].finish_reason == "length"
    assert events[-1].stats["generation_tokens"] == 4


def test_empty_prompt_and_bad_sampling_are_refused(tokenizer):
    model = ScriptedModel([2], len(tokenizer), 1)
    with pytest.raises(GenerationError):
        list(generate_stream(model, tokenizer, [], eos_ids=[2], sampling=SamplingParams()))
    with pytest.raises(GenerationError):
        list(generate_stream(model, tokenizer, [5], eos_ids=[2], sampling=SamplingParams(temperature=-1)))


@pytest.fixture(scope="module")
def smollm2(smollm2_hf):
    return mlxedge.load(smollm2_hf, bits=8)


@pytest.mark.slow
def test_stream_deltas_concatenate_to_generate_text(smollm2):
    prompt = [{"role": "user", "content": "Tell me a short story about a lighthouse keeper."}]
    events = list(smollm2.stream(prompt, max_tokens=40))
    result = smollm2.generate(prompt, max_tokens=40)
    assert "".join(e.text for e in events) == result.text
    assert [e.token for e in events if e.token is not None] == result.tokens
    final = events[-1]
    assert final.finish_reason == result.finish_reason
    for key in ("prompt_tokens", "generation_tokens", "prompt_tps", "generation_tps", "ttft_s",
                "peak_memory_bytes"):
        assert key in final.stats
    assert final.stats["generation_tokens"] == len(result.tokens) > 0
    assert final.stats["peak_memory_bytes"] > 100e6  # the 8-bit weights alone are ~150 MB
    assert result.text == smollm2.tokenizer.decode(result.tokens)


@pytest.mark.slow
def test_cancel_stops_within_one_token(smollm2):
    cancelled = {"flag": False}
    seen_after_cancel = 0
    tokens = 0
    for event in smollm2.stream("Count from one to one hundred: one, two,", max_tokens=100, raw=True,
                                cancel=lambda: cancelled["flag"]):
        if event.token is not None:
            tokens += 1
            if cancelled["flag"]:
                seen_after_cancel += 1
            if tokens == 5:
                cancelled["flag"] = True
        last = event
    assert last.finish_reason == "cancelled"
    assert seen_after_cancel <= 1
    assert last.stats["generation_tokens"] <= 6


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(smollm2):
    kwargs = dict(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=1234, raw=True)
    a = smollm2.generate("The weather today is", **kwargs)
    b = smollm2.generate("The weather today is", **kwargs)
    assert a.tokens == b.tokens and len(a.tokens) > 0
    c = smollm2.generate("The weather today is", **{**kwargs, "seed": 99})
    assert c.tokens != a.tokens


def test_breaking_out_of_a_stream_is_clean(tokenizer):
    script = tokenizer.encode("a b c d e f g h", add_special_tokens=False)
    model = ScriptedModel(script, len(tokenizer), 1)
    stream = generate_stream(model, tokenizer, [5], eos_ids=[2], sampling=SamplingParams(), max_tokens=50)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
