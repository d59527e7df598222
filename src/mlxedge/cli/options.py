"""The flags several commands share, declared once: sampling (one `sampling` dict) and loading (one `load`
dict: --bits, --group-size, --dtype, ... for `model_loading.load_model`)."""

from __future__ import annotations

import functools

import click

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
