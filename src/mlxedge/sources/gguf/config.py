"""A Hugging Face style config dict from GGUF metadata, plus the facts GGUF does not store.

Values are read typed: a key that holds the wrong kind of value (a string where a count belongs, an
array where one number belongs) is a one-line SourceError naming the key. What llama.cpp hard-codes per
model instead of storing in the file is listed, with the reason, in `GUESSES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import numpy as np

from ...errors import SourceError, UnsupportedError
from .names import ARCHITECTURES
from .reader import GGUFFile, StringArray


@dataclass(frozen=True)
class Guess:
    """A config value llama.cpp does not store in the GGUF but fixes in code for an architecture."""

    arch: str
    key: str
    value: Callable[[dict], Any]
    when: Callable[[dict], bool]
    reason: str


_ALWAYS = lambda cfg: True  # noqa: E731

# First matching row per (arch, key) wins.
GUESSES = (
    Guess("gemma3", "hidden_activation", lambda c: "gelu_pytorch_tanh", _ALWAYS,
          "every Gemma 3 uses tanh-approximated GELU; GGUF has no activation key"),
    Guess("gemma3", "sliding_window_pattern", lambda c: 6, _ALWAYS,
          "llama.cpp's fixed gemma3 pattern: every 6th layer attends globally"),
    Guess("gemma3", "rope_local_base_freq", lambda c: 10000.0, _ALWAYS,
          "llama.cpp hard-codes rope theta 10k on gemma3's sliding-window layers"),
    Guess("gemma3", "query_pre_attn_scalar", lambda c: c["hidden_size"] // c["num_attention_heads"],
          lambda c: c["num_hidden_layers"] == 62,
          "Gemma 3 27B (the only 62-layer Gemma 3) scales queries by hidden/heads (llama.cpp: LLM_TYPE_27B)"),
    Guess("gemma3", "query_pre_attn_scalar", lambda c: c["head_dim"], _ALWAYS,
          "other Gemma 3 sizes scale queries by 1/sqrt(head_dim)"),
)


def apply_guesses(arch: str, cfg: dict) -> None:
    """Fill in the GUESSES rows for `arch` (first matching row per key)."""
    done = set()
    for g in GUESSES:
        if g.arch == arch and g.key not in done and g.when(cfg):
            cfg[g.key] = g.value(cfg)
            done.add(g.key)


class Meta:
    """Typed access to GGUF metadata: each getter names the key when the stored value is of the wrong kind."""

    def __init__(self, file: GGUFFile):
        self.fields, self.path = file.fields, file.path

    def raw(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def _bad(self, key: str, value: Any, expected: str):
        if isinstance(value, StringArray):
            shown = f"an array of {value.count} strings"
        elif isinstance(value, np.ndarray):
            shown = f"an array of {value.size} numbers"
        else:
            shown = repr(value)[:60]
        return SourceError(f"{self.path.name}: metadata '{key}' is {shown}, expected {expected}; the file is corrupt")

    def int(self, key: str, default: Optional[int] = None, minimum: int = 1) -> Optional[int]:
        value = self.fields.get(key)
        if value is None:
            return default
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise self._bad(key, value, f"an integer >= {minimum}")
        return int(value)

    def float(self, key: str, default: Optional[float] = None) -> Optional[float]:
        value = self.fields.get(key)
        if value is None:
            return default
        if isinstance(value, (bool, np.bool_, str, np.ndarray, StringArray)) or not math.isfinite(value):
            raise self._bad(key, value, "a finite number")
        return float(value)

    def str(self, key: str, default: Optional[str] = None) -> Optional[str]:
        value = self.fields.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._bad(key, value, "a string")
        return value


def _heads_kv(meta: Meta, arch: str, heads: int) -> int:
    key = f"{arch}.attention.head_count_kv"
    value = meta.raw(key)
    if isinstance(value, np.ndarray):
        if value.size == 0 or value.dtype.kind not in "iu" or value.min() < 1:
            raise meta._bad(key, value, "positive integers")
        if len(set(value.tolist())) != 1:
            raise UnsupportedError(f"per-layer key/value head counts {sorted(set(value.tolist()))} are not supported")
        return int(value[0])
    return meta.int(key, heads)


def _rope_scaling(meta: Meta, arch: str) -> Optional[dict]:
    kind = meta.str(f"{arch}.rope.scaling.type")
    factor = meta.float(f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or factor in (None, 1.0):
        return None
    if kind not in ("linear", "yarn"):
        raise UnsupportedError(f"GGUF rope scaling type '{kind}' is not supported (linear and yarn are)")
    if factor <= 0:
        raise meta._bad(f"{arch}.rope.scaling.factor", factor, "a positive number")
    scaling = {"rope_type": kind, "type": kind, "factor": factor}
    orig = meta.int(f"{arch}.rope.scaling.original_context_length")
    if orig:
        scaling["original_max_position_embeddings"] = orig
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
    if not np.isfinite(factors).all() or factors.min() <= 0:
        raise SourceError("tensor 'rope_freqs.weight' holds zero, negative or non-finite divisors; the file is corrupt")
    factor = float(factors.max())
    if abs(factor - 1.0) < 1e-6 and np.allclose(factors, 1.0):
        return None
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    low, high, context = 1.0, 4.0, 8192.0
    mid = (factors > 1 + 1e-5) & (factors < factor * (1 - 1e-5))
    if mid.sum() >= 2 and factor > 1:
        s = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[mid], s, 1)  # s = context/(high-low)/wavelen - low/(high-low)
        if intercept < 0:
            high = low - low / intercept
            context = float(np.round(slope * (high - low)))
    # with fewer than two in-between divisors the line is underdetermined: try the usual settings too
    candidates = [(high, context)] + [(h, c) for c in (8192, 4096, 16384, 32768, 2048, 131072) for h in (4.0, 2.0, 8.0)]
    with np.errstate(all="ignore"):
        for high, context in candidates:
            high = float(np.round(high, 4))
            if high > low and context > 0 and np.allclose(
                    llama3_factors(theta, head_dim, factor, low, high, context), factors, rtol=1e-3, atol=1e-4):
                return {"rope_type": "llama3", "type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": int(context)}
    raise UnsupportedError("the rope_freqs tensor in this GGUF does not follow Llama 3 rope scaling; "
                           "mlxedge cannot reproduce its positions")


def gguf_config(meta: Meta, arch: str, tensors: Dict[str, Any], torch_dtype: str) -> dict:
    """Hugging Face style config dict from GGUF metadata (plus a few facts read off the tensor list)."""
    model_type, hf_class, default_theta = ARCHITECTURES[arch]

    def need(key: str) -> int:
        value = meta.int(f"{arch}.{key}")
        if value is None:
            raise SourceError(f"GGUF metadata lacks '{arch}.{key}'; the file is incomplete")
        return value

    hidden = need("embedding_length")
    heads = need("attention.head_count")
    head_dim = meta.int(f"{arch}.attention.key_length")
    if head_dim is None and arch == "llama":
        head_dim = meta.int("llama.rope.dimension_count")
    if head_dim is None:
        if hidden % heads:
            raise SourceError(f"{meta.path.name}: embedding length {hidden} is not a multiple of the head count "
                              f"{heads}, and the file gives no '{arch}.attention.key_length'; the file is corrupt")
        head_dim = hidden // heads
    vocab = meta.int(f"{arch}.vocab_size")
    if vocab is None:  # the embedding's rows (GGUF dims are innermost-first)
        if "token_embd.weight" not in tensors:
            raise SourceError(f"{meta.path.name} has no 'token_embd.weight' tensor and no '{arch}.vocab_size'; "
                              "the file is incomplete")
        vocab = tensors["token_embd.weight"].dims[-1]
    cfg = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": need("block_count"),
        "intermediate_size": need("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": _heads_kv(meta, arch, heads),
        "head_dim": head_dim,
        "rms_norm_eps": meta.float(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "vocab_size": vocab,
        "rope_theta": meta.float(f"{arch}.rope.freq_base", default_theta),
        "max_position_embeddings": meta.int(f"{arch}.context_length", 4096),
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": torch_dtype,
    }
    for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        value = meta.int(f"tokenizer.ggml.{key}_token_id", minimum=0)
        if value is not None:
            cfg[name] = value
    scaling = _rope_scaling(meta, arch)
    if scaling:
        cfg["rope_scaling"] = scaling
    if arch == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensors
        cfg["mlp_bias"] = "blk.0.ffn_down.bias" in tensors
        if "rope_freqs.weight" in tensors:
            factors = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64).reshape(-1)
            scaling = llama3_rope_scaling(factors, cfg["rope_theta"], head_dim)
            if scaling:
                cfg["rope_scaling"] = scaling
    if arch == "gemma3":
        cfg["sliding_window"] = meta.int("gemma3.attention.sliding_window", 512)
        apply_guesses(arch, cfg)
        if scaling:
            cfg["rope_scaling"] = {"rope_type": scaling["rope_type"], "factor": scaling["factor"]}
    if arch == "phi3":
        rot = meta.int("phi3.rope.dimension_count")
        cfg["partial_rotary_factor"] = (rot / head_dim) if rot else 1.0
        orig = meta.int("phi3.rope.scaling.original_context_length")
        cfg["original_max_position_embeddings"] = orig or cfg["max_position_embeddings"]
        window = meta.int("phi3.attention.sliding_window", minimum=0)
        if window:
            cfg["sliding_window"] = window
        if "rope_factors_long.weight" in tensors:
            long_t = tensors["rope_factors_long.weight"]
            short_t = tensors.get("rope_factors_short.weight", long_t)
            long_f, short_f = (np.asarray(t.data, dtype=np.float32).reshape(-1) for t in (long_t, short_t))
            if not (np.isfinite(long_f).all() and np.isfinite(short_f).all()):
                raise SourceError(f"{meta.path.name}: tensor 'rope_factors_long/short.weight' holds non-finite "
                                  "values; the file is corrupt")
            cfg["rope_scaling"] = {"type": "longrope", "rope_type": "longrope",
                                   "long_factor": [float(x) for x in long_f],
                                   "short_factor": [float(x) for x in short_f]}
    return cfg
