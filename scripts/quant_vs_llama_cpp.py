#!/usr/bin/env python
"""mlxedge's quantization vs llama.cpp's own quantizer, from the same float32 weights, on the same tokens.

For a model given as a GGUF (alias or path; default smollm2): its weights are dequantized exactly (gguf's
dequantizer) and written as an F32 GGUF by mlxedge's exporter. That file is
  - the reference (float32, run by mlxedge);
  - the input of llama.cpp's quantizer (`llama_model_quantize` through llama-cpp-python) at Q4_0, Q4_K_M and
    Q8_0 (no imatrix: llama-cpp-python cannot hand one over);
  - the input of mlxedge's quantization: plain 4/8-bit (g64/g32, round to nearest), the q4_k_m preset, and
    target-bpw recipes at llama.cpp Q4_0's and Q4_K_M's bits per weight (as the files measure, so never above
    them), with and without data-aware scales.

Scoring (mlxedge.evaluate's numerics, llama-perplexity's rules: non-overlapping chunks of --ctx tokens, BOS
first where the tokenizer adds one, second half scored): every row runs on the same float32 engine with its
exact weights — mlxedge rows as their dequantized values with scales and biases rounded to float16 (how a
converted file stores them), llama.cpp rows read with `mlxedge.load(..., dequantize=True)` (every block
type, Q6_K included, decoded exactly) — so only the weights differ between rows. The `as run`
column scores llama.cpp's own forward pass on the same chunks for its files (it also rounds activations to
8 bits inside its quantized matmuls; its F32 row is the two engines' floor) and, for the mlxedge rows named in
--as-run, the quantized model as mlxedge runs it (its kernels, float32 activations).

Text: pydoc's topic texts from the start (evaluate.builtin_text); the calibration text that target-bpw and
data-aware rows measure on is mlxedge's default (the same topics from the other end); the script checks the
two share no topic. Bits per weight count every tensor as stored: GGUF blocks as written; mlxedge's packed
weights plus float16 scales and biases; norms as float32 on both sides.

Read the llama.cpp rows with the source in mind: the "float32" weights are dequantized from a quantized GGUF,
so they sit on that file's grids, and llama.cpp's quantizer reproduces a tensor exactly when it picks the
block type the source used (it is idempotent on its own grid). Gemma 3 270M's only GGUF here is llama.cpp's
own Q4_K_M, so its Q4_K_M row scores KLD 0 by construction; both sources store the tied embedding as Q8_0,
which every llama.cpp type here keeps (head error 0). The `head error` column shows where that happens; the
mlxedge row "embedding/head at source Q8_0" gives mlxedge the same exact head to compare the rest.

    python scripts/quant_vs_llama_cpp.py [MODEL] [--ctx 256] [--chunks 8] [--rows LIST] [--threads 2]
                                         [--near-tie 0.1] [--work DIR] [--out table.md] [--json out.json]

--rows picks rows by key (default: all of DEFAULT_ROWS); see ROWS below for the keys.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

LLAMA_TYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
               "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}
SCALE_BITS = 16  # mlxedge files store scales and biases in float16 (what is counted and what is evaluated)


@dataclass
class Row:
    key: str
    label: str
    side: str  # "mlxedge" | "llama.cpp"
    load: Dict = field(default_factory=dict)  # mlxedge.load kwargs on the F32 file (mlxedge rows)
    llama_type: Optional[str] = None
    embedding_from_source: bool = False  # the tied embedding/head kept at the source GGUF's Q8_0 blocks
    target: Optional[str] = None  # "q4_k_m": target_bpw = that llama.cpp file's bits per weight


ROWS = [
    Row("llama:f32", "llama.cpp F32 (engine floor)", "llama.cpp", llama_type="f32"),
    Row("llama:q4_0", "llama.cpp Q4_0", "llama.cpp", llama_type="q4_0"),
    Row("q4g64", "mlxedge 4-bit g64", "mlxedge", {"bits": 4, "group_size": 64}),
    Row("q4g64-da", "mlxedge 4-bit g64 data-aware", "mlxedge", {"bits": 4, "group_size": 64, "data_aware": True}),
    Row("q4g32", "mlxedge 4-bit g32", "mlxedge", {"bits": 4, "group_size": 32}),
    Row("target-q4_0", "mlxedge target-bpw g64 at Q4_0's bpw", "mlxedge", {"group_size": 64}, target="q4_0"),
    Row("target-q4_0-da", "mlxedge target-bpw g64 at Q4_0's bpw, data-aware", "mlxedge",
        {"group_size": 64, "data_aware": True}, target="q4_0"),
    Row("llama:q4_k_m", "llama.cpp Q4_K_M", "llama.cpp", llama_type="q4_k_m"),
    Row("q4km", "mlxedge q4_k_m preset g64", "mlxedge", {"recipe": "q4_k_m", "group_size": 64}),
    Row("target", "mlxedge target-bpw g64 at Q4_K_M's bpw", "mlxedge", {"group_size": 64}, target="q4_k_m"),
    Row("target-da", "mlxedge target-bpw g64 at Q4_K_M's bpw, data-aware", "mlxedge",
        {"group_size": 64, "data_aware": True}, target="q4_k_m"),
    Row("llama:q8_0", "llama.cpp Q8_0", "llama.cpp", llama_type="q8_0"),
    Row("q8g64", "mlxedge 8-bit g64", "mlxedge", {"bits": 8, "group_size": 64}),
    Row("q8g32", "mlxedge 8-bit g32", "mlxedge", {"bits": 8, "group_size": 32}),
    Row("q8g64-emb", "mlxedge 8-bit g64, embedding/head at source Q8_0", "mlxedge", {"bits": 8, "group_size": 64},
        embedding_from_source=True),
    Row("q8g64-da", "mlxedge 8-bit g64 data-aware", "mlxedge", {"bits": 8, "group_size": 64, "data_aware": True}),
    Row("q8g32-da", "mlxedge 8-bit g32 data-aware", "mlxedge", {"bits": 8, "group_size": 32, "data_aware": True}),
]
DEFAULT_ROWS = [r.key for r in ROWS]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ files

def source_path(model: str) -> Path:
    """The model's GGUF: a path, or an alias pulled into mlxedge's cache."""
    path = Path(model).expanduser()
    if path.is_file():
        return path
    from mlxedge.sources.registry import resolve_alias

    resolved = resolve_alias(model)
    if resolved is None:
        raise SystemExit(f"{model!r} is neither a GGUF file nor an alias (mlxedge pull NAME first)")
    return Path(resolved)


def write_f32(source: Path, work: Path) -> Path:
    import mlxedge

    out = work / "f32.gguf"
    if not out.exists():
        mlxedge.convert(str(source), out, bits=32)  # exact weights of the source, every tensor F32
    return out


def llama_quantize(f32: Path, kind: str, work: Path, threads: int) -> Path:
    """llama.cpp's own quantizer on the F32 file."""
    import llama_cpp

    out = work / f"llama-{kind}.gguf"
    if out.exists():
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_TYPES[kind])
    params.nthread = threads
    tmp = out.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp).encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize failed for {kind}")
    os.replace(tmp, out)
    return out


