"""`mlxedge bench` (speed, llama-bench style) and `mlxedge eval` (perplexity and KL divergence, llama-perplexity
style): parse flags, call mlxedge.bench / mlxedge.evaluate, print a table, JSON or a plot."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click

from ..errors import MlxedgeError
from ..evaluate import DEFAULT_CTX, QUICK_CHUNKS, QUICK_CTX
from ..table import render_table
from .common import (GROUP_SIZE_HELP, _isatty, emit_json, format_bytes, format_quantization, handles_errors, load_model,
                     progress_bar, resolve_source)

DTYPE_CHOICE = click.Choice(["float32", "float16", "bfloat16"])


def _bench_module():
    """mlxedge.bench, imported when a command runs (it imports MLX; `--help` should not)."""
    from .. import bench

    return bench


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
    """--bits LIST / --group-size / --dtype: the precisions bench and eval run (see bench.parse_variants)."""
    options = [
        click.option("--bits", default=None, metavar="LIST",
                     help="Precisions, e.g. 16,8,4 (16 = unquantized in --dtype, 32 = float32). "
                          "Default: the model as stored."),
        click.option("--group-size", type=click.Choice(["32", "64", "128"]), default=None,
                     callback=lambda c, p, v: None if v is None else int(v), help=GROUP_SIZE_HELP),
        click.option("--dtype", type=DTYPE_CHOICE, default=None,
                     help="compute dtype (16 = bfloat16 unless set; quantized variants default to float32 "
                          "without Metal)."),
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
def bench_command(model, bits, group_size, dtype, n_prompt, n_gen, repetitions, compare, as_json, as_md,
                  plot_path, remeasure_bandwidth):
    """Prompt-processing and generation speed of MODEL, per precision (llama-bench's pp/tg conventions)."""
    B = _bench_module()


    if as_json and as_md:
        raise MlxedgeError("choose one of --json and --md.")
    _check_plot_available(plot_path)
    variants = B.parse_variants(bits, group_size, dtype)
    source = resolve_source(model, quiet=as_json)
    steps = len(variants) * repetitions
    with progress_bar("Benchmarking", unit="repetitions", enabled=not as_json) as progress:
        result = B.bench(source, variants, p=n_prompt, n=n_gen, reps=repetitions, compare=compare,
                         remeasure_bandwidth=remeasure_bandwidth,
                         log=None if as_json else _bench_log(progress, steps))
    result["model"] = model
    if plot_path:
        result["plot"] = str(B.plot(result, plot_path))
    if as_json:
        emit_json(result)
    else:
        click.echo(B.format_table(result, markdown=as_md))
        if plot_path:
            _stderr(f"plot written to {plot_path}")


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


def run_eval(model: str, variants, reference: Optional[str], text: str, text_label: str, ctx: int,
             chunks: Optional[int], quiet: bool = False, dequantize: bool = False) -> dict:
    """Load the variants (and the reference), evaluate them on `text`, return the JSON-ready result.

    dequantize: MODEL and the reference are read as float32 holding exactly their files' weights (see
    mlxedge.load), so a GGUF from another tool is scored as that tool's model, block types MLX cannot hold
    included.
    """
    from ..evaluate import evaluate_text

    source = resolve_source(model, quiet=quiet)
    models, meta = {}, {}
    for v in variants:
        m = load_model(source, quiet=quiet, dequantize=dequantize, **v.load_kwargs())
        label = f"{v.label} (exact f32)" if dequantize and v.bits is None else v.label
        models[label] = m
        meta[label] = m.info
    ref_model, ref_info = None, None
    if reference is not None:
        ref_source = resolve_source(reference, quiet=quiet)
        ref_model = load_model(ref_source, quiet=quiet, dequantize=dequantize)
        ref_info = ref_model.info
    with progress_bar("Evaluating", unit="forward passes", enabled=not quiet) as progress:
        out = evaluate_text(models, text, ctx=ctx, reference=ref_model, max_chunks=chunks, progress=progress)
    rows = []
    for label in models:
        info, r = meta[label], out["results"][label]
        nbytes, weights = info.get("bytes"), info.get("parameters")
        gguf_file = info.get("gguf") or {}
        if gguf_file.get("dequantized") and info.get("bits") is None:  # run as float32, but the size is the file's: its blocks as stored
            nbytes, weights = gguf_file["stored_bytes"], gguf_file["stored_weights"]
        row = {"label": label, "bits": info.get("bits"), "group_size": info.get("group_size"),
               "dtype": info.get("dtype"), "parameters": weights, "bytes": nbytes,
               "bits_per_weight": 8.0 * nbytes / weights if weights else None, **r}
        if out["reference"] is not None:
            row["ln_ppl_ratio"] = r["nll_mean"] - out["reference"]["nll_mean"]
        rows.append(row)
    ref = None
    if out["reference"] is not None:
        ref = {"source": reference, "label": format_quantization(ref_info, short=True), "bytes": ref_info.get("bytes"),
               **out["reference"]}
    return {"model": model, "text": text_label, "settings": out["settings"], "reference": ref, "variants": rows}


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
def eval_command(model, bits, group_size, dtype, reference, no_reference, text_path, ctx, chunks, full, dequantize,
                 as_json, as_md):
    """Perplexity of MODEL (llama-perplexity's way) and KL divergence / top-1 agreement against a reference."""
    B = _bench_module()

    from ..evaluate import builtin_text

    if as_json and as_md:
        raise MlxedgeError("choose one of --json and --md.")
    variants = B.parse_variants(bits, group_size, dtype)
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
    result = run_eval(model, variants, reference, text, label, ctx, chunks, quiet=as_json, dequantize=dequantize)
    if as_json:
        emit_json(result)
    else:
        click.echo(format_eval(result, markdown=as_md))


__all__ = ["bench_command", "eval_command", "run_eval", "format_eval"]
