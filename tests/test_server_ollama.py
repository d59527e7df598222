"""The official `ollama` client drives `mlxedge serve`'s /api routes: chat and generate (streaming NDJSON with
Ollama's final fields, and not), tags, show, ps, pull, version, errors."""

from __future__ import annotations

import ollama
import pytest

from tiny_chat import tiny_chat  # noqa: F401  (fixture)
from engine_fixtures import served  # noqa: F401  (fixtures)

MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]
FINAL_FIELDS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                "eval_duration", "done_reason")


@pytest.fixture(scope="module")
def client(served):
    return ollama.Client(host=served[0], timeout=60)


def test_chat_streaming_matches_non_streaming(client):
    whole = client.chat(model="tiny", messages=MESSAGES, options={"num_predict": 10})
    parts = list(client.chat(model="tiny", messages=MESSAGES, options={"num_predict": 10}, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done
    for final in (whole, parts[-1]):
        assert all(getattr(final, f) is not None for f in FINAL_FIELDS)
        assert final.eval_count == 10 and final.done_reason == "length"
        assert final.total_duration >= final.eval_duration > 0
        assert final.prompt_eval_count > 0


def test_generate_with_stop_and_seed(client):
    full = client.generate(model="tiny", prompt="Once upon a time", raw=True, options={"num_predict": 12}).response
    stop = full.split()[2]
    cut = client.generate(model="tiny", prompt="Once upon a time", raw=True,
                          options={"num_predict": 12, "stop": [stop]})
    assert cut.response == full[: full.index(stop)] and cut.done_reason == "stop"
    opts = {"num_predict": 6, "temperature": 0.9, "seed": 3}
    a = client.generate(model="tiny:latest", prompt="hi", options=opts).response
    assert a == client.generate(model="tiny", prompt="hi", options=opts).response


def test_generate_stream_has_final_fields(client):
    parts = list(client.generate(model="tiny", prompt="hello", stream=True, options={"num_predict": 5}))
    assert parts[-1].done and all(getattr(parts[-1], f) is not None for f in FINAL_FIELDS)
    assert not any(p.done for p in parts[:-1])


def test_tags_show_ps_pull_version(client, served):
    assert [m.model for m in client.list().models] == ["tiny:latest"]
    show = client.show("tiny")
    assert show.details.family == "llama" and show.modelinfo["architecture"] == "llama"
    ps = client.ps().models
    assert [m.model for m in ps] == ["tiny:latest"] and ps[0].size > 0
    assert client.pull("tiny").status == "success"
    assert list(client.pull("tiny", stream=True))[-1].status == "success"
    import json
    import urllib.request
    assert "version" in json.loads(urllib.request.urlopen(served[0] + "/api/version", timeout=10).read())


def test_empty_prompt_loads_and_keep_alive_zero_unloads(client, served):
    engine = served[1]
    r = client.generate(model="tiny", prompt="", keep_alive=0)
    assert r.done and r.done_reason == "unload" and engine.registry.snapshot() == []
    assert client.generate(model="tiny", prompt="").done_reason == "load"
    assert [m["name"] for m in engine.registry.snapshot()] == ["tiny"]


def test_errors_are_json_with_status(client):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="llama3", messages=MESSAGES)
    assert err.value.status_code == 404 and "llama3" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="tiny", messages=MESSAGES, format="json")
    assert err.value.status_code == 400 and "format" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("llama3")
    assert err.value.status_code == 404


def test_keep_alive_forever_and_durations(client, served):
    from mlxedge.server.ollama_api import keep_alive_seconds

    assert keep_alive_seconds("5m") == 300 and keep_alive_seconds("250ms") == 0.25 and keep_alive_seconds(30) == 30
    assert keep_alive_seconds(-1) == float("inf") and keep_alive_seconds("1h") == 3600
    client.generate(model="tiny", prompt="", keep_alive=-1)
    assert client.ps().models[0].expires_at.year >= 2030   # kept: far future, still valid JSON
    assert served[1].registry.snapshot()[0]["expires_in_s"] is None
