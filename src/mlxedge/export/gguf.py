"""Write a model as a GGUF file that llama.cpp and Ollama run: F32, F16, Q8_0, Q4_0 or a Q4_K_M-style mix.

Weights come from any mlxedge source (HF or mlx directory, GGUF, alias), read as float32 exactly as the source
defines them (open_source's dequantize: a GGUF's blocks through gguf's own dequantizer, every type), one
tensor at a time, renamed with the `gguf` package's tensor-name map, q/k rows permuted into llama.cpp's
rotary layout for llama, gemma3's RMSNorm weights stored as `w + 1` (llama.cpp's convention), and encoded with gguf's quantizers (Q8_0, Q4_0, Q5_0) or ours (Q4_K, Q6_K in
export/kquants.py). The q4_k_m mix follows llama.cpp's rule: Q4_K, with Q6_K for attention values and FFN
down projections on `use_more_bits` layers and for the output head (or a tied embedding); rows whose length
is not a multiple of 256 fall back as llama.cpp's do (Q4_K → Q5_0, Q6_K → Q8_0). Tokenizer and chat
template are copied: from the source GGUF's metadata, or from a directory's tokenizer files (BPE models).
The file is written to a temporary name beside DEST and renamed when complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as Q

from .. import fsutil
from ..configs import normalize_config
from ..errors import MlxedgeError, UnsupportedError
from ..quant.recipes import use_more_bits
from ..sources import open_source
from .kquants import QK_K, quantize_q4_k, quantize_q6_k

ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
         "gemma3_text": gguf.MODEL_ARCH.GEMMA3}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0}  # llama.cpp's choice when a row is not whole super-blocks


def export_type(bits: Optional[int], recipe: Optional[str]) -> str:
    """The GGUF file type for convert's settings: recipe q4_k_m, else bits 8 (and the default "auto") → q8_0,
    4 → q4_0, none/16 → f16, 32 → f32 (every matrix as float32: the input llama.cpp's quantizer starts from)."""
    if recipe is not None:
        if recipe.lower().replace("-", "_") != "q4_k_m":
            raise MlxedgeError(f"GGUF export knows the recipe q4_k_m, not {recipe!r}; or give bits=8 (Q8_0), 4 "
                               "(Q4_0) or 16 (F16).")
        return "q4_k_m"
    return {None: "f16", 16: "f16", 32: "f32", 8: "q8_0", 4: "q4_0"}[bits]


def _tensor_type(file_type: str, gguf_name: str, shape: tuple, n_layers: int, tied: bool) -> Q:
    if len(shape) == 1:
        return Q.F32
    cols = shape[-1]
    if file_type == "f32":
        return Q.F32
    if file_type == "f16":
        chosen = Q.F16
    elif file_type == "q8_0":
        chosen = Q.Q8_0
    elif file_type == "q4_0":
        chosen = Q.Q4_0
    else:
        chosen = Q.Q4_K
        is_output = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
        layer = int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else None
        if is_output or (layer is not None and (".attn_v." in gguf_name or ".ffn_down." in gguf_name)
                         and use_more_bits(layer, n_layers)):
            chosen = Q.Q6_K
        if cols % QK_K:
            chosen = _FALLBACK[chosen]
    if chosen not in (Q.F16, Q.F32) and cols % 32:
        return Q.F16
    return chosen


def _encode(data: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return data.astype(np.float32)
    if qtype == Q.F16:
        return data.astype(np.float16)
    if qtype == Q.Q4_K:
        return quantize_q4_k(data)
    if qtype == Q.Q6_K:
        return quantize_q6_k(data)
    return gguf.quants.quantize(data.astype(np.float32), qtype)


def _permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows into llama.cpp's rotary order (the inverse of the reader's unpermute)."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _add_gemma3(writer: gguf.GGUFWriter, config: dict) -> None:
    """gemma3's own keys: the local-attention window (llama.cpp fixes the 5-local:1-global pattern and the
    local rope base itself) and linear rope scaling of the global layers (4B and up). What llama.cpp fixes
    rather than reads must match the model, or the file would run as another model."""
    pattern = int(config.get("sliding_window_pattern", 6))
    local_base = float(config.get("rope_local_base_freq", 10000.0))
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    scalar = float(config.get("query_pre_attn_scalar", head_dim))
    if int(config["num_hidden_layers"]) == 62:  # llama.cpp's 27B rule: scale by hidden / heads
        expected_scalar = config["hidden_size"] / config["num_attention_heads"]
    else:
        expected_scalar = head_dim
    if pattern != 6 or local_base != 10000.0 or scalar != expected_scalar:
        raise UnsupportedError(f"llama.cpp runs gemma3 with 5 local layers per global one, local rope base 10000 "
                               f"and query scale 1/sqrt({expected_scalar:g}); this model has pattern {pattern}, "
                               f"base {local_base:g}, scale 1/sqrt({scalar:g}), so it cannot be exported for it.")
    window = config.get("sliding_window")
    if window:
        writer.add_sliding_window(int(window))
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling:
        raise UnsupportedError(f"GGUF export of gemma3 knows linear rope scaling, not {scaling!r}.")


def _float_tensors(checkpoint):
    """(HF name, float32 numpy array) for a checkpoint opened dequantized (every tensor float)."""
    for name, array in checkpoint.iter_tensors():
        yield name, np.array(array.astype(mx.float32))


def _add_tokenizer(writer: gguf.GGUFWriter, checkpoint, config: dict) -> None:
    if checkpoint.kind == "gguf":
        reader = gguf.GGUFReader(str(checkpoint.path))
        for field in reader.fields.values():
            if field.name.startswith("tokenizer."):
                _copy_field(writer, field)
        return
    tok = checkpoint.load_tokenizer()
    backend = getattr(tok, "backend_tokenizer", None)
    import json

    spec = json.loads(backend.to_str()) if backend is not None else {}
    if spec.get("model", {}).get("type") != "BPE":
        raise UnsupportedError("GGUF export writes byte-level BPE tokenizers (llama 3, qwen, SmolLM); this model's "
                               "tokenizer is of another kind.")
    vocab = spec["model"]["vocab"]
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    size = max(config["vocab_size"], max(vocab.values()) + 1, max(added, default=-1) + 1)
    tokens, types = [f"[PAD{i}]" for i in range(size)], [gguf.TokenType.UNUSED] * size
    for token, i in vocab.items():
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for i, t in added.items():
        tokens[i] = t["content"]
        types[i] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(config))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(str(checkpoint.path), load_merges=True, n_vocab=size)
    special.add_to_gguf(writer)
    if checkpoint.chat_template and not special.chat_template:
        writer.add_chat_template(checkpoint.chat_template)


