"""`mlxedge cache-prompt`: prefill a prompt once and save its KV cache for `generate --prompt-cache FILE`."""

from __future__ import annotations

import sys
from typing import Optional

import click

from ..errors import MlxedgeError
from .errors import handles_errors
from .options import load_options
from .model_loading import load_model
from .output import format_bytes
from .decoding import kv_bits_option


@click.command("cache-prompt")
@click.argument("model")
@click.option("--prompt", "-p", required=True, help="The text to cache; '-' reads it from stdin.")
@click.option("--output", "-o", required=True, metavar="FILE", help="Where to write the cache (.safetensors).")
@click.option("--system", "-s", default=None, help="System prompt (with the chat template).")
@click.option("--raw", is_flag=True, help="Cache the text as is, without the model's chat template.")
@load_options
@kv_bits_option
@handles_errors
def cache_prompt_command(model: str, prompt: str, output: str, system: Optional[str], raw: bool, load: dict) -> None:
    """Prefill PROMPT with MODEL and save the KV cache to FILE.

    `mlxedge generate MODEL --prompt-cache FILE -p QUESTION` then answers PROMPT + QUESTION (joined as they
    are) prefilling only QUESTION. The file works only with the same model at the same settings.
    """
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise MlxedgeError("the prompt is empty; pass text with -p, or pipe some into -p -")
    if not output.endswith(".safetensors"):
        raise click.UsageError("the output file must end in .safetensors")
    if raw and system:
        raise click.UsageError("--system needs the chat template; drop --raw or --system")
    loaded = load_model(model, **load)
    done = loaded.cache_prompt(prompt, output, system=system, raw=raw, kv_bits=load.get("kv_bits"))
    click.echo(f"cached {done['tokens']} tokens in {done['seconds']:.1f}s to {output} "
               f"({format_bytes(done['bytes'])})", err=True)