def gguf_bits(path: Path) -> tuple:
    """(bits stored, weights, norm weights, per-type tensor counts) of a GGUF's tensors."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    bits = sum(int(t.n_bytes) * 8 for t in reader.tensors)
    weights = sum(int(t.n_elements) for t in reader.tensors)
    vectors = sum(int(t.n_elements) for t in reader.tensors if len(t.shape) == 1)
    types: Dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return bits, weights, vectors, types


# ------------------------------------------------------------------------------------------------ models

def stored_bits(model) -> tuple:
    """(bits, weights) of an mlxedge model as a file stores it: packed weights + float16 scales and biases for
    quantized modules, everything else (norms) as float32."""
    from mlx.utils import tree_flatten

    quantized = {}
    for path, m in model.module.named_modules():
        if hasattr(m, "scales") and hasattr(m, "bits"):
            quantized[path] = m
    bits = weights = 0
    for name, value in tree_flatten(model.module.parameters()):
        path, _, part = name.rpartition(".")
        if path in quantized:
            m = quantized[path]
            if part == "weight":
                n = value.size * 32 // m.bits
                weights += n
                bits += n * m.bits
            elif part in ("scales", "biases"):
                bits += value.size * SCALE_BITS
            else:  # a Linear bias
                weights += value.size
                bits += value.size * 32
        else:
            weights += value.size
            bits += value.size * 32
    return bits, weights


def round_scales_to_f16(model) -> None:
    """Scales and biases as a converted file stores them (float16), so what is scored is what is counted."""
    import mlx.core as mx

    for _, m in model.module.named_modules():
        if hasattr(m, "scales") and hasattr(m, "bits"):
            m.scales = m.scales.astype(mx.float16).astype(mx.float32)
            m.biases = m.biases.astype(mx.float16).astype(mx.float32)
    mx.eval(model.module.parameters())


def source_embedding(source: Path):
    """The source GGUF's token embedding as an exact MLX affine triplet (Q8_0 → 8-bit g32), or None."""
    from gguf import GGMLQuantizationType as T

    from mlxedge.sources.gguf import read_gguf
    from mlxedge.sources.gguf import blocks as gb

    tensor = next(t for t in read_gguf(source).tensors if t.name == "token_embd.weight")
    if tensor.qtype not in gb.EXACT_BITS:
        return None
    return gb.to_affine(tensor.data, tensor.qtype), tensor.qtype.name


