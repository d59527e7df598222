"""How every `mlxedge` command fails: one `error: ...` line and an exit status, never a bare traceback.

`handles_errors` (put it right under `@click.command`) adds `--debug`, refuses arguments that are not UTF-8
text and wraps the body in `run_command`: MlxedgeError and other failures become one line on stderr and
exit status 1; the traceback only with `--debug` (or `mlxedge --debug CMD`, or MLXEDGE_DEBUG=1). Ctrl-C
is one line and exit 130; SIGTERM is handled the same way (cleanups run) with exit 143.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from typing import Callable, Optional

import click

from .progress import _isatty

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process killed by it


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt so `finally`/cleanup code runs."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextmanager
def _sigterm_raises():
    """While a command runs: SIGTERM raises Terminated (main thread only; elsewhere signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


DEBUG_META = "mlxedge.debug"


def _debug_requested(explicit: bool) -> bool:
    if explicit or os.environ.get("MLXEDGE_DEBUG", "").strip() not in ("", "0"):
        return True
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.meta.get(DEBUG_META):
        return True
    root = ctx.find_root() if ctx is not None else None
    return bool(root is not None and isinstance(root.obj, dict) and root.obj.get("debug"))


def fail(message: str, debug: bool = False, status: int = EXIT_ERROR) -> None:
    """Print `error: message` (one line) to stderr, the traceback first when debugging, and exit."""
    if debug:
        traceback.print_exc()
    click.echo(f"error: {message}", err=True)
    sys.exit(status)


def run_command(fn: Callable[[], object], debug: bool = False):
    """Call fn(); turn every failure into one line on stderr and an exit status (1; 130 Ctrl-C; 143 SIGTERM)."""
    from ..errors import MlxedgeError

    try:
        with _sigterm_raises():
            return fn()
    except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
        raise  # usage errors (exit 2) and deliberate exits keep click's own handling
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        # on a terminal, first end the line the ^C was echoed on; a pipe or log gets exactly one line
        click.echo("\ninterrupted" if _isatty(sys.stderr) else "interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Terminated:
        if debug:
            traceback.print_exc()
        click.echo("terminated", err=True)
        sys.exit(EXIT_TERMINATED)
    except MlxedgeError as exc:
        fail(str(exc), debug)
    except BrokenPipeError:
        # the reader went away (`mlxedge ... | head`): stop quietly, and keep Python from complaining at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_ERROR)
    except MemoryError:
        fail("out of memory; try a smaller model, --bits 4, or a shorter --max-tokens", debug)
    except OSError as exc:
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        fail(f"{exc.strerror or exc}{where}; check the path, its permissions and the free disk space", debug)
    except Exception as exc:  # a bug: still one line, with the way to get the details
        fail(f"unexpected {type(exc).__name__}: {exc} (a bug in mlxedge; rerun with --debug for the traceback "
             "and report it)", debug)


def undecodable_argument(kwargs: dict) -> Optional[str]:
    """The one-line complaint about the first text argument that is not valid UTF-8, or None.

    Python decodes argv with surrogateescape: a byte that is not UTF-8 (`-p $'\\xff'`) arrives as a lone
    surrogate that no tokenizer can encode. Values naming an existing path are left alone (a file name
    may be any bytes)."""
    ctx = click.get_current_context(silent=True)
    params = {p.name: p for p in ctx.command.params} if ctx is not None else {}
    for name, value in kwargs.items():
        for text in (value if isinstance(value, (list, tuple)) else (value,)):
            if not isinstance(text, str):
                continue
            if text.isascii() or os.path.lexists(text):
                continue
            from ..tokenizer import utf8_problem

            problem = utf8_problem(text)
            if problem:
                param = params.get(name)
                label = (max(param.opts, key=len) if isinstance(param, click.Option) else
                         param.human_readable_name if param is not None else name)
                return (f"{label} is not valid UTF-8 text ({problem}); pass UTF-8 "
                        "(check the terminal's locale, e.g. LANG=C.UTF-8)")
    return None


def handles_errors(fn):
    """Decorator for a click command callback: adds `--debug`, refuses arguments that are not UTF-8 text,
    and wraps the body in `run_command`."""

    @click.option("--debug", "debug_flag", is_flag=True, help="Show the full traceback on errors.")
    @functools.wraps(fn)
    def wrapper(*args, debug_flag: bool = False, **kwargs):
        debug = _debug_requested(debug_flag)
        ctx = click.get_current_context(silent=True)
        if debug and ctx is not None:
            ctx.meta[DEBUG_META] = True  # what the command calls (e.g. load_model's timing line) sees it too
        problem = undecodable_argument(kwargs)
        if problem:
            fail(problem)
        return run_command(lambda: fn(*args, **kwargs), debug)

    return wrapper


