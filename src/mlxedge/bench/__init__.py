"""Speed measurements of mlxedge (and, side by side, mlx-lm) on this device, in llama-bench's conventions:
`bench` (here) runs the benchmark; the parts it stands on live next to it.

- `bench`: per variant (bits × group size × dtype): load time, size, bits per weight, then a warm-up and `reps`
  repetitions of two tests like llama-bench's pp/tg (bench.timing): prompt processing of exactly `p` tokens
  (rate and time to first token) and generation of `n` tokens from a one-token prompt (rate over the n−1
  steps after the first); mean ± sample stdev of the per-repetition rates; peak MLX memory; a roofline
  (bench.roofline): generation rate as a percentage of bandwidth ÷ bytes read per token (weights as read by a
  decode step + the KV cache at the mean context of the tg test).
- `compare="mlx-lm"`: mlx-lm's own `load` + `stream_generate` on an mlx-lm copy of the same weights (written by
  `mlxedge.convert` in the dtype mlxedge computes in, so both read identical bytes and compute in the same
  dtype — checked, and reported per side), run interleaved with ours rep by rep (order alternating), with
  ratios ours ÷ mlx-lm (`pp_ratio`, `tg_ratio`, ...). Each row names the kernels that ran (info["kernels"]).
- bench.device: the device facts and its measured (cached) memory bandwidth; bench.variants: the precisions
  (`--bits 16,8,4`); bench.views: the table, markdown, plot and JSON views of a result.

Results are plain dicts (JSON-ready). Speed is never asserted anywhere; it is measured here and reported.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import mlx.core as mx

from ..errors import MlxedgeError
from .device import Log, device_bandwidth, device_info
from .roofline import (compute_dtype, dtype_name, kv_bytes_per_position, kv_dtype_bytes, roofline_fields,
                       weight_bytes_per_token)
from .timing import MlxLmRunner, OursRunner, prompt_ids, run_pp, run_tg, summarise
from .variants import Variant

WARMUP_TG_TOKENS = 4


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
        their_dtype = dtype_name(compute_dtype(theirs.model))
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

    kv_pos = kv_bytes_per_position(model.config, kv_dtype_bytes(model.module))
    weights_pt = weight_bytes_per_token(model.module)
    kv_pt = kv_pos * (n // 2 + 1)  # the tg test's mean context: 1 prompt token + n/2 generated
    row = {
        "label": variant.label, "bits": info.get("bits"), "group_size": info.get("group_size"),
        "dtype": info.get("dtype"), "kernels": info.get("kernels", {}).get("backend"), "parameters": info.get("parameters"), "bytes": info.get("bytes"),
        "bits_per_weight": (8.0 * info["bytes"] / info["parameters"]) if info.get("parameters") else None,
        "load_s": load_s, "peak_memory_bytes": peak, "prompt_tokens": p, "gen_tokens": n, "repetitions": reps,
        **summarise(ours_runs),
        "weight_bytes_per_token": weights_pt, "kv_bytes_per_token": kv_pt,
    }
    row.update(roofline_fields(row["tg_tps_mean"], weights_pt + kv_pt, bandwidth))
    if theirs is not None:
        mine = summarise(their_runs)
        paired = [a["tg_tps"] / b["tg_tps"] for a, b in zip(ours_runs, their_runs) if b["tg_tps"] > 0]
        paired_pp = [a["pp_tps"] / b["pp_tps"] for a, b in zip(ours_runs, their_runs) if b["pp_tps"] > 0]
        row["mlx_lm"] = {
            "load_s": their_load_s, "dtype": their_dtype, **mine,
            "pp_ratio": row["pp_tps_mean"] / mine["pp_tps_mean"] if mine["pp_tps_mean"] else None,
            "tg_ratio": row["tg_tps_mean"] / mine["tg_tps_mean"] if mine["tg_tps_mean"] else None,
            "pp_ratio_paired_median": statistics.median(paired_pp) if paired_pp else None,
            "tg_ratio_paired_median": statistics.median(paired) if paired else None,
            "tg_ratio_paired_min": min(paired) if paired else None,
            **{f"mlx_lm_{k}": v
               for k, v in roofline_fields(mine["tg_tps_mean"], weights_pt + kv_pt, bandwidth).items()},
        }
        del theirs
    del model, ours
    mx.clear_cache()
    return row



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

