"""`mlxedge generate`: one prompt in, the reply streamed to stdout (or one JSON object with --json)."""

from __future__ import annotations

import sys
from typing import Optional, Tuple

import click

from ..errors import MlxedgeError
from .errors import EXIT_INTERRUPTED, handles_errors
from .options import load_options, sampling_options
from .model_loading import default_model, load_model
from .output import echo_footer, emit_json
from .decoding import draft_options, kv_bits_option, resolve_draft
from .reply import stream_reply
from .sampling import DEFAULTS_HELP, resolve_sampling


@click.command("generate", epilog=DEFAULTS_HELP)
@click.argument("model", required=False)
@click.option("--prompt", "-p", default=None,
              help="The prompt (default: stdin when it is a pipe; '-' reads stdin explicitly).")
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
def generate_command(model: Optional[str], prompt: Optional[str], system: Optional[str], max_tokens: int,
                     stop: Tuple[str, ...], raw: bool, as_json: bool, no_stats: bool, prompt_cache: Optional[str],
                     sampling: dict, draft: dict, load: dict) -> None:
    """Generate a reply to one prompt with MODEL (default: smollm2; an alias, .gguf file, checkpoint
    directory or hub id). Greedy unless sampling flags are given, so the same prompt gives the same text."""
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        prompt = sys.stdin.read()
    if prompt is None:
        raise click.UsageError("give the prompt with -p TEXT, or pipe it in")
    if not prompt.strip():
        raise MlxedgeError("the prompt is empty; pass text with -p, or pipe some in")
    if raw and system:
        raise click.UsageError("--system needs the chat template; drop --raw or --system")
    if prompt_cache and system:
        raise click.UsageError("--system is fixed by the prompt cache; pass it to `mlxedge cache-prompt`")
    model = model or default_model()
    source = [{"role": "system", "content": system}, {"role": "user", "content": prompt}] if system else prompt
    loaded = load_model(model, quiet=as_json, **load)
    settings = resolve_sampling(sampling, loaded.info.get("source"), sample=False)
    extra = resolve_draft(draft, load)
    if prompt_cache:
        extra["prompt_cache"] = prompt_cache
    reply = stream_reply(loaded, source, max_tokens=max_tokens, sampling=settings, echo=not as_json,
                         stop=list(stop) or None, raw=raw, **extra)
    finish, stats = reply.finish_reason, reply.stats or {}
    if as_json:
        emit_json({"model": model, "text": reply.text, "tokens": reply.tokens, "finish_reason": finish,
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
