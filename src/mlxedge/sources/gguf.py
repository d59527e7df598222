"""Open a GGUF file (llama, qwen2, qwen3, gemma3, phi3) as a `Checkpoint` with Hugging Face names.

Reads with the `gguf` package's memory-mapped reader (never `mx.load`): headers at open time, tensor
data one tensor at a time in `iter_tensors`. What this module undoes from llama.cpp's converter:
  * tensor names (blk.N.attn_q -> model.layers.N.self_attn.q_proj, ...), per architecture;
  * llama's q/k row permutation for its rotary layout (rows are whole blocks, so quantized tensors
    are permuted without decoding);
  * gemma3's `norm + 1` storage of RMSNorm weights;
  * Llama 3.1-style rope scaling, which GGUF keeps only as a `rope_freqs` tensor of divisors
    (recovered as mlx-lm's {"rope_type": "llama3", ...} and verified by regenerating the tensor).
Block types go through `mlxedge.quant.gguf_blocks`: exact MLX affine triplets where the format allows,
8-bit group-32 requantization for Q2_K/Q3_K/Q6_K (deviation reported in `info`), float as stored.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
from gguf import GGMLQuantizationType as T

from ..errors import SourceError, UnsupportedError
from ..quant import gguf_blocks as gb
from .checkpoint import Checkpoint, TensorInfo

GGUF_MAGIC = b"GGUF"

# GGUF architecture -> (HF model_type, HF architectures class, default rope theta)
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM", 10000.0),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", 1000000.0),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", 1000000.0),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM", 1000000.0),
    "phi3": ("phi3", "Phi3ForCausalLM", 10000.0),
}

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

_LAYER_OVERRIDES = {
    "gemma3": {
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
}

# tensors llama.cpp adds that carry configuration, not weights (consumed by _config)
_CONFIG_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}

# multimodal GGUFs (e.g. Ollama's gemma3) carry the vision tower as v.* / mm.* tensors: text use skips them
_VISION_PREFIXES = ("v.", "mm.")

_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")


def hf_name(arch: str, gguf_name: str) -> Optional[str]:
    """The Hugging Face / mlx-lm name of a GGUF tensor, or None when the name is not one we know."""
    m = _BLOCK.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        table = {**_LAYER_NAMES, **_LAYER_OVERRIDES.get(arch, {})}
        return f"model.layers.{layer}.{table[part]}.{kind}" if part in table else None
    base, _, kind = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES and kind in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[base]}.{kind}"
    return None


def unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation along axis 0 (per head: interleaved pairs -> two halves)."""
    head_rows = rows.shape[0] // n_head
    return rows.reshape(n_head, head_rows // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


class _Meta:
    """Typed access to GGUF key/values."""

    def __init__(self, reader):
        self.fields = reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        return default if value is None else value


def _reader_class():
    """gguf's GGUFReader, with metadata arrays read in one piece instead of element by element.

    GGUFReader builds a numpy view per array element: for a 49k-token vocabulary and its merges that is
    about 100k objects and 4-7 s per open. mlxedge reads no string array itself (transformers builds the
    tokenizer from the file on its own), so string arrays are kept as one raw blob (their `contents()`
    is empty) and numeric arrays as one typed view. Big-endian files use the stock reader.
    """
    import struct

    from gguf import GGUFReader, GGUFValueType

    class ArrayBlobReader(GGUFReader):
        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type != GGUFValueType.ARRAY or self.byte_order == "S":
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            count = self._get(orig_offs + 4, np.uint64)
            itype, n, offs = GGUFValueType(int(raw_itype[0])), int(count[0]), orig_offs + 12
            types = [GGUFValueType.ARRAY, itype]
            nptype = self.gguf_scalar_to_np.get(itype)
            if nptype is not None:
                values = self._get(offs, nptype, n)
                return 12 + int(values.nbytes), [raw_itype, count, values], ([2] if n else []), types
            if itype != GGUFValueType.STRING:
                return super()._get_field_parts(orig_offs, raw_type)
            for _ in range(n):
                offs += 8 + struct.unpack_from("<Q", self.data, offs)[0]
            blob = self._get(orig_offs + 12, np.uint8, offs - orig_offs - 12)
            return offs - orig_offs, [raw_itype, count, blob], [], types

    return ArrayBlobReader


def _read(path: Path):
    """Validate the file (exists, magic, readable, data within the file) and return a GGUF reader."""
    GGUFReader = _reader_class()

    if not path.is_file():
        raise SourceError(f"GGUF file not found: {path}; check the path")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise SourceError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF'); "
                          "pass a .gguf model file")
    size = os.path.getsize(path)
    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # the reader raises IndexError/ValueError on short or damaged headers
        raise SourceError(f"{path} is truncated or corrupt: its header or tensor table does not fit in its "
                          f"{size} bytes; download the file again") from exc
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise SourceError(f"{path} is truncated: tensor '{t.name}' needs bytes up to {end} but the file "
                              f"has {size}; download the file again")
    return reader