def embedding_at_source_blocks(model, reference, source: Path) -> str:
    """Put the source's exact embedding blocks in place of `model`'s (dense): they hold the float32 reference's
    embedding exactly (checked), stored as 8-bit g32 affine. Returns (block type name, the affine triplet)."""
    import mlx.core as mx

    found = source_embedding(source)
    if found is None:
        raise SystemExit("the source's token embedding is not in a block type MLX holds exactly")
    affine, name = found
    values = mx.dequantize(mx.array(affine.weight), mx.array(affine.scales).astype(mx.float16).astype(mx.float32),
                           mx.array(affine.biases).astype(mx.float16).astype(mx.float32),
                           group_size=affine.group_size, bits=affine.bits)
    ref = reference.module.model.embed_tokens.weight
    if not bool(mx.array_equal(values, ref).item()):
        raise SystemExit("the source's embedding blocks do not reproduce the reference embedding exactly")
    return name, affine


def head_error(model, reference) -> float:
    """Relative RMS error of the output head's weights (the tied embedding, or lm_head) against the reference's."""
    import mlx.core as mx

    def head(m):
        module = m.module
        return module.lm_head.weight if "lm_head" in module else module.model.embed_tokens.weight

    a, b = head(model).astype(mx.float32), head(reference).astype(mx.float32)
    return float((mx.sqrt(mx.mean((a - b) ** 2)) / mx.sqrt(mx.mean(b * b))).item())


def dense_copy(model, embedding=None) -> None:
    """Swap quantized layers for dense float32 ones holding exactly their dequantized weights (the token
    embedding replaced by `embedding` when given), then bind the model's kernels again (float matmuls go to
    the native OpenBLAS path where it runs, as for the reference)."""
    from quant_quality import dequantize_in_place

    dequantize_in_place(model)
    if embedding is not None:
        model.module.model.embed_tokens.weight = embedding
    model.use_kernels()


# ------------------------------------------------------------------------------------------------ text

def check_disjoint(tokenizer, eval_tokens: List[int]) -> dict:
    """Which pydoc topics the evaluation tokens and mlxedge's default calibration text cover; refuse overlap."""
    from pydoc_data.topics import topics

    from mlxedge.recipe_search import CALIBRATION_CHUNKS, CALIBRATION_CTX

    eval_chars = len(tokenizer.decode(eval_tokens))
    calib_chars = CALIBRATION_CHUNKS * CALIBRATION_CTX * 8  # what calibration_chunks reads at most

    def touched(keys, chars):
        out, at = [], 0
        for k in keys:
            if at >= chars:
                break
            out.append(k)
            at += len(topics[k]) + 1
        return out

    forward = sorted(topics)
    evaluated, calibrated = touched(forward, eval_chars), touched(list(reversed(forward)), calib_chars)
    shared = set(evaluated) & set(calibrated)
    if shared:
        raise SystemExit(f"evaluation and calibration texts share topics {sorted(shared)[:3]}; use fewer chunks")
    return {"eval_topics": len(evaluated), "eval_chars": eval_chars, "calibration_topics": len(calibrated),
            "calibration_chars": calib_chars, "first_eval_topic": evaluated[0], "first_calibration_topic": calibrated[0]}


