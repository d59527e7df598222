"""Sessions: each turn prefills only what is new, replies equal a fresh generate over the whole conversation,
cancelled turns leave no trace, and saved sessions reload (also in a new process) into the same model only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import mlxedge
from mlxedge.errors import GenerationError, SourceError
from mlxedge.generate.prompt_cache import common_prefix
from tiny_chat import tiny_chat, tiny_chat_model  # noqa: F401 (tiny_chat: a fixture)
from tiny_chat import tiny_chat_loaded as model  # noqa: F401 (a fixture)

SRC = Path(mlxedge.__file__).resolve().parents[1]


TURNS = ["Hello there, who are you?", "Tell me about lighthouses.", "And about the sea?"]


def test_each_turn_equals_generate_over_the_whole_conversation(model):
    session = model.session(system="Be brief.")
    previous = []
    for text in TURNS:
        full = session.messages + [{"role": "user", "content": text}]
        expected = model.generate(full, max_tokens=12)
        result = session.send(text, max_tokens=12)
        assert result.tokens == expected.tokens and result.text == expected.text
        ids = model.tokenizer.prompt_ids(full)
        # the cache held the previous prompt and reply; everything they share with this prompt was reused
        assert result.stats["cached_prompt_tokens"] == min(common_prefix(previous, ids), len(ids) - 1)
        assert result.stats["prompt_tokens"] == len(ids)
        assert result.finish_reason == "length"
        previous = ids + result.tokens[:-1]  # the last token of a reply cut by max_tokens never went through
    assert result.stats["cached_prompt_tokens"] > 40
    assert session.messages[0] == {"role": "system", "content": "Be brief."}
    assert [m["content"] for m in session.messages[1::2]] == TURNS


# Renders a header that depends on the conversation's length: every turn changes the first tokens
RECOUNTING = ("<|im_start|>system\n{{ messages|length }} messages so far<|im_end|>\n"
              "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_templates_that_rerender_earlier_turns_still_give_the_right_reply(tiny_chat):
    model = mlxedge.load(tiny_chat)
    model.tokenizer.chat_template = RECOUNTING
    session = model.session()
    for text in TURNS:
        expected = model.generate(session.messages + [{"role": "user", "content": text}], max_tokens=10)
        result = session.send(text, max_tokens=10)
        assert result.tokens == expected.tokens
    assert result.stats["cached_prompt_tokens"] < 5  # the count changed near the start: little to reuse


def test_cancelled_or_abandoned_turns_leave_the_session_as_it_was(model):
    session = model.session()
    session.send(TURNS[0], max_tokens=8)
    before = session.messages
    calls = []
    result = session.send(TURNS[1], max_tokens=20, cancel=lambda: calls.append(1) or len(calls) >= 3)
    assert result.finish_reason == "cancelled" and 1 <= len(result.tokens) <= 3  # polled in prefill too
    assert session.messages == before
    stream = session.stream(TURNS[1], max_tokens=20)
    next(stream)
    stream.close()  # abandoned after one token
    assert session.messages == before
    expected = model.generate(before + [{"role": "user", "content": TURNS[2]}], max_tokens=10)
    assert session.send(TURNS[2], max_tokens=10).tokens == expected.tokens


def test_one_turn_at_a_time_and_bad_messages(model):
    session = model.session()
    stream = session.stream("hi", max_tokens=5)
    next(stream)
    with pytest.raises(GenerationError, match="already generating"):
        session.send("again")
    stream.close()
    with pytest.raises(GenerationError, match="string or a"):
        session.send(42)
    session.send("fine", max_tokens=2)
    session.reset()
    assert session.messages == []


def test_session_without_chat_template_is_refused(model, tiny_chat):
    plain = mlxedge.load(tiny_chat)
    plain.tokenizer.chat_template = None
    with pytest.raises(GenerationError, match="chat template"):
        plain.session()


def test_rotating_session_matches_generate_past_the_window(tiny_chat):
    model = mlxedge.load(tiny_chat, context_length=48, kv_overflow="rotate")
    session = model.session()
    for text in TURNS:
        expected = model.generate(session.messages + [{"role": "user", "content": text}], max_tokens=16)
        result = session.send(text, max_tokens=16)
        assert result.tokens == expected.tokens
    assert result.stats["prompt_tokens"] > 48 and result.stats["cached_prompt_tokens"] > 0
    assert all(layer["kind"] == "RotatingKVCache" and layer["held"] <= 48 for layer in session.cache_info())
    # a wrapped window cannot be trimmed: a template that changes early tokens makes the session start over
    model.tokenizer.chat_template = RECOUNTING
    expected = model.generate(session.messages + [{"role": "user", "content": "Bye."}], max_tokens=8)
    result = session.send("Bye.", max_tokens=8)
    assert result.tokens == expected.tokens and result.stats["cached_prompt_tokens"] == 0


def test_quantized_cache_session_saves_and_reloads(smollm2_hf, tmp_path):
    directory = tiny_chat_model(smollm2_hf, name="hd64", head_dim=64, num_attention_heads=2,
                                num_key_value_heads=1, hidden_size=128)
    model = mlxedge.load(directory)
    session = model.session(kv_bits=8)
    session.send(TURNS[0], max_tokens=6)
    assert {layer["kind"] for layer in session.cache_info()} == {"QuantizedKVCache"}
    session.save(tmp_path / "q.safetensors")
    original = session.send(TURNS[1], max_tokens=8)
    reloaded = model.load_session(tmp_path / "q.safetensors")
    assert {layer["kind"] for layer in reloaded.cache_info()} == {"QuantizedKVCache"}
    again = reloaded.send(TURNS[1], max_tokens=8)
    assert again.tokens == original.tokens
    assert again.stats["cached_prompt_tokens"] == original.stats["cached_prompt_tokens"] > 0


def test_saved_session_continues_identically_in_a_new_process(model, tiny_chat, tmp_path):
    session = model.session(system="Be brief.")
    session.send(TURNS[0], max_tokens=8)
    session.send(TURNS[1], max_tokens=8)
    path = tmp_path / "chat.safetensors"
    session.save(path)
    original = session.send(TURNS[2], max_tokens=16)
    code = (f"import json, mlxedge\n"
            f"m = mlxedge.load({str(tiny_chat)!r})\n"
            f"s = m.load_session({str(path)!r})\n"
            f"r = s.send({TURNS[2]!r}, max_tokens=16)\n"
            f"print(json.dumps({{'tokens': r.tokens, 'cached': r.stats['cached_prompt_tokens'], "
            f"'messages': s.messages}}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert out.returncode == 0, out.stderr
    reloaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert reloaded["tokens"] == original.tokens
    assert reloaded["cached"] == original.stats["cached_prompt_tokens"] > 40  # the file's cache was used
    assert reloaded["messages"] == session.messages


def test_session_file_refuses_another_model_and_other_files(model, tiny_chat, tmp_path):
    session = model.session()
    with pytest.raises(SourceError, match="empty"):
        session.save(tmp_path / "empty.safetensors")
    session.send("hi", max_tokens=3)
    path = tmp_path / "s.safetensors"
    session.save(path)
    with pytest.raises(SourceError, match="another model"):
        mlxedge.load(tiny_chat, bits=8, group_size=32).load_session(path)
    with pytest.raises(SourceError, match="safetensors suffix"):
        session.save(tmp_path / "s.bin")
    (tmp_path / "junk.safetensors").write_bytes(b"not a cache")
    with pytest.raises(SourceError, match="not an mlxedge cache file"):
        model.load_session(tmp_path / "junk.safetensors")
    model.cache_prompt("some text", tmp_path / "p.safetensors")
    with pytest.raises(SourceError, match="prompt cache, not a session"):
        model.load_session(tmp_path / "p.safetensors")
    assert list(tmp_path.glob(".*")) == []  # no temporary left behind


@pytest.mark.slow
def test_smollm2_thousand_token_conversation_reply_equals_generate(smollm2_gguf, prose):
    """The default model, a ~1,000-token conversation: the session's next greedy reply is generate's."""
    model = mlxedge.load(smollm2_gguf)
    session = model.session(system="You are a helpful assistant.")
    for part in (prose[:1500], prose[1500:3000], prose[3000:4500]):
        session.send("Summarize in one sentence:\n" + part, max_tokens=8)
    question = "Which part was the most interesting?"
    full = session.messages + [{"role": "user", "content": question}]
    expected = model.generate(full, max_tokens=24)
    result = session.send(question, max_tokens=24)
    assert expected.stats["prompt_tokens"] >= 1000
    assert result.tokens == expected.tokens
    assert result.stats["prompt_tokens"] - result.stats["cached_prompt_tokens"] < 40  # only the new turn
