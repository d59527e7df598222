"""Open a GGUF file (llama, qwen2, qwen3, gemma3, phi3) as a `Checkpoint` with Hugging Face names.

The package's parts, one job each:
  reader   parse and validate the header, metadata and tensor table (our own parser, llama.cpp's rules);
  config   a Hugging Face config from the metadata, with llama.cpp's per-model constants as a table;
  names    GGUF -> Hugging Face tensor names; llama's q/k row un-permutation;
  blocks   the GGUF block codec: GGML block types -> MLX affine triplets;
  tensors  one tensor's route (name, conversion, value checks) into the Checkpoint.
What is undone from llama.cpp's converter: tensor names, llama's q/k row permutation (rows are whole
blocks, so quantized tensors are permuted without decoding), gemma3's `norm + 1` storage of RMSNorm
weights, and Llama 3.1-style rope scaling, which GGUF keeps only as a `rope_freqs` tensor of divisors.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
from gguf import GGMLQuantizationType as T

from ...errors import SourceError, UnsupportedError
from ..checkpoint import Checkpoint, TensorInfo
from . import blocks as gb
from .config import GUESSES, Meta, gguf_config, llama3_factors, llama3_rope_scaling
from .names import ARCHITECTURES, CONFIG_TENSORS, VISION_PREFIXES, hf_name, unpermute_rows
from .reader import GGUFFile, quote, read_gguf
from .tensors import TensorPlan, check_type

__all__ = ["ARCHITECTURES", "GUESSES", "GGUFFile", "hf_name", "llama3_factors", "llama3_rope_scaling", "open_gguf",
           "read_gguf", "unpermute_rows"]


def _torch_dtype(plans: List[TensorPlan]) -> str:
    floats = Counter(p.qtype for p in plans if len(p.rows_first) == 2 and p.qtype in (T.F16, T.BF16))
    if floats:
        return "bfloat16" if floats.most_common(1)[0][0] == T.BF16 else "float16"
    if any(p.qtype not in gb.FLOAT_TYPES for p in plans):
        return "float16"
    return "float32"


def _block_report(plans: List[TensorPlan], deviations: Optional[Dict[str, float]] = None) -> Dict[str, dict]:
    """Per block type: tensor counts, how it maps to MLX, and (once read) the largest requantization deviation."""
    report: Dict[str, dict] = {}
    for p in plans:
        exact_type = p.qtype in gb.FLOAT_TYPES or p.qtype in gb.EXACT_BITS or p.dequantize
        entry = report.setdefault(p.qtype.name, {
            "tensors": 0, "exact": 0,
            "mapping": ("float" if p.qtype in gb.FLOAT_TYPES else
                        "dequantized exactly to float32 (gguf's dequantizer)" if p.dequantize else
                        f"exact affine {gb.EXACT_BITS[p.qtype]}-bit g32" if p.qtype in gb.EXACT_BITS else
                        f"requantized affine {gb.REQUANT_BITS}-bit g32"),
            "max_abs_deviation": 0.0 if exact_type else (deviations or {}).get(p.qtype.name),
        })
        entry["tensors"] += 1
        entry["exact"] += int(p.exact)
    return report


def _quantization(plans: List[TensorPlan]) -> Optional[dict]:
    affine = [p for p in plans if p.affine]
    if not affine:
        return None
    top_bits = Counter(p.bits() for p in affine).most_common(1)[0][0]
    quantization: Dict[str, Any] = {"group_size": gb.GROUP, "bits": top_bits}
    for p in plans:
        if p.module and len(p.rows_first) == 2:
            quantization[p.module] = {"group_size": gb.GROUP, "bits": p.bits()} if p.affine else False
    return quantization


def open_gguf(path: Path, source: str, dequantize: bool = False) -> Checkpoint:
    """Open a GGUF file: validate it, map names and block types, and return a lazy `Checkpoint`.

    dequantize: every tensor comes out as float32 decoded by gguf's own dequantizer, so the model holds
    exactly the file's weights whatever the block type (Q6_K, Q3_K, Q2_K included, which the affine mapping
    can only approximate); the checkpoint is then a float one (no quantization).
    """
    path = Path(path)
    file = read_gguf(path)
    meta = Meta(file)
    arch = meta.raw("general.architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise UnsupportedError(f"GGUF architecture {str(arch)[:40]!r} is not supported; mlxedge reads "
                               f"{', '.join(ARCHITECTURES)} GGUFs")
    by_name = {t.name: t for t in file.tensors}

    # a provisional dtype is enough for the config; plans need the config (head counts)
    provisional = gguf_config(meta, arch, by_name, "float16")
    plans: List[TensorPlan] = []
    skipped: List[str] = []
    hf_names = set()
    for t in file.tensors:
        if t.name.startswith(VISION_PREFIXES):  # a vision tower bundled with the language model
            skipped.append(t.name)
            continue
        check_type(t, path.name)
        if t.name in CONFIG_TENSORS:
            continue
        name = hf_name(arch, t.name)
        if name is None:
            raise UnsupportedError(f"tensor {quote(t.name)} in {path.name} is not part of a {arch} model mlxedge knows; "
                                   "the file may be a multimodal projector or an unsupported variant")
        if name in hf_names:
            raise SourceError(f"tensor {quote(t.name)} in {path.name} maps to {name}, which another tensor already "
                              "provides; the file is corrupt")
        hf_names.add(name)
        plans.append(TensorPlan(t, name, arch, provisional, dequantize=dequantize))
    # dequantized: float32, so a default load keeps the file's weights exactly (a cast down would round them)
    config = dict(provisional, torch_dtype="float32" if dequantize else _torch_dtype(plans))

    tensor_infos: Dict[str, TensorInfo] = {}
    for p in plans:
        tensor_infos.update(p.infos())

    info = {"gguf": {"file": str(path), "architecture": arch, "block_types": _block_report(plans),
                     "name": meta.str("general.name"), "dequantized": dequantize,
                     # what the file stores for the model's tensors (block bytes, scales included)
                     "stored_bytes": sum(p.tensor.nbytes for p in plans),
                     "stored_weights": sum(int(np.prod(p.rows_first)) for p in plans)}}
    if skipped:
        info["gguf"]["skipped_vision_tensors"] = len(skipped)

    def iter_tensors() -> Iterator[Tuple[str, Any]]:
        """Yield tensors one at a time; once all are read, report the requantized types' largest deviation."""
        deviations: Dict[str, float] = {}
        for p in plans:
            tensors, deviation = p.produce()
            if deviation is not None:
                deviations[p.qtype.name] = max(deviations.get(p.qtype.name, 0.0), deviation)
            yield from tensors
        info["gguf"]["block_types"] = _block_report(plans, deviations)

    def load_tokenizer():
        if "tokenizer.ggml.tokens" not in file.fields:
            raise SourceError(f"{path.name} carries no tokenizer (no tokenizer.ggml.tokens metadata); "
                              "use a GGUF exported with its tokenizer")
        from ..tokenizer_cache import load_gguf_tokenizer
        from ..tokenizers import refuse_remote_code

        refuse_remote_code(path.parent)
        try:
            return load_gguf_tokenizer(path)  # cached after the first build; needs no torch
        except Exception as exc:  # transformers raises many kinds here
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise UnsupportedError(f"transformers could not build a tokenizer from {path.name} "
                                   f"({type(exc).__name__}: {first})") from None

    return Checkpoint(source=source, kind="gguf", path=path, config=config, tensor_infos=tensor_infos,
                      iter_tensors=iter_tensors, load_tokenizer=load_tokenizer, quantization=_quantization(plans),
                      chat_template=meta.str("tokenizer.chat_template"), info=info)