# ------------------------------------------------------------------------------------------------ scoring

class Scorer:
    """Reference logits of every chunk kept on disk; each row is scored against them, chunk by chunk."""

    def __init__(self, chunks: List[List[int]], work: Path, near_tie: float):
        self.chunks = chunks
        self.near_tie = near_tie
        self.first = len(chunks[0]) // 2
        self.rows = len(chunks[0]) - 1 - self.first
        self.ref: Optional[np.memmap] = None
        self.gap: Optional[np.ndarray] = None
        self.work = work

    def set_reference(self, logits_of: Callable[[List[int]], np.ndarray]) -> dict:
        from mlxedge.evaluate import PerplexityStats, token_nll

        ppl = PerplexityStats()
        for i, chunk in enumerate(self.chunks):
            logits = logits_of(chunk)
            if self.ref is None:
                self.ref = np.lib.format.open_memmap(self.work / "reference-logits.npy", mode="w+", dtype=np.float32,
                                                     shape=(len(self.chunks), self.rows, logits.shape[-1]))
                self.gap = np.empty((len(self.chunks), self.rows))
            self.ref[i] = logits
            top2 = np.partition(logits, -2, axis=-1)[:, -2:]
            self.gap[i] = top2[:, 1] - top2[:, 0]  # reference top-1 minus top-2 logit (= log-prob gap)
            ppl.add(token_nll(logits, chunk[self.first + 1:]))
        self.ref.flush()
        return ppl.result()

    def score(self, logits_of: Callable[[List[int]], np.ndarray]) -> dict:
        from mlxedge.evaluate import DivergenceStats, PerplexityStats, compare_rows, token_nll

        ppl, div = PerplexityStats(), DivergenceStats()
        gaps_of_misses: List[np.ndarray] = []
        for i, chunk in enumerate(self.chunks):
            logits = logits_of(chunk)
            targets = chunk[self.first + 1:]
            ppl.add(token_nll(logits, targets))
            rows = compare_rows(np.asarray(self.ref[i]), logits, targets)
            div.add(rows)
            gaps_of_misses.append(self.gap[i][~rows["same_top"]])
        out = {**ppl.result(), **div.result()}
        misses = np.concatenate(gaps_of_misses)
        n = out["tokens_compared"]
        out["disagreements"] = int(misses.size)
        out["near_tie_disagreements"] = int((misses < self.near_tie).sum())
        decided = n - int((self.gap < self.near_tie).sum())
        out["top1_agreement_decided"] = (1.0 - (misses >= self.near_tie).sum() / decided) if decided else float("nan")
        out["reference_near_ties"] = int((self.gap < self.near_tie).sum())
        return out


def mlx_logits(model):
    from mlxedge.evaluate import scored_logits

    return lambda chunk: scored_logits(model, chunk)


def llama_runtime_logits(path: Path, ctx: int, threads: int):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False)
    first = ctx // 2

    def logits_of(chunk):
        llm.reset()
        llm.eval(list(chunk))
        return np.array(llm.scores[first:ctx - 1], dtype=np.float32)

    return llm, logits_of


