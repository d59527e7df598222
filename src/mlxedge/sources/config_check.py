"""Validate a checkpoint's config once, up front, before anything is planned, built or allocated.

Every source (config.json, GGUF metadata) produces a Hugging Face style config dict; `check_checkpoint`
refuses, in one line naming the key, the value and what was expected, anything that later code would
turn into a KeyError, ZeroDivisionError, a nonsense shape or minutes of allocation: missing or
non-positive sizes, floats or booleans where integers belong, a non-dict `quantization` or
`rope_parameters`, unsupported bits or group sizes, a layer count the weights do not back.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

from ..errors import SourceError

REQUIRED_SIZES = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
OPTIONAL_SIZES = ("head_dim", "max_position_embeddings", "intermediate_size", "num_key_value_heads",
                  "sliding_window", "sliding_window_pattern")
NULLABLE = ("head_dim", "num_key_value_heads", "sliding_window", "sliding_window_pattern")  # null: "use the default"
MAX_SIZE = 2**31 - 1  # MLX shapes are int32
BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(where: str, key: str, value: Any, expected: str) -> SourceError:
    return SourceError(f"{where}: '{key}' is {_show(value)}, expected {expected}; fix or re-download the config")


def _positive(where: str, cfg: Mapping, key: str, required: bool) -> None:
    if key not in cfg or (cfg[key] is None and key in NULLABLE):
        if required:
            raise SourceError(f"{where}: required key '{key}' is missing (expected a positive integer); "
                              "fix or re-download the config")
        return
    value = cfg[key]
    if not _is_int(value) or not 1 <= value <= MAX_SIZE:
        raise _bad(where, key, value, f"an integer from 1 to {MAX_SIZE}")


def _check_quantization(where: str, key: str, q: Any) -> None:
    if not isinstance(q, dict):
        raise _bad(where, key, q, "an object with 'bits' and 'group_size'")
    if "bits" not in q:  # another method (gptq, awq, ...): refused with its name by the HF source
        return
    for k, v in q.items():
        if k in ("bits", "group_size"):
            continue
        if isinstance(v, dict) and ("bits" in v or "group_size" in v):
            _check_spec(where, f"{key}.{k}", v)
        elif v is not False and isinstance(v, dict):
            raise _bad(where, f"{key}.{k}", v, "false or an object with 'bits' and 'group_size'")
    _check_spec(where, key, q)


def _check_spec(where: str, key: str, spec: dict) -> None:
    bits, group = spec.get("bits"), spec.get("group_size")
    if not _is_int(bits) or bits not in BITS:
        raise _bad(where, f"{key}.bits", bits, f"one of {', '.join(map(str, BITS))}")
    if not _is_int(group) or group not in GROUP_SIZES:
        raise _bad(where, f"{key}.group_size", group, f"one of {', '.join(map(str, GROUP_SIZES))}")


def _token_ids(where: str, cfg: Mapping, key: str) -> None:
    value = cfg.get(key)
    if value is None:
        return
    values = value if isinstance(value, list) else [value]
    if not all(_is_int(v) and v >= 0 for v in values):
        raise _bad(where, key, value, "a token id (a non-negative integer) or a list of them")


def check_config(config: Any, where: str) -> None:
    """Raise a one-line SourceError naming the first key of `config` that later code could not use."""
    if not isinstance(config, dict):
        raise SourceError(f"{where} holds {type(config).__name__} JSON, expected an object of model settings; "
                          "fix or re-download the config")
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise _bad(where, "model_type", model_type, "a string such as 'llama'")
    cfg = config
    text = config.get("text_config")
    if text is not None:
        if not isinstance(text, dict):
            raise _bad(where, "text_config", text, "an object")
        cfg = {**config, **text}  # what configs.normalize_config hands the architecture
    for key in REQUIRED_SIZES:
        _positive(where, cfg, key, required=True)
    for key in OPTIONAL_SIZES:
        _positive(where, cfg, key, required=False)
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if heads % kv_heads:
        raise _bad(where, "num_key_value_heads", kv_heads, f"a divisor of num_attention_heads ({heads})")
    if cfg.get("head_dim") is None and cfg["hidden_size"] % heads:
        raise _bad(where, "hidden_size", cfg["hidden_size"],
                   f"a multiple of num_attention_heads ({heads}) when 'head_dim' is not given")
    for key in ("rope_parameters", "rope_scaling"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise _bad(where, key, cfg[key], "an object")
    for key in ("rope_theta", "rms_norm_eps", "partial_rotary_factor"):
        value = cfg.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not math.isfinite(value) or value <= 0):
            raise _bad(where, key, value, "a positive number")
    layer_types = cfg.get("layer_types")
    if layer_types is not None and (not isinstance(layer_types, list) or len(layer_types) != cfg["num_hidden_layers"]
                                    or not all(isinstance(t, str) for t in layer_types)):
        raise _bad(where, "layer_types", layer_types,
                   f"a list of {cfg['num_hidden_layers']} strings (one per layer)")
    for key in ("quantization", "quantization_config"):
        if config.get(key) is not None:
            _check_quantization(where, key, config[key])
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        _token_ids(where, cfg, key)


def check_layers(config: dict, tensor_infos: Mapping, where: str) -> None:
    """Refuse a layer count the weights do not back (e.g. 10^9), before any plan or allocation."""
    cfg = {**config, **config["text_config"]} if isinstance(config.get("text_config"), dict) else config
    layers = cfg["num_hidden_layers"]
    held = {int(m.group(1)) for name in tensor_infos if (m := _LAYER.search(name))}
    if held and layers > max(held) + 1:
        raise SourceError(f"{where}: 'num_hidden_layers' is {layers} but the weights hold layers 0-{max(held)} only "
                          f"(model.layers.{max(held) + 1} is missing); the checkpoint is incomplete or its config is "
                          "wrong")
