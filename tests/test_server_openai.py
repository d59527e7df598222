"""The official `openai` client drives `mlxedge serve`'s /v1 routes: chat and completions, streaming and not,
stop strings, logprobs, usage, an unknown model and bad requests."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from tiny_chat import tiny_chat  # noqa: F401  (fixture)
from engine_fixtures import served  # noqa: F401  (fixtures)
from mlxedge.engine import Request

MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]


@pytest.fixture(scope="module")
def client(served):
    url, _ = served
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def engine_text(engine, prompt, raw, max_tokens, **kw):
    events = list(engine.submit(Request("tiny", prompt, raw=raw, max_tokens=max_tokens, **kw)))
    return "".join(e.text for e in events if e.kind == "delta"), events


def test_models_lists_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_non_streaming_equals_engine(client, served):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10)
    text, events = engine_text(served[1], MESSAGES, False, 10)
    assert r.choices[0].message.content == text and text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 10
    assert r.usage.prompt_tokens == events[-1].stats["prompt_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + 10
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_streaming_joins_to_the_same_text_and_reports_usage(client):
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12).choices[0].message.content
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_sse_ends_with_done_marker(served):
    url, _ = served
    body = json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    raw = urllib.request.urlopen(req, timeout=60).read().decode()
    lines = [ln for ln in raw.split("\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"


def test_completion_streaming_and_not(client, served):
    prompt = "Once upon a time"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8)
    text, _ = engine_text(served[1], prompt, True, 8)
    assert r.choices[0].text == text and r.object == "text_completion"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompt, max_tokens=8, stream=True) if c.choices)
    assert streamed == text


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_reply(client, stream):
    prompt = "The quick brown fox"
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=12).choices[0].text
    words = full.split()
    assert len(words) >= 3
    stop = words[2]
    expected = full[: full.index(stop)]
    if stream:
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, stop=[stop],
                                                stream=True))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    else:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, stop=stop)
        text, reason = r.choices[0].text, r.choices[0].finish_reason
    assert text == expected and reason == "stop"


def test_chat_logprobs_streaming_and_not(client, served):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    _, events = engine_text(served[1], MESSAGES, False, 5, logprobs=True, top_logprobs=2)
    expected = [e.logprob for e in events if e.kind == "delta" and e.logprob]
    assert [c.logprob for c in content] == pytest.approx([e["logprob"] for e in expected], abs=1e-6)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
               for c in content)
    assert all(c.logprob <= 0 for c in content)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, logprobs=True,
                                                 stream=True))
    streamed = [t.logprob for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert streamed == pytest.approx([c.logprob for c in content], abs=1e-6)


def test_completion_logprobs(client):
    r = client.completions.create(model="tiny", prompt="Hello there", max_tokens=4, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(len(t) == 3 for t in lp.top_logprobs)


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=8, temperature=1.0, top_p=0.9)
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    assert a == b


def test_unknown_model_is_404_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert err.value.body["code"] == "model_not_found"
    assert "gpt-4o" in err.value.body["message"]


@pytest.mark.parametrize("kwargs, param", [
    ({"n": 2}, "n"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
    ({"max_tokens": 10**6}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
])
def test_bad_requests_are_400_naming_the_parameter(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=MESSAGES, **kwargs)
    assert param in err.value.body["message"] or err.value.body.get("param") == param


def test_malformed_json_body_is_a_json_400(served):
    req = urllib.request.Request(served[0] + "/v1/chat/completions", data=b"{not json",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400
    assert json.loads(err.value.read())["error"]["type"] == "invalid_request_error"
