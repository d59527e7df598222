"""Speed measurements of mlxedge (and, side by side, mlx-lm) on this device, in llama-bench's conventions.

- `device_info`: chip (or CPU), MLX backend, memory, MLX version, and a one-line summary.
- `device_bandwidth`: memory bandwidth measured once with a large MLX copy (read + write bytes / time, best of
  several) and cached under `cache_root()/bench/bandwidth.json`, keyed by device, backend and MLX version.
- `bench`: per variant (bits × group size × dtype): load time, size, bits per weight, then a warm-up and `reps`
  repetitions of two tests like llama-bench's pp/tg: prompt processing of exactly `p` tokens (rate and time
  to first token) and generation of `n` tokens from a one-token prompt (rate over the n−1 steps after the
  first); mean ± sample stdev of the per-repetition rates; peak MLX memory; a roofline: generation rate as a
  percentage of bandwidth ÷ bytes read per token (weights as read by a decode step + the KV cache at the
  mean context of the tg test).
- `compare="mlx-lm"`: mlx-lm's own `load` + `stream_generate` on an mlx-lm copy of the same weights (written by
  `mlxedge.convert` in the dtype mlxedge computes in, so both read identical bytes and compute in the same
  dtype — checked, and reported per side), run interleaved with ours rep by rep (order alternating), with
  ratios ours ÷ mlx-lm (`pp_ratio`, `tg_ratio`, ...). Each row names the kernels that ran (info["kernels"]).
- `format_table` / `plot`: the human and markdown views of a result, and a bar chart (matplotlib, optional).

Results are plain dicts (JSON-ready). Speed is never asserted anywhere; it is measured here and reported.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, List, Optional

import mlx.core as mx

from .errors import MlxedgeError
from .table import render_table

Log = Callable[[str], None]

BANDWIDTH_CACHE_NAME = "bandwidth.json"
BANDWIDTH_PROBE_BYTES = 1 << 30  # 1 GiB source array (capped at 1/8 of memory)
BANDWIDTH_REPS = 5
WARMUP_TG_TOKENS = 4


# ------------------------------------------------------------------------------------------------ device

def _linux_cpu_name() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _total_memory_bytes(info: dict) -> Optional[int]:
    if info.get("memory_size"):
        return int(info["memory_size"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def device_info() -> dict:
    """What runs the benchmark: chip/CPU name, MLX backend (metal or cpu), memory, cores, MLX version, line."""
    try:
        info = dict(mx.device_info())
    except Exception:  # older MLX or no device info on this backend
        info = {}
    metal = bool(getattr(mx, "metal", None) and mx.metal.is_available())
    backend = "metal" if metal else str(mx.default_device().type).split(".")[-1]
    chip = info.get("device_name") or ""
    if not metal:
        chip = _linux_cpu_name() or platform.processor() or chip or platform.machine()
    memory = _total_memory_bytes(info)
    out = {"chip": chip, "backend": backend, "memory_bytes": memory, "cpu_cores": os.cpu_count(),
           "architecture": info.get("architecture") or platform.machine(), "os": platform.system(),
           "mlx_version": getattr(mx, "__version__", "?")}
    mem = f"{memory / 2**30:.0f} GiB" if memory else "? memory"
    out["line"] = f"{chip} · {backend} · {mem} · {out['cpu_cores']} cores · mlx {out['mlx_version']}"
    return out


BANDWIDTH_METHOD = "MLX read-only reduction sum(x) over float32, bytes read / best time"


def measure_bandwidth(nbytes: Optional[int] = None, reps: int = BANDWIDTH_REPS) -> dict:
    """Read bandwidth of the default device: sum(x) over a large float32 array, bytes read / best time.

    A decode step mostly reads weights, so a read-only reduction is the fitting ceiling. On MLX's CPU backend
    an element-wise copy measured 1.3 GB/s against 4.1 GB/s for the reduction (numpy's sum: 12.4 GB/s), and
    the copy-based figure put decode above 100% of its own "roofline".
    """
    if nbytes is None:
        memory = _total_memory_bytes({}) or (8 << 30)
        nbytes = min(BANDWIDTH_PROBE_BYTES, memory // 8)
    n = max(1 << 20, nbytes // 4)
    x = mx.ones((n,), dtype=mx.float32)
    mx.eval(x)
    mx.eval(mx.sum(x))  # warm-up: kernel compilation
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        mx.eval(mx.sum(x))
        best = min(best, time.perf_counter() - start)
    del x
    mx.clear_cache()
    return {"bytes_per_s": 4 * n / best, "probe_bytes": 4 * n, "best_s": best, "reps": reps,
            "method": BANDWIDTH_METHOD}


def _bandwidth_cache_path() -> Path:
    from .paths import cache_root

    return cache_root() / "bench" / BANDWIDTH_CACHE_NAME


def device_bandwidth(device: Optional[dict] = None, remeasure: bool = False, log: Optional[Log] = None) -> dict:
    """The device's measured bandwidth, from the cache when this device/backend/MLX was measured before."""
    device = device or device_info()
    key = f"{device['chip']}|{device['backend']}|mlx {device['mlx_version']}"
    path = _bandwidth_cache_path()
    cache = {}
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    entry = cache.get(key)
    if (not remeasure and isinstance(entry, dict) and entry.get("bytes_per_s")
            and entry.get("method") == BANDWIDTH_METHOD):  # a figure from an older probe is measured again
        return {**entry, "cached": True}
    if log:
        log("measuring memory bandwidth (once per device; cached)...")
    result = measure_bandwidth()
    result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cache[key] = result
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=2))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time
    return {**result, "cached": False}


