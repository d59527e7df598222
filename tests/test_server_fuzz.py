"""Property-based: request bodies drawn by hypothesis (valid fields, wrong types, junk, non-objects) against
every POST route of the server never give a 5xx, never hang, and always answer JSON (or a complete stream)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tiny_chat import tiny_chat  # noqa: F401  (fixture)
from engine_fixtures import live_server
from mlxedge.engine import Engine
from mlxedge.server import Limits


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                    | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                max_size=3), max_leaves=6)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "bogus"]),
                                 "content": st.one_of(st.text(max_size=20), JSON)})
SMALL = st.integers(-3, 12)
FIELDS = {
    "model": st.sampled_from(["tiny", "tiny", "tiny", "tiny:latest", "missing", ""]) | JSON,
    "messages": st.lists(MESSAGE, max_size=3) | JSON,
    "prompt": st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=2) | JSON,
    "max_tokens": SMALL | JSON, "max_completion_tokens": SMALL, "temperature": st.floats(-1, 3) | JSON,
    "top_p": st.floats(-0.5, 1.5), "seed": st.integers(-5, 2**64), "stop": st.text(max_size=3) | JSON,
    "n": st.integers(0, 3), "stream": st.booleans() | JSON, "logprobs": st.booleans() | st.integers(-1, 8),
    "top_logprobs": st.integers(-1, 30), "response_format": JSON,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | JSON,
    "options": st.fixed_dictionaries({}, optional={"num_predict": SMALL, "temperature": st.floats(-1, 3),
                                                   "top_k": st.integers(-2, 50), "seed": st.integers(-2, 99),
                                                   "stop": st.lists(st.text(max_size=3), max_size=2),
                                                   "repeat_penalty": st.floats(-1, 3)}) | JSON,
    "format": JSON, "keep_alive": st.sampled_from(["5m", "10s", "-1", "soon", 30, -1]) | JSON,
    "raw": st.booleans(), "system": st.text(max_size=10),
}
ROUTES = {
    "/v1/chat/completions": ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                             "seed", "stop", "n", "stream", "logprobs", "top_logprobs", "response_format",
                             "stream_options"],
    "/v1/completions": ["model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream",
                        "logprobs", "stream_options"],
    "/api/chat": ["model", "messages", "stream", "options", "format", "keep_alive"],
    "/api/generate": ["model", "prompt", "stream", "options", "format", "raw", "system", "keep_alive"],
    "/api/show": ["model"],
    "/api/pull": ["model", "stream"],
}


@pytest.fixture(scope="module")
def fuzz_url(tiny_chat):
    engine = Engine({"tiny": str(tiny_chat)}, keep_alive=3600)
    try:
        with live_server(engine, limits=Limits(max_tokens=8, default_max_tokens=4)) as url:
            yield url
    finally:
        engine.close()


VALID = {"model": st.just("tiny"), "messages": st.lists(st.fixed_dictionaries(
    {"role": st.just("user"), "content": st.text(max_size=20)}), min_size=1, max_size=2),
    "prompt": st.text(min_size=1, max_size=20)}


def bodies(route):
    """Mostly a valid core with fuzzed extras (so generation runs), else everything fuzzed, else junk."""
    fields = ROUTES[route]
    core = {f: VALID[f] for f in fields if f in VALID}
    extras = {f: FIELDS[f] for f in fields if f not in core}
    near_valid = st.fixed_dictionaries(core, optional=extras)
    fuzzed = st.fixed_dictionaries({}, optional={f: FIELDS[f] for f in fields})
    return st.one_of(near_valid, near_valid, fuzzed).map(lambda d: json.dumps(d).encode()) | \
        JSON.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=40)


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_no_server_error_and_no_hang(fuzz_url, route):
    seen = set()

    @settings(max_examples=30, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(body=bodies(route))
    def check(body):
        req = urllib.request.Request(fuzz_url + route, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:   # a hang fails here, not forever
                status, payload, ctype = r.status, r.read(), r.headers.get("content-type", "")
        except urllib.error.HTTPError as err:
            status, payload, ctype = err.code, err.read(), err.headers.get("content-type", "")
        assert status < 500, (status, payload[:300])
        seen.add(status // 100)
        if "event-stream" in ctype:
            assert payload.decode().rstrip().endswith("data: [DONE]")
        elif "ndjson" in ctype:
            lines = [json.loads(x) for x in payload.decode().splitlines() if x]
            assert lines and (lines[-1].get("done") or lines[-1].get("status") == "success" or "error" in lines[-1])
        else:
            parsed = json.loads(payload)
            if status >= 400:
                assert "error" in parsed

    check()
    assert seen == {2, 4}, f"the drawn bodies should reach both answers and refusals, saw {sorted(seen)}xx"
