"""The views of a benchmark result: the table `mlxedge bench` prints (aligned or markdown), a bar chart
(matplotlib, optional) and JSON."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MlxedgeError
from ..table import render_table


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