# ------------------------------------------------------------------------------------------------ variants

@dataclass(frozen=True)
class Variant:
    """One precision to benchmark: bits None = unquantized (as stored when dtype is None too)."""

    bits: Optional[int]
    group_size: Optional[int]  # None: the source's own when it is quantized, else 64 (mlxedge.load's rule)
    dtype: Optional[str]
    allow_requantize: bool = False  # may put weights stored quantized onto a coarser grid (quant.requantize)

    @property
    def label(self) -> str:
        if self.bits is None:
            return {None: "as stored", "float32": "f32", "float16": "f16", "bfloat16": "bf16"}.get(self.dtype,
                                                                                                  str(self.dtype))
        return f"q{self.bits} g{self.group_size}" if self.group_size else f"q{self.bits}"

    def load_kwargs(self) -> dict:
        kwargs = {"bits": self.bits, "group_size": self.group_size, "dtype": self.dtype}
        if self.allow_requantize:
            kwargs["allow_requantize"] = True
        return kwargs


DTYPES = ("float32", "float16", "bfloat16")


def parse_variants(bits: Optional[str], group_size: Optional[int] = None, dtype: Optional[str] = None,
                   allow_requantize: bool = False) -> List[Variant]:
    """"16,8,4" → variants. 16 = unquantized in `dtype` (default bfloat16), 32 = float32; 4/8 quantize with
    `group_size`, computing in `dtype` (default: the loader's, float32 without Metal where half-precision
    quantized matmuls are 4-18x slower). None/"" → the model as stored. allow_requantize: quantized variants
    may re-grid weights stored quantized coarser (refused otherwise, see `check_variants`)."""
    if dtype is not None and dtype not in DTYPES:
        raise MlxedgeError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}.")
    if not bits:
        return [Variant(None, group_size, dtype)]
    out = []
    for item in str(bits).split(","):
        item = item.strip().lower()
        if not item:
            continue
        if item in ("16", "bf16", "f16", "fp16"):
            dt = {"bf16": "bfloat16", "f16": "float16", "fp16": "float16"}.get(item, dtype or "bfloat16")
            out.append(Variant(None, group_size, dt))
        elif item in ("32", "f32", "fp32"):
            out.append(Variant(None, group_size, "float32"))
        elif item.isdigit():
            from .quant.affine import validate_settings

            validate_settings(int(item), group_size or 64)  # raises a QuantizationError naming what is allowed
            out.append(Variant(int(item), group_size, dtype, allow_requantize))
        else:
            raise MlxedgeError(f"--bits {item!r} is not a precision; use a list such as 16,8,4 (32 = float32).")
    if not out:
        raise MlxedgeError("--bits is empty; use a list such as 16,8,4.")
    return list(dict.fromkeys(out))