def run_row(row: Row, args, scorer: Scorer, reference, source: Path, f32: Path, llama_files: dict,
            llama_info: dict) -> dict:
    """Build one row's model (a llama.cpp file read exactly, or mlxedge's quantization of the F32 file) and score it."""
    import mlx.core as mx

    import mlxedge

    t = time.perf_counter()
    out = {"key": row.key, "label": row.label, "side": row.side}
    if row.side == "llama.cpp":
        path = llama_files[row.llama_type]
        bits, weights, _, types = llama_info[row.llama_type]
        out.update(bpw=bits / weights, bytes=bits // 8, types=types)
        if row.llama_type != "f32":
            model = mlxedge.load(str(path), dequantize=True)  # the file's exact weights, as float32
            out["head_error"] = head_error(model, reference)
            out["weights"] = scorer.score(mlx_logits(model))
            del model
        if not args.no_llama_runtime:
            llm, logits_of = llama_runtime_logits(path, args.ctx, args.threads)
            out["runtime"] = scorer.score(logits_of)
            llm.close() if hasattr(llm, "close") else None
            del llm
    else:
        load = dict(row.load)
        if row.target:
            bits, weights, vectors, _ = llama_info[row.target]
            # the target counts quantizable matrices only; norms are float32 on both sides
            load["target_bpw"] = (bits - 32 * vectors) / (weights - vectors)
            out["target_bpw_matrices"] = load["target_bpw"]
        model = mlxedge.load(str(f32), **load)
        round_scales_to_f16(model)
        bits, weights = stored_bits(model)
        if row.key in args.as_run.split(","):  # the quantized model as mlxedge runs it (its kernels, float32)
            out["runtime"] = scorer.score(mlx_logits(model))
        if row.embedding_from_source:
            name, affine = embedding_at_source_blocks(model, reference, source)
            emb = model.module.model.embed_tokens
            rows_, cols = reference.module.model.embed_tokens.weight.shape
            bits -= rows_ * cols * emb.bits + 2 * emb.scales.size * SCALE_BITS
            bits += rows_ * cols * affine.bits + 2 * affine.scales.size * SCALE_BITS
            out["embedding"] = f"source {name} blocks (8-bit g32, exact)"
        dense_copy(model, reference.module.model.embed_tokens.weight if row.embedding_from_source else None)
        out.update(bpw=bits / weights, bytes=bits // 8, bits_used=model.info.get("bits"))
        if row.target:
            limit = llama_info[row.target][0] / llama_info[row.target][1]
            if out["bpw"] > limit:
                raise SystemExit(f"{row.label}: {out['bpw']:.5f} bpw is over llama.cpp {row.target}'s {limit:.5f}")
        out["head_error"] = head_error(model, reference)
        out["weights"] = scorer.score(mlx_logits(model))
        del model
    mx.clear_cache()
    out["seconds"] = time.perf_counter() - t
    w = out.get("weights") or out.get("runtime")
    log(f"{row.label}: {out['bpw']:.3f} bpw, KLD {w['kld_mean']:.5f}, top-1 {100 * w['top1_agreement']:.2f}% "
        f"({out['seconds']:.0f}s)")

    return out


# ------------------------------------------------------------------------------------------------ main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="smollm2", help="GGUF path or alias (default smollm2)")
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated row keys")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--near-tie", type=float, default=0.1,
                        help="a reference top-1/top-2 logit gap below this is a near tie")
    parser.add_argument("--no-llama-runtime", action="store_true", help="skip llama.cpp's own forward pass")
    parser.add_argument("--as-run", default="", metavar="KEYS",
                        help="mlxedge rows also scored as mlxedge runs them (quantized layers, its kernels)")
    parser.add_argument("--work", default=None, help="directory for the F32 and llama.cpp files (default: a temp dir)")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--json", dest="json_out", default=None, help="write every number as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("MLXEDGE_CPU_THREADS", str(args.threads))

    import mlx.core as mx

    import mlxedge
    from mlxedge.evaluate import builtin_text, make_chunks, tokenize_for_perplexity
    from mlxedge.recipe_search import reuse_measurements

    wanted = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = [k for k in wanted if k not in {r.key for r in ROWS}]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(DEFAULT_ROWS)}")
    rows = [r for r in ROWS if r.key in wanted]
    needs_llama = any(r.side == "llama.cpp" or r.target for r in rows)
    if needs_llama:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise SystemExit("llama-cpp-python is not installed (pip install 'mlxedge[llama]'); "
                             "or pick mlxedge rows only with --rows") from None

    load_start = os.getloadavg()
    started = time.perf_counter()
    source = source_path(args.model)
    work = Path(args.work or tempfile.mkdtemp(prefix="quant-vs-llama-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"source {source}; work dir {work}")
    f32 = write_f32(source, work)
    log(f"F32 GGUF {f32} ({f32.stat().st_size / 1e6:.0f} MB)")

    reference = mlxedge.load(str(f32))
    tokens, bos = tokenize_for_perplexity(reference.tokenizer, builtin_text())
    chunks = make_chunks(tokens, args.ctx, bos_id=bos, max_chunks=args.chunks)
    texts = check_disjoint(reference.tokenizer, tokens[:len(chunks) * args.ctx])
    scorer = Scorer(chunks, work, args.near_tie)
    t = time.perf_counter()
    ref_ppl = scorer.set_reference(mlx_logits(reference))
    log(f"reference: PPL {ref_ppl['perplexity']:.3f} on {ref_ppl['tokens_scored']} tokens "
        f"({time.perf_counter() - t:.0f}s)")

    llama_files: Dict[str, Path] = {}
    for kind in sorted({r.llama_type for r in rows if r.llama_type} | {r.target for r in rows if r.target}):
        llama_files[kind] = f32 if kind == "f32" else llama_quantize(f32, kind, work, args.threads)
    llama_info = {kind: gguf_bits(path) for kind, path in llama_files.items()}

    results = []
    with reuse_measurements():  # one calibration measurement of the F32 model serves every target/data-aware row
        for row in rows:
            results.append(run_row(row, args, scorer, reference, source, f32, llama_files, llama_info))
    settings = {"model": str(args.model), "source": str(source), "f32": str(f32), "ctx": args.ctx,
                "chunks": len(chunks), "tokens_scored": ref_ppl["tokens_scored"], "near_tie": args.near_tie,
                "reference_near_ties": int((scorer.gap < args.near_tie).sum()),
                "reference_perplexity": ref_ppl, "texts": texts, "threads": args.threads,
                "load_average_start": load_start, "load_average_end": os.getloadavg(),
                "seconds": time.perf_counter() - started, "mlx": mx.__version__}
    if needs_llama:
        import llama_cpp

        settings["llama_cpp_python"] = llama_cpp.__version__
    table = format_table(settings, results)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"settings": settings, "rows": results}, indent=1, default=str))
    return 0