def _heads_kv(meta: _Meta, arch: str, heads: int) -> int:
    value = meta.get(f"{arch}.attention.head_count_kv", heads)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise UnsupportedError(f"per-layer key/value head counts {sorted(set(value))} are not supported")
        value = value[0]
    return int(value)


def _rope_scaling(meta: _Meta, arch: str) -> Optional[dict]:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or factor in (None, 1.0):
        return None
    if kind not in ("linear", "yarn"):
        raise UnsupportedError(f"GGUF rope scaling type '{kind}' is not supported (linear and yarn are)")
    scaling = {"rope_type": kind, "type": kind, "factor": float(factor)}
    orig = meta.get(f"{arch}.rope.scaling.original_context_length")
    if orig:
        scaling["original_max_position_embeddings"] = int(orig)
    return scaling


def llama3_factors(theta: float, head_dim: int, factor: float, low: float, high: float, context: float) -> np.ndarray:
    """Per-frequency rope divisors as llama.cpp writes them for Llama 3.1-style scaling (rope_freqs)."""
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = (context / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < context / high, 1.0, np.where(wavelen > context / low, factor, mid))


def llama3_rope_scaling(factors: np.ndarray, theta: float, head_dim: int) -> Optional[dict]:
    """Recover mlx-lm's {"rope_type": "llama3", ...} from a rope_freqs tensor, verified by regenerating it.

    GGUF keeps only the computed divisors. The largest is `factor`; the ones strictly between 1 and
    `factor` lie on a line in 1/wavelength whose slope and intercept give the original context length
    and high_freq_factor (low_freq_factor = 1, as in every Llama 3.x release).
    """
    if factors.shape != (head_dim // 2,):
        raise UnsupportedError(f"rope_freqs has shape {factors.shape}, expected ({head_dim // 2},)")
    factor = float(factors.max())
    if abs(factor - 1.0) < 1e-6 and np.allclose(factors, 1.0):
        return None
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    low, high, context = 1.0, 4.0, 8192.0
    mid = (factors > 1 + 1e-5) & (factors < factor * (1 - 1e-5))
    if mid.sum() >= 2:
        s = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[mid], s, 1)  # s = context/(high-low)/wavelen - low/(high-low)
        if intercept < 0:
            high = low - low / intercept
            context = float(np.round(slope * (high - low)))
    # with fewer than two in-between divisors the line is underdetermined: try the usual settings too
    candidates = [(high, context)] + [(h, c) for c in (8192, 4096, 16384, 32768, 2048, 131072) for h in (4.0, 2.0, 8.0)]
    for high, context in candidates:
        high = float(np.round(high, 4))
        if np.allclose(llama3_factors(theta, head_dim, factor, low, high, context), factors, rtol=1e-3, atol=1e-4):
            return {"rope_type": "llama3", "type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": int(context)}
    raise UnsupportedError("the rope_freqs tensor in this GGUF does not follow Llama 3 rope scaling; "
                           "mlxedge cannot reproduce its positions")


