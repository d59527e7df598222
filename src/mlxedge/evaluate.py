"""Model quality the way llama.cpp's `llama-perplexity` measures it: perplexity, and KL divergence to a reference.

Perplexity: the text is tokenized once (special tokens as the tokenizer adds them), cut into non-overlapping
chunks of `ctx` tokens (the tail that does not fill a chunk is dropped; at least two chunks are needed), the
first token of every chunk is replaced by BOS when the tokenizer adds one, and only the second half of each
chunk is scored: logits at positions ctx/2 .. ctx-2 predict tokens ctx/2+1 .. ctx-1. PPL = exp(mean NLL);
its error bar is llama-perplexity's: PPL · sqrt((mean(NLL²) − mean(NLL)²) / (N − 1)).

Against a reference model on the same chunks and positions (llama-perplexity --kl-divergence):
KLD(ref ‖ model) = Σ p_ref (log p_ref − log p) per token: mean (± standard error), median, 99th percentile,
max; top-1 agreement ("same top p": argmax equal) with its binomial error; RMS Δp, Δp being the change of
the probability given to the actual next token, with llama.cpp's delta-method error.

`run` is the driver (as `bench.bench` is for speed): it loads every variant and the reference through a
`load` callable, evaluates them on one text and returns the JSON-ready result `mlxedge eval` prints.

Numerics: logits come out of the model as float32 and every softmax, NLL and KLD is computed in float64
numpy, row block by row block. Memory stays bounded by one chunk: nothing holds [T, V] for the whole text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence

import numpy as np

from .corpus import builtin_text
from .errors import MlxedgeError

DEFAULT_CTX = 512  # llama-perplexity's (`mlxedge eval --full`)
QUICK_CTX = 256    # `mlxedge eval`'s default: about a minute for a small model on a CPU
QUICK_CHUNKS = 4
COST_CTX = 256     # the short text a coarser re-quantization is measured on (one chunk)
ROW_BLOCK = 64  # rows of [rows, V] float64 worked on at once (64 × 128k vocab × 8 B = 64 MB)

Progress = Callable[[int, int], None]
Load = Callable[..., object]  # (source, **load settings) -> an mlxedge Model


# ------------------------------------------------------------------------------------------------ text

def tokenize_for_perplexity(tokenizer, text: str) -> tuple:
    """(token ids, bos id or None): the text tokenized as llama-perplexity does, and the BOS to start chunks with.

    `tokenizer` is a transformers tokenizer or mlxedge's Tokenizer (anything with encode and bos_token_id).
    BOS is returned only when the tokenizer itself puts it in front (its add_special_tokens behaviour).
    """
    ids = list(tokenizer.encode(text, add_special_tokens=True))
    bos = getattr(tokenizer, "bos_token_id", None)
    return ids, (bos if bos is not None and ids and ids[0] == bos else None)


def make_chunks(tokens: Sequence[int], ctx: int, bos_id: Optional[int] = None,
                max_chunks: Optional[int] = None) -> List[List[int]]:
    """Non-overlapping chunks of `ctx` tokens, the first replaced by BOS when given (llama-perplexity's rule)."""
    if ctx < 4:
        raise MlxedgeError(f"--ctx {ctx} is too small; use at least 4 tokens (llama-perplexity's default is 512).")
    if len(tokens) < 2 * ctx:
        raise MlxedgeError(f"the text has {len(tokens)} tokens; perplexity with --ctx {ctx} needs at least "
                           f"{2 * ctx} (two chunks). Give a longer --text or a smaller --ctx.")
    n = len(tokens) // ctx
    if max_chunks is not None:
        if max_chunks < 1:
            raise MlxedgeError(f"--chunks {max_chunks} must be at least 1.")
        n = min(n, max_chunks)
    chunks = []
    for i in range(n):
        chunk = [int(t) for t in tokens[i * ctx:(i + 1) * ctx]]
        if bos_id is not None:
            chunk[0] = int(bos_id)
        chunks.append(chunk)
    return chunks


def first_scored(ctx: int) -> int:
    """Index of the first logit row that is scored in a chunk of ctx tokens."""
    return ctx // 2


# ------------------------------------------------------------------------------------------------ numerics

def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    shifted = x - m
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def token_nll(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood of each target under its logit row: [rows] float64."""
    targets = np.asarray(targets, dtype=np.int64)
    out = np.empty(len(targets), dtype=np.float64)
    for s in range(0, len(targets), ROW_BLOCK):
        lp = log_softmax(logits[s:s + ROW_BLOCK])
        out[s:s + ROW_BLOCK] = -lp[np.arange(lp.shape[0]), targets[s:s + ROW_BLOCK]]
    return out


def compare_rows(ref_logits: np.ndarray, logits: np.ndarray, targets: Sequence[int]) -> dict:
    """Per-row KLD(ref ‖ model), top-1 agreement and Δp of the target token (model − ref), all float64."""
    if ref_logits.shape != logits.shape:
        raise MlxedgeError(f"reference logits {ref_logits.shape} and model logits {logits.shape} differ in shape; "
                           "the reference must share the model's tokenizer and vocabulary.")
    targets = np.asarray(targets, dtype=np.int64)
    n = len(targets)
    kld, same, dp = np.empty(n), np.empty(n, dtype=bool), np.empty(n)
    for s in range(0, n, ROW_BLOCK):
        e = min(n, s + ROW_BLOCK)
        lp_ref, lp = log_softmax(ref_logits[s:e]), log_softmax(logits[s:e])
        p_ref = np.exp(lp_ref)
        kld[s:e] = np.maximum((p_ref * (lp_ref - lp)).sum(axis=-1), 0.0)  # ≥ 0 up to rounding
        same[s:e] = ref_logits[s:e].argmax(axis=-1) == logits[s:e].argmax(axis=-1)
        rows = np.arange(e - s)
        dp[s:e] = np.exp(lp[rows, targets[s:e]]) - p_ref[rows, targets[s:e]]
    return {"kld": kld, "same_top": same, "delta_p": dp}


# ------------------------------------------------------------------------------------------------ accumulators

@dataclass
class PerplexityStats:
    """Running sums of per-token NLL; `result()` is llama-perplexity's final estimate with its error bar."""

    count: int = 0
    nll_sum: float = 0.0
    nll2_sum: float = 0.0

    def add(self, nll: np.ndarray) -> None:
        nll = np.asarray(nll, dtype=np.float64)
        self.count += nll.size
        self.nll_sum += float(nll.sum())
        self.nll2_sum += float((nll * nll).sum())

    def result(self) -> dict:
        if self.count == 0:
            raise MlxedgeError("no tokens were scored.")
        mean = self.nll_sum / self.count
        var = self.nll2_sum / self.count - mean * mean
        ppl = math.exp(mean)
        err = ppl * math.sqrt(var / (self.count - 1)) if var > 0 and self.count > 1 else 0.0
        return {"perplexity": ppl, "perplexity_error": err, "nll_mean": mean, "tokens_scored": self.count}


@dataclass
class DivergenceStats:
    """Per-token KLD values (kept: median and percentiles need them), top-1 matches and Δp sums."""

    kld: List[np.ndarray] = field(default_factory=list)
    same: int = 0
    count: int = 0
    dp2: float = 0.0
    dp4: float = 0.0

    def add(self, rows: dict) -> None:
        self.kld.append(rows["kld"])
        self.same += int(rows["same_top"].sum())
        self.count += len(rows["kld"])
        dp2 = rows["delta_p"] ** 2
        self.dp2 += float(dp2.sum())
        self.dp4 += float((dp2 * dp2).sum())

    def result(self) -> dict:
        if self.count == 0:
            raise MlxedgeError("no tokens were compared.")
        k = np.concatenate(self.kld)
        n = self.count
        mean = float(k.mean())
        kld_err = float(k.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
        top1 = self.same / n
        top1_err = math.sqrt(top1 * (1.0 - top1) / (n - 1)) if n > 1 else 0.0
        ms = self.dp2 / n
        rms = math.sqrt(ms)
        var_ms = (self.dp4 / n - ms * ms) / (n - 1) if n > 1 else 0.0
        rms_err = 0.5 / rms * math.sqrt(max(var_ms, 0.0)) if rms > 0 else 0.0
        return {"kld_mean": mean, "kld_mean_error": kld_err, "kld_median": float(np.median(k)),
                "kld_p99": float(np.percentile(k, 99)), "kld_max": float(k.max()),
                "top1_agreement": top1, "top1_agreement_error": top1_err,
                "rms_delta_p": rms, "rms_delta_p_error": rms_err, "tokens_compared": n}


# ------------------------------------------------------------------------------------------------ models

def scored_logits(model, chunk: Sequence[int]) -> np.ndarray:
    """float32 logits of the scored rows of one chunk (ctx/2 .. ctx-2) from one forward pass of `model`.

    `model` is an mlxedge Model (`Model.logits` runs the chunk without a cache; only the scored rows leave the
    device).
    """
    return model.logits(chunk, start=first_scored(len(chunk)), stop=len(chunk) - 1)


def evaluate_chunks(models: dict, chunks: List[List[int]], reference=None,
                    progress: Optional[Progress] = None) -> dict:
    """Perplexity of every model in `models` (name → Model) over `chunks`, and divergence from `reference`.

    Chunks are the outer loop: the reference runs once per chunk and every model is compared with it right
    away, so memory holds the models and one chunk's logits. Returns
    {name: {perplexity..., kld_... (when a reference is given)}, "_reference": {perplexity...}}.
    """
    ppl = {name: PerplexityStats() for name in models}
    div = {name: DivergenceStats() for name in models} if reference is not None else {}
    ref_ppl = PerplexityStats()
    total = len(chunks) * (len(models) + (reference is not None))
    done = 0
    for chunk in chunks:
        targets = chunk[first_scored(len(chunk)) + 1:]
        ref_logits = None
        if reference is not None:
            ref_logits = scored_logits(reference, chunk)
            ref_ppl.add(token_nll(ref_logits, targets))
            done += 1
            if progress:
                progress(done, total)
        for name, model in models.items():
            logits = scored_logits(model, chunk)
            ppl[name].add(token_nll(logits, targets))
            if ref_logits is not None:
                div[name].add(compare_rows(ref_logits, logits, targets))
            del logits
            done += 1
            if progress:
                progress(done, total)
    out = {}
    for name in models:
        out[name] = ppl[name].result()
        if reference is not None:
            out[name].update(div[name].result())
    if reference is not None:
        out["_reference"] = ref_ppl.result()
    return out


def evaluate_text(models: dict, text: str, ctx: int = DEFAULT_CTX, reference=None, max_chunks: Optional[int] = None,
                  progress: Optional[Progress] = None) -> dict:
    """Tokenize `text` with the first model's tokenizer, chunk it, and run `evaluate_chunks`.

    Returns {"settings": {...}, "results": {name: {...}}, "reference": {...} or None}.
    """
    if not models:
        raise MlxedgeError("nothing to evaluate: give at least one model.")
    first = next(iter(models.values()))
    tokens, bos = tokenize_for_perplexity(first.tokenizer, text)
    chunks = make_chunks(tokens, ctx, bos_id=bos, max_chunks=max_chunks)
    results = evaluate_chunks(models, chunks, reference=reference, progress=progress)
    ref = results.pop("_reference", None)
    settings = {"ctx": ctx, "chunks": len(chunks), "text_tokens": len(tokens), "text_characters": len(text),
                "bos_per_chunk": bos is not None, "scored_per_chunk": ctx - 1 - first_scored(ctx)}
    return {"settings": settings, "results": results, "reference": ref}


def requantization_cost(reference, model, ctx: int = COST_CTX, chunks: int = 1,
                        progress: Optional[Progress] = None) -> dict:
    """How far `model` (re-quantized) strays from `reference` (its source as stored) on the built-in text:
    {"kld_mean", "top1_agreement", "tokens_scored", "ctx"}."""
    out = evaluate_text({"model": model}, builtin_text(), ctx=ctx, reference=reference, max_chunks=chunks,
                        progress=progress)
    r = out["results"]["model"]
    return {"kld_mean": r["kld_mean"], "top1_agreement": r["top1_agreement"], "tokens_scored": r["tokens_scored"],
            "ctx": ctx}


# ------------------------------------------------------------------------------------------------ driver

def run(source: str, variants, text: str, text_label: str, ctx: int = DEFAULT_CTX, chunks: Optional[int] = None,
        reference: Optional[str] = None, load: Optional[Load] = None, progress: Optional[Progress] = None,
        describe: Optional[Callable[[dict], str]] = None, dequantize: bool = False) -> dict:
    """Load every variant of `source` (and `reference`), evaluate them on `text`, return the JSON-ready result.

    `variants`: objects with `label`, `bits` and `load_kwargs()` (bench.variants.Variant). `load(source, **kwargs)`
    returns a Model (default `mlxedge.load`; the CLI passes its own, which pulls aliases with progress bars).
    `describe(info)` names the reference's precision in the result (its "label"; left out without it).
    `dequantize`: the source and the reference are read as float32 holding exactly their files' weights (see
    mlxedge.load), so a GGUF from another tool is scored as that tool's model; a variant kept as stored is then
    labelled "(exact f32)" and sized as its file stores it.
    Returns {"model", "text", "settings", "reference" (None without one), "variants": [row per variant]}.
    """
    if load is None:
        from . import load
    extra = {"dequantize": True} if dequantize else {}
    models, meta = {}, {}
    for v in variants:
        label = f"{v.label} (exact f32)" if dequantize and getattr(v, "bits", None) is None else v.label
        m = load(source, **v.load_kwargs(), **extra)
        models[label] = m
        meta[label] = m.info
    ref_model = load(reference, **extra) if reference is not None else None
    out = evaluate_text(models, text, ctx=ctx, reference=ref_model, max_chunks=chunks, progress=progress)
    rows = []
    for label in models:
        info, r = meta[label], out["results"][label]
        nbytes, weights = info.get("bytes"), info.get("parameters")
        stored = info.get("gguf") or {}
        if stored.get("dequantized") and info.get("bits") is None:  # run as float32; the size is the file's
            nbytes, weights = stored["stored_bytes"], stored["stored_weights"]
        row = {"label": label, "bits": info.get("bits"), "group_size": info.get("group_size"),
               "dtype": info.get("dtype"), "parameters": weights, "bytes": nbytes,
               "bits_per_weight": 8.0 * nbytes / weights if weights else None, **r}
        if out["reference"] is not None:
            row["ln_ppl_ratio"] = r["nll_mean"] - out["reference"]["nll_mean"]
        rows.append(row)
    ref = None
    if out["reference"] is not None:
        ref_info = ref_model.info
        ref = {"source": reference, **({"label": describe(ref_info)} if describe else {}),
               "bytes": ref_info.get("bytes"), **out["reference"]}
    return {"model": source, "text": text_label, "settings": out["settings"], "reference": ref, "variants": rows}
