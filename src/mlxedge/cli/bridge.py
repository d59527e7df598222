"""`mlxedge bridge`: the engine over stdin/stdout JSON lines for native apps (protocol in docs/bridge.md)."""

from __future__ import annotations

import logging
import sys

import click


@click.command("bridge")
@click.option("--model", default=None, help="Model used when a request names none (loaded on first use).")
@click.option("--memory-budget", default=None, metavar="SIZE", help="Memory all loaded models may use, e.g. 6GB.")
@click.option("--keep-alive", type=click.FloatRange(min=0), default=300.0, show_default=True,
              help="Seconds an idle model stays loaded.")
@click.option("--max-queue", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--max-active", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="warning",
              show_default=True, help="Log verbosity (the log goes to stderr).")
def bridge_command(model, memory_budget, keep_alive, max_queue, max_active, log_level):
    """Serve the bridge protocol on stdin/stdout until EOF or SIGTERM (exit 0). Logs go to stderr."""
    from importlib.metadata import version

    from ..bridge import run_stdio
    from ..engine import Engine

    logging.basicConfig(stream=sys.stderr, level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    engine = Engine(None, memory_budget=memory_budget, keep_alive=keep_alive, max_queue=max_queue,
                    max_active=max_active)
    sys.exit(run_stdio(engine, default_model=model, version=version("mlxedge")))
