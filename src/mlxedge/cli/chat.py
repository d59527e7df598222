"""`mlxedge chat`: the interactive REPL (streaming replies, history, in-chat commands) and its pipe mode.

Decisions a user can rely on:
- Ctrl-C while a reply streams stops it, prints "[interrupted]" and returns to the prompt; the interrupted
  exchange (the question and the partial reply) is dropped from the history, so the model never sees a
  half answer. A second Ctrl-C before the stream notices (e.g. during a long prefill) forces the stop.
- Ctrl-C at the prompt discards the line and prints a hint; Ctrl-D or /exit leaves with status 0.
- A reply cut by --max-tokens stays in the history (the footer says it was cut).
- Stdin that is not a terminal is read whole and answered as one prompt; then the program exits.

The conversation itself (turns, history, statistics) is chat_session.ChatSession; this module is the
terminal around it (line editing, history file, /commands) and the `chat` and `run` commands.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click

from ..errors import MlxedgeError
from .errors import EXIT_INTERRUPTED, handles_errors
from .options import load_options, sampling_options
from .model_loading import default_model, load_model
from .output import format_count, format_quantization
from .chat_session import ChatSession
from .decoding import draft_options, kv_bits_option, resolve_draft
from .sampling import DEFAULTS_HELP, describe, resolve_sampling

PROMPT = ">>> "
CONTINUATION = "... "
HISTORY_FILE = "chat_history"
HISTORY_LENGTH = 1000
MULTILINE = '"""'

HELP = """\
Commands:
  /help           this help
  /reset          forget the conversation (keeps the system prompt)
  /stats          statistics of the last reply and of the conversation
  /system TEXT    set the system prompt (/system alone shows it)
  /save FILE      save the conversation and its KV cache (resume with --resume FILE)
  /exit           leave (also /quit, /bye or Ctrl-D)
Ctrl-C stops a reply that is being generated. Start and end a multi-line message with \"\"\"."""


# ------------------------------------------------------------------------------------------------ terminal

def _setup_readline() -> Optional[Path]:
    """Line editing and a persistent history file (under the model cache directory) for a terminal."""
    try:
        import readline
    except ImportError:  # e.g. a Python built without it: plain input() still works
        return None
    from ..paths import cache_root

    path = cache_root() / HISTORY_FILE
    readline.set_history_length(HISTORY_LENGTH)
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    return path


def _save_history(path: Optional[Path]) -> None:
    if path is None:
        return
    import readline

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)
    except OSError:
        pass  # a read-only home must not spoil leaving the chat


def _read_message() -> str:
    """One message from the prompt: a line, or several between triple quotes. Raises EOFError/KeyboardInterrupt."""
    line = input(PROMPT)
    if not line.strip().startswith(MULTILINE):
        return line
    lines = [line.strip()[len(MULTILINE):]]
    while True:
        more = input(CONTINUATION)
        if more.rstrip().endswith(MULTILINE):
            lines.append(more.rstrip()[:-len(MULTILINE)])
            return "\n".join(lines).strip()
        lines.append(more)


def _command(session: ChatSession, line: str) -> bool:
    """Run an in-chat /command; returns False when the chat should end."""
    name, _, arg = line.strip().partition(" ")
    name, arg = name.lower(), arg.strip()
    if name in ("/exit", "/quit", "/bye"):
        return False
    if name in ("/help", "/?"):
        click.echo(HELP)
    elif name == "/reset":
        session.reset()
        click.echo("(conversation cleared)")
    elif name == "/stats":
        click.echo(session.stats_text())
    elif name == "/save":
        if not arg:
            click.echo("usage: /save FILE")
        else:
            try:
                session.save(arg)
                click.echo(f"(saved to {arg}; continue with --resume {arg})")
            except (MlxedgeError, OSError) as exc:
                click.echo(f"error: {exc}", err=True)
    elif name == "/system":
        if arg:
            session.system = arg
            click.echo("(system prompt set)")
        else:
            click.echo(f"system prompt: {session.system}" if session.system else
                       "no system prompt (the model's template default applies)")
    else:
        click.echo(f"unknown command {name}; /help lists the commands")
    return True


