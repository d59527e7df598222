"""Safety of `mlxedge serve`: a client that hangs up cancels its generation within one token, a model over the
budget is a JSON error and the server stays up, busy is 429, API key, body limit, CORS off by default,
health and metrics."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import pytest

import mlxedge
from tiny_chat import tiny_chat  # noqa: F401  (fixture)
from engine_fixtures import live_server, served, wait_for  # noqa: F401  (fixtures)
from mlxedge.engine import Engine
from mlxedge.server import Limits

MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


def post(url, path, body, headers=None, timeout=60):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json",
                                                                  **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def get(url, path, headers=None):
    req = urllib.request.Request(url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def open_stream(url, path, body):
    """A raw HTTP/1.1 streaming request on a socket we can slam shut mid-stream."""
    host, port = url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 1500, "stream": True}),
    ("/api/chat", {"model": "tiny", "messages": MESSAGES, "options": {"num_predict": 1500}}),
    ("/v1/completions", {"model": "tiny", "prompt": "Once", "max_tokens": 1500}),   # non-streaming
])
def test_disconnect_cancels_generation_within_one_token(served, path, body):
    url, engine = served
    before = len(engine.recent)
    sock = open_stream(url, path, body)
    if body.get("stream", True) and "prompt" not in body:
        received = b""
        while received.count(b"\n\n" if path.startswith("/v1") else b"}\n") < 4:
            received += sock.recv(4096)
    else:
        wait_for(lambda: engine.active_count() == 1)
        time.sleep(0.2)
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    handle = wait_for(lambda: next((h for h in list(engine.recent)[before:]), None), timeout=30)
    assert handle.final.finish_reason == "cancelled"
    assert handle.tokens_after_cancel <= 1
    assert handle.final.stats["generation_tokens"] < 1500
    status, _, _ = post(url, "/v1/completions", {"model": "tiny", "prompt": "still there?", "max_tokens": 2})
    assert status == 200


def test_model_over_budget_is_a_json_error_and_server_stays_up(tiny_chat, smollm2_hf):
    budget = mlxedge.plan(str(tiny_chat))["total_bytes"] + 16 * 1024 * 1024
    engine = Engine({"tiny": str(tiny_chat), "big": str(smollm2_hf)}, memory_budget=budget)
    try:
        with live_server(engine) as url:
            status, body, _ = post(url, "/v1/chat/completions", {"model": "big", "messages": MESSAGES})
            error = json.loads(body)["error"]
            assert status == 400 and error["code"] == "over_budget" and "budget" in error["message"]
            status, body, _ = post(url, "/api/generate", {"model": "big", "prompt": "hi"})
            assert status == 400 and "budget" in json.loads(body)["error"]
            assert get(url, "/health")[0] == 200
            status, body, _ = post(url, "/v1/chat/completions", {"model": "tiny", "messages": MESSAGES,
                                                                 "max_tokens": 2})
            assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 2
    finally:
        engine.close()


def test_full_queue_answers_429_busy(tiny_chat):
    engine = Engine({"tiny": str(tiny_chat)}, max_queue=1, max_active=1)
    try:
        with live_server(engine) as url:
            sock = open_stream(url, "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 1500,
                                                        "stream": True})
            wait_for(lambda: engine.active_count() == 1)
            waiting = open_stream(url, "/v1/completions", {"model": "tiny", "prompt": "b", "max_tokens": 1500,
                                                           "stream": True})
            wait_for(lambda: engine.queue_depth() == 1)
            status, body, headers = post(url, "/v1/completions", {"model": "tiny", "prompt": "c", "max_tokens": 2})
            assert status == 429 and json.loads(body)["error"]["type"] == "rate_limit_error"
            assert headers.get("retry-after") == "1"
            status, body, _ = post(url, "/api/generate", {"model": "tiny", "prompt": "c"})
            assert status == 429 and "busy" in json.loads(body)["error"]
            for s in (sock, waiting):
                s.close()
    finally:
        engine.close()


def test_api_key_body_limit_and_cors(tiny_chat):
    engine = Engine({"tiny": str(tiny_chat)})
    try:
        with live_server(engine, api_key="sekrit", limits=Limits(max_body_bytes=2048)) as url:
            body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
            status, payload, _ = post(url, "/v1/completions", body)
            assert status == 401 and "API key" in json.loads(payload)["error"]["message"]
            assert post(url, "/v1/completions", body, {"Authorization": "Bearer wrong"})[0] == 401
            assert post(url, "/v1/completions", body, {"Authorization": "Bearer sekrit"})[0] == 200
            assert get(url, "/health")[0] == 200  # liveness needs no key
            status, payload, _ = post(url, "/v1/completions", {**body, "prompt": "x" * 5000},
                                      {"Authorization": "Bearer sekrit"})
            assert status == 413 and "body" in json.loads(payload)["error"]["message"]
            _, _, headers = get(url, "/v1/models", {"Authorization": "Bearer sekrit", "Origin": "http://evil.test"})
            assert "access-control-allow-origin" not in {k.lower() for k in headers}
        with live_server(engine, allow_origins=["http://app.test"]) as url:
            _, _, headers = get(url, "/v1/models", {"Origin": "http://app.test"})
            assert {k.lower(): v for k, v in headers.items()}["access-control-allow-origin"] == "http://app.test"
    finally:
        engine.close()


def test_health_metrics_and_unknown_route(served):
    url, _ = served
    post(url, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2})
    status, body, _ = get(url, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body, headers = get(url, "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("mlxedge_http_requests_total{path=\"/v1/completions\",status=\"200\"}", "mlxedge_ttft_seconds_count",
                 "mlxedge_generation_tokens_per_second_bucket", "mlxedge_queue_depth", "mlxedge_resident_bytes",
                 "mlxedge_prefix_cache_hits", "mlxedge_generated_tokens_total"):
        assert name in text, name
    status, body, _ = get(url, "/v2/nothing")
    assert status == 404 and "no such endpoint" in json.loads(body)["error"]["message"]


def test_serve_cli_helpers():
    from mlxedge.cli.serve import is_loopback, model_names

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    assert model_names(("smollm2", "mine=/x/y.gguf")) == {"smollm2": "smollm2", "mine": "/x/y.gguf"}


def test_json_body_without_json_content_type(served):
    """Ollama's docs use `curl -d '{...}'`, which says application/x-www-form-urlencoded."""
    url, _ = served
    status, body, _ = post(url, "/api/generate", {"model": "tiny", "prompt": "hi", "stream": False,
                                                  "options": {"num_predict": 2}},
                           {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and json.loads(body)["eval_count"] == 2
