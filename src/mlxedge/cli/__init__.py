"""The `mlxedge` command line: a click group over the public API (one module per concern, no model logic here)."""

from __future__ import annotations

import sys

try:  # a Ctrl-C while the commands (and what they import) load: one line, not a traceback
    import click

    from .bridge import bridge_command
    from .cache_prompt import cache_prompt_command
    from .chat import chat_command, run_command
    from .evaluation import bench_command, eval_command
    from .generate import generate_command
    from .models import convert_command, info_command, list_command, pull_command
    from .plan import plan_command
    from .serve import serve_command  # fastapi/uvicorn are imported only when `serve` runs
    from .interrupts import hold_interrupts_in_native_imports
    from .startup import keep_torch_out, running_as_program
except KeyboardInterrupt:
    sys.stderr.write("interrupted\n")
    raise SystemExit(130) from None

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT_SETTINGS)
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors (any command).")
@click.version_option(package_name="mlxedge", prog_name="mlxedge")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """mlxedge: run LLMs on this machine with MLX.

    Start with `mlxedge run` (chats with the default model, smollm2, pulled on first use), or
    `mlxedge run MODEL "PROMPT"` for one answer.
    """
    keep_torch_out()
    if running_as_program():
        hold_interrupts_in_native_imports()
    ctx.obj = {"debug": debug}


for _command in (run_command, chat_command, generate_command, pull_command, list_command, info_command, convert_command,
                 plan_command, bench_command, eval_command, cache_prompt_command, serve_command, bridge_command):
    main.add_command(_command)

__all__ = ["main"]
