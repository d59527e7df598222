"""The two timed tests on one runtime, in llama-bench's conventions: prompt processing of exactly p tokens (rate,
time to first token) and generation of n tokens from a one-token prompt (rate over the steps after the first),
timed the same way for mlxedge (`OursRunner`) and mlx-lm (`MlxLmRunner`); the mean ± stdev of repetitions."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Iterable, List

from ..errors import MlxedgeError


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
    from ..corpus import builtin_text

    if p < 1:
        raise MlxedgeError(f"-p {p} must be at least 1.")
    text = builtin_text()
    ids = list(tokenizer.encode(text[: max(4096, p * 16)], add_special_tokens=True))
    while len(ids) < p:
        ids += list(tokenizer.encode(text, add_special_tokens=False))
    return ids[:p]


def summarise(runs: List[dict]) -> dict:
    out = {}
    for key in ("pp_tps", "tg_tps", "ttft_s"):
        values = [r[key] for r in runs]
        mean, sd = mean_stdev(values)
        out[f"{key}_mean"], out[f"{key}_stdev"], out[key] = mean, sd, values
    return out