def _pre_tokenizer(config: dict) -> str:
    """llama.cpp's pre-tokenizer name, which it requires to split text as the model was trained."""
    if config["model_type"] in ("qwen2", "qwen3"):
        return "qwen2"
    if config.get("vocab_size") == 49152:
        return "smollm"
    if config.get("vocab_size") in (128256, 128257):
        return "llama-bpe"
    return "default"


def _copy_field(writer: gguf.GGUFWriter, field) -> None:
    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        sub = field.types[1]
        values = [field.parts[i] for i in field.data]
        if sub == gguf.GGUFValueType.STRING:
            writer.add_array(field.name, [bytes(v).decode("utf-8", errors="replace") for v in values])
        else:
            writer.add_array(field.name, [v.tolist()[0] for v in values])
    elif kind == gguf.GGUFValueType.STRING:
        writer.add_string(field.name, bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace"))
    else:
        writer.add_key_value(field.name, field.parts[field.data[0]].tolist()[0], kind)


def export_gguf(source, dest, file_type: str = "q8_0", progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Write `source` as a GGUF file at `dest`; returns a summary (path, bytes, tensor types)."""
    dest = Path(dest).expanduser()
    checkpoint = open_source(source, dequantize=True)  # the source's exact weights, whatever its block types
    config = normalize_config(checkpoint.config)
    arch = config["model_type"]
    if arch not in ARCHS:
        raise UnsupportedError(f"GGUF export supports {', '.join(ARCHS)}; {arch} is not one of them.")
    n_layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    tied = "lm_head.weight" not in checkpoint.tensor_infos
    names = gguf.get_tensor_name_map(ARCHS[arch], n_layers)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fsutil.clean_stale_temps(dest.parent)
    tmp = dest.parent / fsutil.temp_name("gguf")
    writer = None
    try:  # from the writer's creation on: a Ctrl-C at any point leaves no temporary file behind
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[ARCHS[arch]])
        writer.add_name(Path(str(checkpoint.source)).stem)
        writer.add_context_length(int(config.get("max_position_embeddings", 4096)))
        writer.add_embedding_length(int(config["hidden_size"]))
        writer.add_block_count(n_layers)
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        writer.add_vocab_size(int(config["vocab_size"]))
        if arch in ("qwen3", "gemma3_text") or head_dim != config["hidden_size"] // heads:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        if arch == "gemma3_text":
            _add_gemma3(writer, config)
        writer.add_file_type(FILE_TYPES[file_type])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, checkpoint, config)
        counts: dict = {}
        total = len(checkpoint.tensor_infos)
        for done, (name, data) in enumerate(_float_tensors(checkpoint), start=1):
            gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UnsupportedError(f"GGUF export does not know where tensor {name} goes for {arch}.")
            if arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
                data = _permute(data, heads if ".attn_q." in gguf_name else kv_heads)
            if arch == "gemma3_text" and name.endswith("norm.weight"):
                data = data + np.float32(1.0)  # llama.cpp stores gemma's (1 + w) gain, as its converter does
            qtype = _tensor_type(file_type, gguf_name, data.shape, n_layers, tied)
            writer.add_tensor(gguf_name, _encode(data, qtype), raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
            if progress is not None:
                progress(min(done, total), total)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, dest)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(dest), "bytes": dest.stat().st_size, "architecture": arch, "gguf_type": file_type,
            "tensor_types": counts}