def check_variants(source, variants: List[Variant]) -> dict:
    """Before anything runs: label -> modules each quantized variant re-grids coarser than stored (only with
    allow_requantize). A variant that would be refused raises its one-line QuantizationError now, not after
    the variants before it have run for minutes."""
    from .api import check_requantize

    coarser = {}
    for v in variants:
        if v.bits is not None:
            found = check_requantize(source, v.bits, v.group_size, allow_requantize=v.allow_requantize)
            if found["requantized_coarser"]:
                coarser[v.label] = found["requantized_coarser"]
    return coarser


# ------------------------------------------------------------------------------------------------ bytes per token

def weight_bytes_per_token(module) -> int:
    """Bytes of weights one decode step reads: all parameters, but only one row of an embedding table that is
    not also the output projection (a tied table is read whole by the lm_head)."""
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(module.parameters()))
    total = sum(int(v.nbytes) for v in params.values())
    tied = not hasattr(module, "lm_head")
    if not tied:
        for name, value in params.items():
            parts = name.split(".")
            if any(p in ("embed_tokens", "wte", "tok_embeddings", "word_embeddings") for p in parts):
                rows = value.shape[0] if value.ndim >= 1 and value.shape[0] > 0 else 1
                total -= int(value.nbytes) - int(value.nbytes) // rows
    return total


