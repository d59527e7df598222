"""Helpers shared by the engine and server tests: a live in-process server and a bounded wait."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

import pytest

# httpx (under the openai/ollama clients) insists on SSL_CERT_FILE when it is set; a stale value breaks even
# plain-HTTP loopback clients
if not os.path.exists(os.environ.get("SSL_CERT_FILE", "/")):
    os.environ.pop("SSL_CERT_FILE", None)


@contextmanager
def live_server(engine, **app_options):
    """Serve create_app(engine) with uvicorn on 127.0.0.1 at an ephemeral port; yield the base URL."""
    import uvicorn

    from mlxedge.server import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(engine, **app_options), host="127.0.0.1", port=0,
                                           log_level="error", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


@pytest.fixture(scope="module")
def served(tiny_chat):
    """(base URL, engine) of a live server for the tiny chat model, named "tiny"."""
    from mlxedge.engine import Engine

    engine = Engine({"tiny": str(tiny_chat)})
    try:
        with live_server(engine) as url:
            yield url, engine
    finally:
        engine.close()
