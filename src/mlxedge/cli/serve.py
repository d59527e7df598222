"""`mlxedge serve`: the engine behind an OpenAI- and Ollama-compatible HTTP server (loopback by default)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Tuple

import click

from .errors import handles_errors
from .options import load_options


def model_names(specs: Tuple[str, ...]) -> dict:
    """NAME=SOURCE pairs, or a bare SOURCE named after its alias / file stem / directory name."""
    out = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep:
            source = spec
            name = Path(spec).stem if Path(spec).expanduser().exists() else spec
        if not name or not source:
            raise click.BadParameter(f"{spec!r}: give SOURCE or NAME=SOURCE")
        out[name.strip()] = source.strip()
    return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("serve")
@click.argument("models", nargs=-1)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless you mean it).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--api-key", envvar="MLXEDGE_API_KEY", default=None, help="Require 'Authorization: Bearer KEY'.")
@click.option("--allow-origin", multiple=True, help="Allow browser requests (CORS) from this origin; repeatable.")
@click.option("--keep-alive", type=click.FloatRange(min=0), default=300.0, show_default=True,
              help="Seconds an idle model stays loaded.")
@click.option("--max-queue", type=click.IntRange(min=1), default=32, show_default=True,
              help="Requests that may wait; past it the server answers 429 busy.")
@click.option("--max-active", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests generating at once (interleaved token by token).")
@click.option("--max-tokens-limit", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Most tokens one request may ask for.")
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=4 * 1024 * 1024, show_default=True)
@load_options
@handles_errors
def serve_command(models, host, port, api_key, allow_origin, keep_alive, max_queue, max_active, max_tokens_limit,
                  max_body_bytes, load):
    """Serve MODEL(s) (default: smollm2) over HTTP: OpenAI /v1/* and Ollama /api/* routes.

    Each MODEL is an alias, a directory or a .gguf file, optionally NAME=SOURCE; clients ask for it by NAME.
    """
    import uvicorn

    from ..engine import Engine
    from ..server import Limits, create_app

    named = model_names(models or ("smollm2",))
    if not is_loopback(host):
        click.echo(f"warning: binding {host} exposes the server beyond this machine"
                   f"{'' if api_key else ' without an API key (add --api-key)'}", err=True)
    memory_budget = load.pop("memory_budget", None)
    engine = Engine(named, memory_budget=memory_budget, keep_alive=keep_alive, max_queue=max_queue,
                    max_active=max_active, load_options=load)
    try:
        first = next(iter(named))
        click.echo(f"loading {first} ...", err=True)
        engine.load(first)
        app = create_app(engine, api_key=api_key, allow_origins=allow_origin,
                         limits=Limits(max_body_bytes=max_body_bytes, max_tokens=max_tokens_limit,
                                       default_max_tokens=min(512, max_tokens_limit)))
        click.echo(f"serving {', '.join(named)} on http://{host}:{port} (OpenAI: /v1, Ollama: /api)", err=True)
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        engine.close()