def _pct(x: float, err: float) -> str:
    return f"{100 * x:.2f} ± {100 * err:.2f}"


def format_table(settings: dict, results: List[dict]) -> str:
    s, ref = settings, settings["reference_perplexity"]
    t = s["texts"]
    lines = [
        f"model: {s['model']} ({s['source']}) → F32 GGUF by mlxedge's exporter; reference: that F32 model, "
        f"PPL {ref['perplexity']:.3f} ± {ref['perplexity_error']:.3f}",
        f"text: pydoc_data topics from the start ({t['eval_topics']} topics, first {t['first_eval_topic']!r}); "
        f"ctx {s['ctx']}, {s['chunks']} chunks, {s['tokens_scored']} tokens scored (second halves). Calibration "
        f"(target-bpw, data-aware): mlxedge's default, topics from the end ({t['calibration_topics']} topics, "
        f"first {t['first_calibration_topic']!r}), none shared.",
        f"near tie: reference top-1 − top-2 logit < {s['near_tie']} ({s['reference_near_ties']} of the "
        f"{s['tokens_scored']} scored tokens); 'decided' top-1 counts only the other tokens. head error: relative "
        "RMS error of the output head's (tied embedding's) weights. "
        f"mlx {s['mlx']}, llama-cpp-python {s.get('llama_cpp_python', '-')}, {s['threads']} threads; load average "
        f"{s['load_average_start'][0]:.1f} at start, {s['load_average_end'][0]:.1f} at end; {s['seconds'] / 60:.1f} min.",
        "",
        "| row | bits/weight | size MB | PPL | mean KLD | p99 KLD | top-1 % | disagreements (near ties) | "
        "top-1 % decided | head error | as run: KLD · top-1 % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        w, rt = r.get("weights"), r.get("runtime")
        runtime = f"{rt['kld_mean']:.5f} · {100 * rt['top1_agreement']:.2f}" if rt else "-"
        if w is None:
            lines.append(f"| {r['label']} | {r['bpw']:.4f} | {r['bytes'] / 1e6:.1f} | - | - | - | - | - | - | 0 | "
                         f"{runtime} |")
            continue
        lines.append(
            f"| {r['label']} | {r['bpw']:.4f} | {r['bytes'] / 1e6:.1f} | "
            f"{w['perplexity']:.3f} ± {w['perplexity_error']:.3f} | {w['kld_mean']:.5f} ± {w['kld_mean_error']:.5f} | "
            f"{w['kld_p99']:.4f} | {_pct(w['top1_agreement'], w['top1_agreement_error'])} | "
            f"{w['disagreements']} ({w['near_tie_disagreements']}) | {100 * w['top1_agreement_decided']:.2f} | "
            f"{r['head_error']:.2e} | {runtime} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
