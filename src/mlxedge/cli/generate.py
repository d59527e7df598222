"""`mlxedge generate`: one prompt in, the reply streamed to stdout (or one JSON object with --json)."""

from __future__ import annotations

import sys
from typing import Optional, Tuple

import click

from ..errors import MlxedgeError
from .chat import Interrupt
from .decoding import draft_options, kv_bits_option, resolve_draft
from .common import EXIT_INTERRUPTED, echo_footer, emit_json, handles_errors, load_model, load_options, sampling_options


@click.command("generate")
@click.argument("model")
@click.option("--prompt", "-p", required=True, help="The prompt; '-' reads it from stdin.")
@click.option("--system", "-s", default=None, help="System prompt (with the chat template).")
@click.option("--max-tokens", "-n", type=click.IntRange(min=0), default=256, show_default=True,
              help="Most tokens to generate.")
@click.option("--stop", multiple=True, help="Stop at this string (repeatable); it is not printed.")
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the model's chat template.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: model, text, tokens, finish_reason, stats.")
@click.option("--no-stats", is_flag=True, help="Hide the footer (tokens, tok/s, time to first token).")
@click.option("--prompt-cache", default=None, metavar="FILE",
              help="A file from `mlxedge cache-prompt`: the prompt continues its cached text, which is not "
                   "prefilled again.")
@sampling_options
@draft_options
@load_options
@kv_bits_option
@handles_errors
def generate_command(model: str, prompt: str, system: Optional[str], max_tokens: int, stop: Tuple[str, ...],
                     raw: bool, as_json: bool, no_stats: bool, prompt_cache: Optional[str], sampling: dict,
                     draft: dict, load: dict) -> None:
    """Generate a reply to one prompt with MODEL (alias, .gguf file, checkpoint directory or hub id)."""
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise MlxedgeError("the prompt is empty; pass text with -p, or pipe some into -p -")
    if raw and system:
        raise click.UsageError("--system needs the chat template; drop --raw or --system")
    if prompt_cache and system:
        raise click.UsageError("--system is fixed by the prompt cache; pass it to `mlxedge cache-prompt`")
    source = [{"role": "system", "content": system}, {"role": "user", "content": prompt}] if system else prompt
    loaded = load_model(model, **load)
    extra = resolve_draft(draft, load)
    if prompt_cache:
        extra["prompt_cache"] = prompt_cache
    text, tokens, finish, stats = [], [], "cancelled", {}
    with Interrupt() as interrupt:
        try:
            for event in loaded.stream(source, max_tokens=max_tokens, stop=list(stop) or None, raw=raw,
                                       cancel=lambda: interrupt.requested, **sampling, **extra):
                text.append(event.text)
                if event.token is not None:
                    tokens.append(event.token)
                if not as_json and event.text:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                if event.finish_reason is not None:
                    finish, stats = event.finish_reason, event.stats
        except KeyboardInterrupt:  # a second Ctrl-C
            finish = "cancelled"
    if interrupt.requested:
        finish = "cancelled"
    if as_json:
        emit_json({"model": model, "text": "".join(text), "tokens": tokens, "finish_reason": finish,
                   "stats": stats})
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        if finish == "cancelled":
            click.echo("[interrupted]", err=True)
        if stats and not no_stats:
            echo_footer(stats, finish)
    if finish == "cancelled":
        sys.exit(EXIT_INTERRUPTED)