def interactive(session: ChatSession, name: str) -> None:
    """The REPL: read, answer, repeat, until /exit or Ctrl-D."""
    history_path = _setup_readline()
    info = session.model.info
    click.echo(f"mlxedge chat · {name} ({info.get('architecture')}, {_size(info)}) · "
               f"{describe(session.sampling)} · /help for commands, Ctrl-D to leave")
    if session.session is None:
        click.echo("(this model has no chat template: each message is answered on its own, without history)")
    try:
        while True:
            try:
                line = _read_message()
            except KeyboardInterrupt:
                click.echo("\n(Ctrl-C stops a reply; /exit or Ctrl-D leaves)")
                continue
            except EOFError:
                click.echo()
                return
            if not line.strip():
                continue
            if line.lstrip().startswith("/"):
                if not _command(session, line):
                    return
                continue
            try:
                session.reply(line)
            except MlxedgeError as exc:  # e.g. the conversation outgrew the context: say so, keep chatting
                click.echo(f"error: {exc}", err=True)
            click.echo()
    finally:
        _save_history(history_path)


def _size(info: dict) -> str:
    return f"{format_count(info.get('parameters'))} params, {format_quantization(info, short=True)}"


def one_shot(session: ChatSession, text: str) -> None:
    """Pipe mode: answer stdin as one message and exit (status 130 if interrupted)."""
    if session.reply(text) == "cancelled":
        sys.exit(EXIT_INTERRUPTED)


def conversation_options(fn):
    """The flags `chat` and `run` share: --system, --max-tokens/-n, --no-stats, --resume, sampling, draft, load
    and KV-cache flags."""
    options = [click.option("--system", "-s", default=None, help="System prompt for the conversation."),
               click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=1024, show_default=True,
                            help="Most tokens per reply."),
               click.option("--no-stats", is_flag=True, help="Hide the footer (tokens, tok/s, time to first token)."),
               click.option("--resume", default=None, metavar="FILE",
                            help="Continue a conversation saved with /save (same model and settings).")]
    fn = load_options(kv_bits_option(draft_options(sampling_options(fn))))
    for option in reversed(options):
        fn = option(fn)
    return fn


def converse(model: Optional[str], prompt: Optional[str], system: Optional[str], max_tokens: int, no_stats: bool,
             sampling: dict, load: dict, resume: Optional[str] = None, draft: Optional[dict] = None) -> None:
    """Chat with the model, or answer `prompt` (or piped stdin) once and exit."""
    name = model or default_model()
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
        if not prompt.strip():
            click.echo("mlxedge: nothing on stdin to answer", err=True)
            return
    if prompt is not None and not prompt.strip():
        raise MlxedgeError("the prompt is empty; give some text, or leave it out to chat")
    loaded = load_model(name, warm_up=True, **load)
    settings = resolve_sampling(sampling, loaded.info.get("source"), sample=True)
    resumed = loaded.load_session(resume) if resume else None
    if resumed is not None and system is not None:
        resumed.system = system
    session = ChatSession(loaded, system, max_tokens, settings, show_stats=not no_stats, session=resumed,
                          draft=resolve_draft(draft or {}, load))
    if resumed is not None:
        click.echo(f"(resumed {len(session.history) // 2} exchanges; {resumed.cached_tokens} tokens cached)", err=True)
    if prompt is not None:
        one_shot(session, prompt.strip())
    else:
        interactive(session, name)


@click.command("chat", epilog=DEFAULTS_HELP)
@click.argument("model", required=False)
@conversation_options
@handles_errors
def chat_command(model: Optional[str], system: Optional[str], max_tokens: int, no_stats: bool,
                 resume: Optional[str], sampling: dict, draft: dict, load: dict) -> None:
    """Chat with MODEL (default: smollm2, pulled on first use).

    MODEL is an alias (see `mlxedge list --available`), a .gguf file, a Hugging Face or mlx-lm directory, or
    a hub id. Replies are sampled (see below); a reply that loops ends with "stopped: repeating".
    With stdin from a pipe, the whole input is answered as one message and the program exits.
    """
    converse(model, None, system, max_tokens, no_stats, sampling, load, resume, draft)


@click.command("run", epilog=DEFAULTS_HELP)
@click.argument("model", required=False)
@click.argument("prompt", required=False)
@conversation_options
@handles_errors
def run_command(model: Optional[str], prompt: Optional[str], system: Optional[str], max_tokens: int,
                no_stats: bool, resume: Optional[str], sampling: dict, draft: dict, load: dict) -> None:
    """Like `ollama run`: chat with MODEL, or answer PROMPT once and exit.

    MODEL defaults to smollm2 (pulled on first use); see `mlxedge list --available`. Without PROMPT (and
    without piped stdin) this is `mlxedge chat MODEL`.
    """
    converse(model, prompt, system, max_tokens, no_stats, sampling, load, resume, draft)