def _config(meta: _Meta, arch: str, tensors: Dict[str, Any], torch_dtype: str) -> dict:
    """Hugging Face style config dict from GGUF metadata (plus a few facts read off the tensor list)."""
    model_type, hf_class, default_theta = ARCHITECTURES[arch]

    def need(key: str):
        value = meta.get(f"{arch}.{key}")
        if value is None:
            raise SourceError(f"GGUF metadata lacks '{arch}.{key}'; the file is incomplete")
        return value

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    head_dim = meta.get(f"{arch}.attention.key_length")
    if head_dim is None and arch == "llama":
        head_dim = meta.get("llama.rope.dimension_count")
    head_dim = int(head_dim) if head_dim else hidden // heads
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:  # the embedding's rows (GGUF shapes are innermost-first)
        vocab = int(tensors["token_embd.weight"].shape[-1])
    cfg = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": int(need("block_count")),
        "intermediate_size": int(need("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": _heads_kv(meta, arch, heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "vocab_size": int(vocab),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", default_theta)),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": torch_dtype,
    }
    for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            cfg[name] = int(value)
    scaling = _rope_scaling(meta, arch)
    if scaling:
        cfg["rope_scaling"] = scaling
    if arch == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensors
        cfg["mlp_bias"] = "blk.0.ffn_down.bias" in tensors
        if "rope_freqs.weight" in tensors:
            factors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64)
            scaling = llama3_rope_scaling(factors, cfg["rope_theta"], head_dim)
            if scaling:
                cfg["rope_scaling"] = scaling
    if arch == "gemma3":
        cfg["hidden_activation"] = "gelu_pytorch_tanh"
        cfg["sliding_window"] = int(meta.get("gemma3.attention.sliding_window", 512))
        cfg["sliding_window_pattern"] = 6  # llama.cpp's fixed gemma3 pattern: every 6th layer is global
        cfg["rope_local_base_freq"] = 10000.0
        # llama.cpp: 1/sqrt(head_dim), except Gemma 3 27B (62 layers) which scales by hidden/heads
        cfg["query_pre_attn_scalar"] = hidden // heads if cfg["num_hidden_layers"] == 62 else head_dim
        if scaling:
            cfg["rope_scaling"] = {"rope_type": scaling["rope_type"], "factor": scaling["factor"]}
    if arch == "phi3":
        rot = meta.get("phi3.rope.dimension_count")
        cfg["partial_rotary_factor"] = (int(rot) / head_dim) if rot else 1.0
        orig = meta.get("phi3.rope.scaling.original_context_length")
        cfg["original_max_position_embeddings"] = int(orig) if orig else cfg["max_position_embeddings"]
        window = meta.get("phi3.attention.sliding_window")
        if window:
            cfg["sliding_window"] = int(window)
        if "rope_factors_long.weight" in tensors:
            long_f = np.asarray(tensors["rope_factors_long.weight"].data, dtype=np.float32)
            short_f = np.asarray(tensors.get("rope_factors_short.weight", tensors["rope_factors_long.weight"]).data,
                                 dtype=np.float32)
            cfg["rope_scaling"] = {"type": "longrope", "rope_type": "longrope",
                                   "long_factor": [float(x) for x in long_f],
                                   "short_factor": [float(x) for x in short_f]}
    return cfg


class _Plan:
    """One GGUF tensor's route to the outputs: HF name, how it is converted, what it yields."""

    def __init__(self, tensor, name: str, arch: str, cfg: dict):
        self.tensor = tensor
        self.name = name
        self.qtype = T(int(tensor.tensor_type))
        self.rows_first = tuple(int(x) for x in reversed(tensor.shape.tolist()))  # numpy order
        self.permute_heads = None
        if arch == "llama" and re.search(r"\.attn_[qk]\.(weight|bias)$", tensor.name):
            self.permute_heads = (cfg["num_attention_heads"] if ".attn_q." in tensor.name
                                  else cfg["num_key_value_heads"])
        self.norm_shift = arch == "gemma3" and tensor.name.endswith("norm.weight")
        self.affine = self.qtype not in gb.FLOAT_TYPES and len(self.rows_first) == 2 and name.endswith(".weight")
        self.module = name[: -len(".weight")] if name.endswith(".weight") else None

    @property
    def exact(self) -> bool:
        """Whether the yielded values equal gguf's dequantizer (float types, exact affine types, rare 1-D quants)."""
        return not (self.affine and self.qtype in gb.REQUANT_TYPES)

    def bits(self) -> int:
        return gb.EXACT_BITS.get(self.qtype, gb.REQUANT_BITS)

    def float_dtype(self) -> str:
        if self.norm_shift or self.qtype not in gb.FLOAT_TYPES:
            return "float32"
        return {T.F32: "float32", T.F16: "float16", T.BF16: "bfloat16"}[self.qtype]

    def infos(self) -> List[Tuple[str, TensorInfo]]:
        if self.affine:
            rows, cols = self.rows_first
            groups = cols // gb.GROUP
            words = cols * self.bits() // 32
            return [(f"{self.module}.weight", TensorInfo((rows, words), "uint32", rows * words * 4)),
                    (f"{self.module}.scales", TensorInfo((rows, groups), "float32", rows * groups * 4)),
                    (f"{self.module}.biases", TensorInfo((rows, groups), "float32", rows * groups * 4))]
        dtype = self.float_dtype()
        n = int(np.prod(self.rows_first))
        return [(self.name, TensorInfo(self.rows_first, dtype, n * np.dtype(
            "uint16" if dtype == "bfloat16" else dtype).itemsize))]

    def produce(self, stats: dict) -> Iterator[Tuple[str, Any]]:
        import mlx.core as mx
        from gguf.quants import dequantize

        data = self.tensor.data
        if self.affine:
            if self.permute_heads:
                data = unpermute_rows(data, self.permute_heads)
            a = gb.to_affine(data, self.qtype)
            if not a.exact:
                entry = stats[self.qtype.name]
                entry["max_abs_deviation"] = max(entry["max_abs_deviation"] or 0.0, a.max_abs_deviation)
            yield f"{self.module}.weight", mx.array(a.weight)
            yield f"{self.module}.scales", mx.array(a.scales)
            yield f"{self.module}.biases", mx.array(a.biases)
            return
        if self.qtype == T.BF16:
            bits = np.ascontiguousarray(data).view(np.uint16).reshape(self.rows_first)
            values = (bits.astype(np.uint32) << 16).view(np.float32)
        elif self.qtype in (T.F32, T.F16):
            values = np.asarray(data).reshape(self.rows_first)
        else:  # a quantized non-matrix (rare): gguf's own dequantizer, as float32
            values = dequantize(np.asarray(data), self.qtype).reshape(self.rows_first)
        if self.permute_heads:
            values = unpermute_rows(values, self.permute_heads)
        if self.norm_shift:
            values = values.astype(np.float32) - 1.0
        arr = mx.array(np.ascontiguousarray(values))
        if self.qtype == T.BF16 and not self.norm_shift:
            arr = arr.astype(mx.bfloat16)
        yield self.name, arr


def _check_type(t, path: Path) -> None:
    """Refuse, naming the tensor, any block type mlxedge cannot read."""
    try:
        qtype = T(int(t.tensor_type))
    except ValueError:
        qtype = None
    if qtype not in gb.SUPPORTED_TYPES:
        type_name = qtype.name if qtype is not None else f"#{int(t.tensor_type)}"
        raise UnsupportedError(f"tensor '{t.name}' in {path.name} has block type {type_name}, which mlxedge "
                               f"cannot read; supported: {', '.join(x.name for x in gb.SUPPORTED_TYPES)}")


def _torch_dtype(plans: List[_Plan]) -> str:
    floats = Counter(p.qtype for p in plans if len(p.rows_first) == 2 and p.qtype in (T.F16, T.BF16))
    if floats:
        return "bfloat16" if floats.most_common(1)[0][0] == T.BF16 else "float16"
    if any(p.qtype not in gb.FLOAT_TYPES for p in plans):
        return "float16"
    return "float32"


def open_gguf(path: Path, source: str) -> Checkpoint:
    """Open a GGUF file: validate it, map names and block types, and return a lazy `Checkpoint`."""
    path = Path(path)
    reader = _read(path)
    meta = _Meta(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedError(f"GGUF architecture '{arch}' is not supported; mlxedge reads "
                               f"{', '.join(ARCHITECTURES)} GGUFs")
    by_name = {t.name: t for t in reader.tensors}

    # a provisional dtype is enough for the config; plans need the config (head counts)
    provisional = _config(meta, arch, by_name, "float16")
    plans: List[_Plan] = []
    skipped: List[str] = []
    for t in reader.tensors:
        if t.name.startswith(_VISION_PREFIXES):  # a vision tower bundled with the language model
            skipped.append(t.name)
            continue
        _check_type(t, path)
        if t.name in _CONFIG_TENSORS:
            continue
        name = hf_name(arch, t.name)
        if name is None:
            raise UnsupportedError(f"tensor '{t.name}' in {path.name} is not part of a {arch} model mlxedge knows; "
                                   "the file may be a multimodal projector or an unsupported variant")
        plans.append(_Plan(t, name, arch, provisional))
    config = dict(provisional, torch_dtype=_torch_dtype(plans))

    tensor_infos: Dict[str, TensorInfo] = {}
    for p in plans:
        tensor_infos.update(p.infos())

    quantization = None
    affine = [p for p in plans if p.affine]
    if affine:
        top_bits = Counter(p.bits() for p in affine).most_common(1)[0][0]
        quantization = {"group_size": gb.GROUP, "bits": top_bits}
        for p in plans:
            if p.module and len(p.rows_first) == 2:
                quantization[p.module] = {"group_size": gb.GROUP, "bits": p.bits()} if p.affine else False

    block_types: Dict[str, dict] = {}
    for p in plans:
        entry = block_types.setdefault(p.qtype.name, {
            "tensors": 0, "exact": 0,
            "mapping": ("float" if p.qtype in gb.FLOAT_TYPES else
                        f"exact affine {gb.EXACT_BITS[p.qtype]}-bit g32" if p.qtype in gb.EXACT_BITS else
                        f"requantized affine {gb.REQUANT_BITS}-bit g32"),
            "max_abs_deviation": 0.0 if p.qtype in gb.FLOAT_TYPES or p.qtype in gb.EXACT_BITS else None,
        })
        entry["tensors"] += 1
        entry["exact"] += int(p.exact)
    info = {"gguf": {"file": str(path), "architecture": arch, "block_types": block_types,
                     "name": meta.get("general.name")}}
    if skipped:
        info["gguf"]["skipped_vision_tensors"] = len(skipped)

    def iter_tensors() -> Iterator[Tuple[str, Any]]:
        """Yield tensors one at a time; fills in the requantized types' max_abs_deviation as it goes."""
        for p in plans:
            yield from p.produce(block_types)

    def load_tokenizer():
        if "tokenizer.ggml.tokens" not in reader.fields:
            raise SourceError(f"{path.name} carries no tokenizer (no tokenizer.ggml.tokens metadata); "
                              "use a GGUF exported with its tokenizer")
        try:
            from .tokenizer_cache import load_gguf_tokenizer

            return load_gguf_tokenizer(path)  # cached after the first build; needs no torch
        except Exception as exc:
            raise UnsupportedError(f"transformers could not build a tokenizer from {path.name} "
                                   f"({type(exc).__name__}: {exc})") from None

    return Checkpoint(source=source, kind="gguf", path=path, config=config, tensor_infos=tensor_infos,
                      iter_tensors=iter_tensors, load_tokenizer=load_tokenizer, quantization=quantization,
                      chat_template=meta.get("tokenizer.chat_template"), info=info)