def kv_bytes_per_position(config: dict, dtype_bytes: int) -> int:
    """KV-cache bytes per context position, all layers (keys and values)."""
    layers = int(config.get("num_hidden_layers") or 0)
    heads = int(config.get("num_attention_heads") or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = config.get("head_dim") or (int(config.get("hidden_size") or 0) // heads)
    return 2 * layers * kv_heads * int(head_dim) * dtype_bytes


def compute_dtype(module):
    """The dtype a model computes in: that of its floating-point parameters (norms, scales, float weights)."""
    from mlx.utils import tree_flatten

    for _, v in tree_flatten(module.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return v.dtype
    return None


def _kv_dtype_bytes(module) -> int:
    dtype = compute_dtype(module)
    return dtype.size if dtype is not None else 2


def _dtype_name(dtype) -> Optional[str]:
    return None if dtype is None else str(dtype).split(".")[-1]


# ------------------------------------------------------------------------------------------------ runs

def time_tokens(tokens: Iterable) -> dict:
    """Time a token stream the same way for every runtime: to the first token, then the rate after it."""
    start = time.perf_counter()
    first = last = None
    n = 0
    for _ in tokens:
        now = time.perf_counter()
        if first is None:
            first = now
        last = now
        n += 1
    if first is None:
        raise MlxedgeError("the benchmark run produced no token.")
    rate = (n - 1) / (last - first) if n > 1 and last > first else 0.0
    return {"ttft_s": first - start, "tokens": n, "rate": rate}


class OursRunner:
    """mlxedge's public stream on exact token ids, never stopping early (ignore_eos)."""

    name = "mlxedge"

    def __init__(self, model):
        self.model = model

    def tokens(self, ids: List[int], n: int):
        for event in self.model.stream(ids=ids, max_tokens=n, ignore_eos=True):
            if event.token is not None:
                yield event.token


class MlxLmRunner:
    """mlx-lm's stream_generate (its public generation path) on the same ids, its EOS set emptied."""

    name = "mlx-lm"

    def __init__(self, path: Path):
        from mlx_lm import load as mlx_lm_load

        self.model, self.tokenizer = mlx_lm_load(str(path))
        self.tokenizer.eos_token_ids = []

    def tokens(self, ids: List[int], n: int):
        from mlx_lm import stream_generate

        for response in stream_generate(self.model, self.tokenizer, list(ids), max_tokens=n):
            yield response.token


def run_pp(runner, ids: List[int]) -> dict:
    t = time_tokens(runner.tokens(ids, 1))
    return {"pp_tps": len(ids) / t["ttft_s"] if t["ttft_s"] > 0 else 0.0, "ttft_s": t["ttft_s"]}


def run_tg(runner, ids: List[int], n: int) -> dict:
    t = time_tokens(runner.tokens(ids[:1], n))
    return {"tg_tps": t["rate"], "tg_tokens": t["tokens"]}


def mean_stdev(values: List[float]) -> tuple:
    mean = statistics.fmean(values) if values else 0.0
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, sd


def prompt_ids(tokenizer, p: int) -> List[int]:
    """Exactly p token ids of English prose (the built-in text, repeated if ever too short)."""
    from .corpus import builtin_text

    if p < 1:
        raise MlxedgeError(f"-p {p} must be at least 1.")
    text = builtin_text()
    ids = list(tokenizer.encode(text[: max(4096, p * 16)], add_special_tokens=True))
    while len(ids) < p:
        ids += list(tokenizer.encode(text, add_special_tokens=False))
    return ids[:p]


def _summarise(runs: List[dict]) -> dict:
    out = {}
    for key in ("pp_tps", "tg_tps", "ttft_s"):
        values = [r[key] for r in runs]
        mean, sd = mean_stdev(values)
        out[f"{key}_mean"], out[f"{key}_stdev"], out[key] = mean, sd, values
    return out


def bench_variant(source, variant: Variant, p: int, n: int, reps: int, bandwidth: Optional[float],
                  compare: Optional[str] = None, workdir: Optional[Path] = None, log: Optional[Log] = None) -> dict:
    """Load one variant and run its warm-up and repetitions (interleaved with mlx-lm when compare="mlx-lm")."""
    import mlxedge

    say = log or (lambda _msg: None)
    if n < 2:
        raise MlxedgeError(f"-n {n} must be at least 2 (the generation rate is measured after the first token).")
    if reps < 1:
        raise MlxedgeError(f"-r {reps} must be at least 1.")
    say(f"[{variant.label}] loading")
    mx.clear_cache()
    start = time.perf_counter()
    model = mlxedge.load(source, **variant.load_kwargs())
    load_s = time.perf_counter() - start
    info = model.info
    ids = prompt_ids(model.tokenizer, p)
    ours = OursRunner(model)

    say(f"[{variant.label}] warm-up")
    mx.reset_peak_memory()
    run_pp(ours, ids)
    run_tg(ours, ids, max(2, min(n, WARMUP_TG_TOKENS)))
    peak = int(mx.get_peak_memory())  # before any mlx-lm copy is loaded, so it is ours alone

    theirs = None
    if compare == "mlx-lm":
        import mlxedge as api

        target = Path(workdir or tempfile.mkdtemp()) / f"mlx-lm-{variant.label.replace(' ', '-')}"
        say(f"[{variant.label}] writing the mlx-lm copy in {info['dtype']}")
        # like with like: mlx-lm gets the same bytes in the dtype we compute in (not the checkpoint's own)
        api.convert(source, target, bits=variant.bits, group_size=variant.group_size, dtype=info["dtype"],
                    force=True)
        t0 = time.perf_counter()
        theirs = MlxLmRunner(target)
        their_load_s = time.perf_counter() - t0
        their_dtype = _dtype_name(compute_dtype(theirs.model))
        if their_dtype != info["dtype"]:
            raise MlxedgeError(f"mlx-lm computes in {their_dtype}, mlxedge in {info['dtype']}: not comparable.")
        run_pp(theirs, ids)
        run_tg(theirs, ids, max(2, min(n, WARMUP_TG_TOKENS)))
    elif compare is not None:
        raise MlxedgeError(f"--compare {compare!r} is not supported; use --compare mlx-lm.")

    ours_runs, their_runs = [], []
    for r in range(reps):
        say(f"[{variant.label}] repetition {r + 1}/{reps}")
        order = [(ours, ours_runs), (theirs, their_runs)] if theirs else [(ours, ours_runs)]
        if r % 2 == 1:
            order.reverse()  # alternate who goes first, so drifting machine load hits both alike
        pps = {id(runner): run_pp(runner, ids) for runner, _ in order}
        for runner, runs in order:
            runs.append({**pps[id(runner)], **run_tg(runner, ids, n)})

    kv_pos = kv_bytes_per_position(model.config, _kv_dtype_bytes(model.module))
    weights_pt = weight_bytes_per_token(model.module)
    kv_pt = kv_pos * (n // 2 + 1)  # the tg test's mean context: 1 prompt token + n/2 generated
    row = {
        "label": variant.label, "bits": info.get("bits"), "group_size": info.get("group_size"),
        "dtype": info.get("dtype"), "kernels": info.get("kernels", {}).get("backend"), "parameters": info.get("parameters"), "bytes": info.get("bytes"),
        "bits_per_weight": (8.0 * info["bytes"] / info["parameters"]) if info.get("parameters") else None,
        "load_s": load_s, "peak_memory_bytes": peak, "prompt_tokens": p, "gen_tokens": n, "repetitions": reps,
        **_summarise(ours_runs),
        "weight_bytes_per_token": weights_pt, "kv_bytes_per_token": kv_pt,
    }
    row.update(_roofline(row["tg_tps_mean"], weights_pt + kv_pt, bandwidth))
    if theirs is not None:
        mine = _summarise(their_runs)
        paired = [a["tg_tps"] / b["tg_tps"] for a, b in zip(ours_runs, their_runs) if b["tg_tps"] > 0]
        paired_pp = [a["pp_tps"] / b["pp_tps"] for a, b in zip(ours_runs, their_runs) if b["pp_tps"] > 0]
        row["mlx_lm"] = {
            "load_s": their_load_s, "dtype": their_dtype, **mine,
            "pp_ratio": row["pp_tps_mean"] / mine["pp_tps_mean"] if mine["pp_tps_mean"] else None,
            "tg_ratio": row["tg_tps_mean"] / mine["tg_tps_mean"] if mine["tg_tps_mean"] else None,
            "pp_ratio_paired_median": statistics.median(paired_pp) if paired_pp else None,
            "tg_ratio_paired_median": statistics.median(paired) if paired else None,
            "tg_ratio_paired_min": min(paired) if paired else None,
            **{f"mlx_lm_{k}": v for k, v in _roofline(mine["tg_tps_mean"], weights_pt + kv_pt, bandwidth).items()},
        }
        del theirs
    del model, ours
    mx.clear_cache()
    return row


def _roofline(tps: float, bytes_per_token: int, bandwidth: Optional[float]) -> dict:
    if not bandwidth or not bytes_per_token:
        return {"roofline_tps": None, "roofline_pct": None}
    limit = bandwidth / bytes_per_token
    return {"roofline_tps": limit, "roofline_pct": 100.0 * tps / limit}


def bench(source, variants: List[Variant], p: int = 512, n: int = 128, reps: int = 5,
          compare: Optional[str] = None, remeasure_bandwidth: bool = False, log: Optional[Log] = None) -> dict:
    """Benchmark every variant of `source` (a local path, or anything mlxedge.load takes); a JSON-ready dict."""
    device = device_info()
    bw = device_bandwidth(device, remeasure=remeasure_bandwidth, log=log)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mlxedge-bench-") as tmp:
        for variant in variants:
            rows.append(bench_variant(source, variant, p, n, reps, bw["bytes_per_s"], compare=compare,
                                      workdir=Path(tmp), log=log))
    return {
        "model": str(source),
        "device": {**device, "bandwidth_bytes_per_s": bw["bytes_per_s"], "bandwidth_cached": bw["cached"],
                   "bandwidth_method": bw.get("method")},
        "settings": {"prompt_tokens": p, "gen_tokens": n, "repetitions": reps, "compare": compare,
                     "warmup": True, "tests": f"pp{p}, tg{n}"},
        "variants": rows,
    }


# ------------------------------------------------------------------------------------------------ views

def _fmt_ms(row: dict, key: str) -> str:
    return f"{row[key + '_mean']:.2f} ± {row[key + '_stdev']:.2f}"


def table_rows(result: dict) -> tuple:
    """(header, rows) of the benchmark table: one row per variant (and per mlx-lm run when compared)."""
    s = result["settings"]
    p, n = s["prompt_tokens"], s["gen_tokens"]
    compare = s.get("compare")
    header = ["variant", "dtype", "size", "bpw", "load s", f"pp{p} t/s", f"tg{n} t/s", "TTFT ms", "peak mem",
              "roofline %"]
    if compare:
        header += [f"{compare} pp t/s", f"{compare} tg t/s", "pp ratio", "tg ratio"]
    rows = []
    for v in result["variants"]:
        row = [v["label"], str(v.get("dtype")), f"{v['bytes'] / 1e6:.1f} MB", f"{v['bits_per_weight']:.2f}", f"{v['load_s']:.1f}",
               _fmt_ms(v, "pp_tps"), _fmt_ms(v, "tg_tps"), f"{1000 * v['ttft_s_mean']:.0f}",
               f"{v['peak_memory_bytes'] / 1e6:.0f} MB",
               "-" if v["roofline_pct"] is None else f"{v['roofline_pct']:.1f}"]
        if compare:
            t = v.get("mlx_lm") or {}
            row += [_fmt_ms(t, "pp_tps"), _fmt_ms(t, "tg_tps"), f"{t['pp_ratio']:.3f}", f"{t['tg_ratio']:.3f}"]
        rows.append(row)
    return header, rows


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def format_table(result: dict, markdown: bool = False) -> str:
    """The result as text: the device line, then a table (aligned columns, or a markdown pipe table)."""
    d = result["device"]
    bw = d.get("bandwidth_bytes_per_s")
    lines = [f"model: {result['model']}",
             f"device: {d['line']} · measured bandwidth {bw / 1e9:.1f} GB/s" if bw else f"device: {d['line']}",
             f"tests: {result['settings']['tests']}, {_plural(result['settings']['repetitions'], 'repetition')} "
             "after a warm-up, mean ± stdev"]
    backends = sorted({str(v.get("kernels")) for v in result["variants"] if v.get("kernels")})
    if backends:
        lines.append(f"kernels: {', '.join(backends)}")
    if result["settings"].get("compare"):
        lines.append(f"{result['settings']['compare']} runs the same bytes in the same compute dtype (column dtype)")
    lines.append("")
    header, rows = table_rows(result)
    return "\n".join(lines + render_table(header, rows, markdown))


def plot(result: dict, path) -> Path:
    """Bar chart of pp and tg tok/s per variant (± stdev), mlx-lm's beside ours when compared."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MlxedgeError("--plot needs matplotlib: pip install 'mlxedge[plot]'") from None
    variants = result["variants"]
    compare = result["settings"].get("compare")
    labels = [v["label"] for v in variants]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(labels), 4))
    width = 0.38 if compare else 0.6
    for ax, key, title in ((axes[0], "pp_tps", f"prompt processing (pp{result['settings']['prompt_tokens']})"),
                           (axes[1], "tg_tps", f"generation (tg{result['settings']['gen_tokens']})")):
        xs = range(len(labels))
        off = -width / 2 if compare else 0.0
        ax.bar([x + off for x in xs], [v[key + "_mean"] for v in variants], width,
               yerr=[v[key + "_stdev"] for v in variants], capsize=3, label="mlxedge")
        if compare:
            ax.bar([x + width / 2 for x in xs], [v["mlx_lm"][key + "_mean"] for v in variants], width,
                   yerr=[v["mlx_lm"][key + "_stdev"] for v in variants], capsize=3, label=compare)
            ax.legend()
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels)
        ax.set_ylabel("tokens / s")
        ax.set_title(title)
    fig.suptitle(f"{Path(result['model']).name} · {result['device']['line']}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def as_json(result: dict) -> str:
    return json.dumps(result, indent=2, default=str)


__all__ = ["device_info", "device_bandwidth", "measure_bandwidth", "Variant", "parse_variants", "bench",
           "bench_variant", "weight_bytes_per_token", "kv_bytes_per_position", "format_table", "plot",
           "table_rows", "prompt_ids", "time_tokens", "run_pp", "run_tg",
           "mean_stdev", "OursRunner", "MlxLmRunner", "compute_dtype"]
