"""`mlxedge bench` (speed, llama-bench style) and `mlxedge eval` (perplexity and KL divergence, llama-perplexity
style): parse flags, call bench.bench / evaluate.run, print a table, JSON or a plot."""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import click

from ..errors import MlxedgeError
from ..evaluate import DEFAULT_CTX, QUICK_CHUNKS, QUICK_CTX
from ..table import render_table
from .errors import handles_errors
from .options import ALLOW_REQUANTIZE_HELP, GROUP_SIZE_HELP
from .model_loading import load_model, resolve_source
from .progress import _isatty, progress_bar
from .output import emit_json, format_bytes, format_quantization
from .requantization import cost_line, measure_cost

DTYPE_CHOICE = click.Choice(["float32", "float16", "bfloat16"])


def _stderr(message: str) -> None:
    click.echo(message, err=True)


def _check_plot_available(path: Optional[str]) -> None:
    if path is None:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MlxedgeError("--plot needs matplotlib: pip install 'mlxedge[plot]'") from None


def variant_options(fn):
    """--bits LIST / --group-size / --dtype / --allow-requantize: the precisions bench and eval run (see
    bench.variants.parse_variants)."""
    options = [
        click.option("--bits", default=None, metavar="LIST",
                     help="Precisions, e.g. 16,8,4 (16 = unquantized in --dtype, 32 = float32). "
                          "Default: the model as stored."),
        click.option("--group-size", type=click.Choice(["32", "64", "128"]), default=None,
                     callback=lambda c, p, v: None if v is None else int(v), help=GROUP_SIZE_HELP),
        click.option("--dtype", type=DTYPE_CHOICE, default=None,
                     help="compute dtype (16 = bfloat16 unless set; quantized variants default to float32 "
                          "without Metal)."),
        click.option("--allow-requantize", is_flag=True,
                     help=ALLOW_REQUANTIZE_HELP + " With it, the measured cost is printed per variant."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.command("bench")
@handles_errors
@click.argument("model")
@variant_options
@click.option("--n-prompt", "--pp", "n_prompt", type=click.IntRange(min=1), default=512, show_default=True,
              help="Prompt tokens of the prompt-processing test (ppN).")
@click.option("--n-gen", "--tg", "n_gen", type=click.IntRange(min=2), default=128, show_default=True,
              help="Tokens generated in the generation test (tgN; EOS ignored). Not -n: elsewhere -n is "
                   "--max-tokens.")
@click.option("-r", "--repetitions", type=click.IntRange(min=1), default=5, show_default=True,
              help="Repetitions after the warm-up.")
@click.option("--compare", type=click.Choice(["mlx-lm"]), default=None,
              help="Run mlx-lm on the same weights and settings, interleaved, and report ratios.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--md", "as_md", is_flag=True, help="Print a markdown table.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, metavar="FILE.png",
              help="Draw the variants side by side (needs mlxedge[plot]).")
@click.option("--remeasure-bandwidth", is_flag=True, help="Measure the memory bandwidth again (it is cached).")
def bench_command(model, bits, group_size, dtype, allow_requantize, n_prompt, n_gen, repetitions, compare, as_json,
                  as_md, plot_path, remeasure_bandwidth):
    """Prompt-processing and generation speed of MODEL, per precision (llama-bench's pp/tg conventions)."""
    from ..bench import bench  # imported when the command runs (MLX); `--help` should not
    from ..bench.variants import check_variants, parse_variants
    from ..bench.views import format_table, plot

    if as_json and as_md:
        raise MlxedgeError("choose one of --json and --md.")
    _check_plot_available(plot_path)
    variants = parse_variants(bits, group_size, dtype, allow_requantize)
    source = resolve_source(model, quiet=as_json)
    coarser = check_variants(source, variants)  # a refused variant stops here, before any runs
    steps = len(variants) * repetitions
    with progress_bar("Benchmarking", unit="repetitions", enabled=not as_json) as progress:
        result = bench(source, variants, p=n_prompt, n=n_gen, reps=repetitions, compare=compare,
                         remeasure_bandwidth=remeasure_bandwidth,
                         log=None if as_json else _bench_log(progress, steps))
    result["model"] = model
    by_label = {v.label: v for v in variants}
    for row in result["variants"]:
        if row["label"] in coarser:
            row["requantized_coarser"] = coarser[row["label"]]
            row["requantization_cost"] = measure_cost(source, as_json, **by_label[row["label"]].load_kwargs())
    if plot_path:
        result["plot"] = str(plot(result, plot_path))
    if as_json:
        emit_json(result)
    else:
        click.echo(format_table(result, markdown=as_md))
        _echo_costs(result["variants"])
        if plot_path:
            _stderr(f"plot written to {plot_path}")


def _echo_costs(rows) -> None:
    for row in rows:
        if row.get("requantization_cost"):
            click.echo(cost_line(len(row["requantized_coarser"]), row["requantization_cost"], row["label"]))


def _bench_log(progress, steps: int):
    """bench's log lines: "[label] repetition i/n" advance the bar (on a terminal); others are printed."""
    done = [0]

    def log(message: str) -> None:
        if " repetition " in message:
            done[0] += 1
            progress(done[0], steps, note=message)
            if not _isatty(sys.stderr):
                _stderr(message)
        else:
            _stderr(message)

    return log


def _eval_rows(result: dict) -> tuple:
    has_ref = result.get("reference") is not None
    header = ["variant", "size", "bpw", "PPL"]
    if has_ref:
        header += ["ln(PPL/PPL_ref)", "mean KLD", "median KLD", "p99 KLD", "max KLD", "top-1 %", "RMS Δp %"]
    rows = []
    for v in result["variants"]:
        row = [v["label"], format_bytes(v["bytes"]), f"{v['bits_per_weight']:.2f}",
               f"{v['perplexity']:.4f} ± {v['perplexity_error']:.4f}"]
        if has_ref:
            row += [f"{v['ln_ppl_ratio']:+.5f}", f"{v['kld_mean']:.6f} ± {v['kld_mean_error']:.6f}",
                    f"{v['kld_median']:.6f}", f"{v['kld_p99']:.6f}", f"{v['kld_max']:.6f}",
                    f"{100 * v['top1_agreement']:.2f} ± {100 * v['top1_agreement_error']:.2f}",
                    f"{100 * v['rms_delta_p']:.3f} ± {100 * v['rms_delta_p_error']:.3f}"]
        rows.append(row)
    return header, rows


def format_eval(result: dict, markdown: bool = False) -> str:
    """The eval result as the table `mlxedge eval` prints."""
    s = result["settings"]
    lines = [f"model: {result['model']}",
             f"text: {result['text']} ({s['text_tokens']} tokens); ctx {s['ctx']}, {s['chunks']} chunks, "
             f"{s['scored_per_chunk']} scored per chunk (second half), {result['variants'][0]['tokens_scored']} "
             "scored in all"]
    ref = result.get("reference")
    if ref:
        lines.append(f"reference: {ref['source']} ({ref['label']}), PPL {ref['perplexity']:.4f} ± "
                     f"{ref['perplexity_error']:.4f}")
    lines.append("")
    header, rows = _eval_rows(result)
    return "\n".join(lines + render_table(header, rows, markdown))


def _evaluate(model: str, variants, reference: Optional[str], text: str, text_label: str, ctx: int,
              chunks: Optional[int], quiet: bool = False, dequantize: bool = False) -> dict:
    """evaluate.run with the CLI's loading (aliases pulled, a bar per model) and an "Evaluating" bar that
    starts with the first forward pass, once every model is loaded."""
    from .. import evaluate

    def load(source, **kwargs):
        return load_model(resolve_source(source, quiet=quiet), quiet=quiet, **kwargs)

    with ExitStack() as stack:
        bar = []

        def progress(done: int, total: int) -> None:
            if not bar:
                bar.append(stack.enter_context(progress_bar("Evaluating", unit="forward passes", enabled=not quiet)))
            bar[0](done, total)

        return evaluate.run(model, variants, text, text_label, ctx=ctx, chunks=chunks, reference=reference,
                            load=load, progress=progress, describe=lambda info: format_quantization(info, short=True),
                            dequantize=dequantize)


@click.command("eval")
@handles_errors
@click.argument("model")
@variant_options
@click.option("--reference", default=None, metavar="MODEL2",
              help="Reference for KL divergence (default with --bits: MODEL as stored, unquantized).")
@click.option("--no-reference", is_flag=True, help="Perplexity only, no KL divergence.")
@click.option("--text", "text_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="UTF-8 text file to evaluate on (default: Python's built-in pydoc topic texts).")
@click.option("--ctx", type=click.IntRange(min=4), default=None,
              help=f"Tokens per chunk; the second half of each chunk is scored (default {QUICK_CTX}; --full: "
                   f"{DEFAULT_CTX}).")
@click.option("--chunks", type=click.IntRange(min=1), default=None,
              help=f"Evaluate at most this many chunks (default {QUICK_CHUNKS}, about a minute for a small model "
                   "on a CPU; --full: all of the text).")
@click.option("--full", is_flag=True,
              help=f"llama-perplexity's setting: ctx {DEFAULT_CTX} over the whole text (hours on a slow CPU).")
@click.option("--dequantize", is_flag=True,
              help="Read MODEL and the reference as float32 holding exactly their files' weights (every GGUF block "
                   "type decoded by gguf's own dequantizer, Q6_K included): scores a GGUF made by another tool as "
                   "that tool's model. Size and bpw are then the file's.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--md", "as_md", is_flag=True, help="Print a markdown table.")
def eval_command(model, bits, group_size, dtype, allow_requantize, reference, no_reference, text_path, ctx, chunks,
                 full, dequantize, as_json, as_md):
    """Perplexity of MODEL (llama-perplexity's way) and KL divergence / top-1 agreement against a reference."""
    from ..bench.variants import check_variants, parse_variants  # imported when the command runs (MLX)
    from ..evaluate import builtin_text

    if as_json and as_md:
        raise MlxedgeError("choose one of --json and --md.")
    variants = parse_variants(bits, group_size, dtype, allow_requantize)
    coarser = check_variants(resolve_source(model, quiet=as_json), variants)  # refused: before anything loads
    ctx = ctx or (DEFAULT_CTX if full else QUICK_CTX)
    chunks = chunks or (None if full else QUICK_CHUNKS)
    if no_reference:
        reference = None
    elif reference is None and bits:
        reference = model
    if text_path is None:
        text, label = builtin_text(), "built-in (pydoc_data.topics)"
    else:
        try:
            text = Path(text_path).read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise MlxedgeError(f"{text_path} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
        label = text_path
    result = _evaluate(model, variants, reference, text, label, ctx, chunks, quiet=as_json, dequantize=dequantize)
    _add_costs(result, model, reference, variants, coarser, quiet=as_json)
    if as_json:
        emit_json(result)
    else:
        click.echo(format_eval(result, markdown=as_md))
        _echo_costs(result["variants"])


def _add_costs(result: dict, model: str, reference: Optional[str], variants, coarser: dict, quiet: bool) -> None:
    """Each variant re-quantized coarser gets its measured cost: this eval's own KLD and top-1 agreement when
    the reference is MODEL as stored (then it is exactly that measurement, on more text), else measured apart."""
    by_label = {v.label: v for v in variants}
    for row in result["variants"]:
        if row["label"] not in coarser:
            continue
        row["requantized_coarser"] = coarser[row["label"]]
        if reference == model and "kld_mean" in row:
            row["requantization_cost"] = {"kld_mean": row["kld_mean"], "top1_agreement": row["top1_agreement"],
                                          "tokens_scored": row["tokens_scored"], "ctx": result["settings"]["ctx"],
                                          "text": "built-in text" if result["text"].startswith("built-in")
                                          else result["text"]}
        else:
            row["requantization_cost"] = measure_cost(resolve_source(model, quiet=True), quiet,
                                                      **by_label[row["label"]].load_kwargs())


__all__ = ["bench_command", "eval_command", "format_eval"]
