"""Normalise Hugging Face configs for mlx-lm's architecture classes.

transformers >= 5 nests rope_theta / rope scaling under `rope_parameters` and describes attention per
layer in `layer_types`; mlx-lm 0.32's ModelArgs read neither and silently fall back to their own
defaults (DESIGN.md). This module is the one place that translates.
"""

from __future__ import annotations

import importlib

from .errors import UnsupportedError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
ALIASES = {"gemma3": "gemma3_text"}  # text-only use of a gemma3 config
# mlx-lm's MODEL_REMAPPING for the supported types (read from mlx_lm.utils it would import transformers)
ARCHITECTURE_MODULES = {"mistral": "llama"}


def text_config(config: dict) -> dict:
    """The language model's shape: multimodal configs nest it in text_config, whose keys win."""
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def normalize_config(config: dict) -> dict:
    """A copy of `config` with the keys mlx-lm's ModelArgs expect, derived from the transformers 5 forms."""
    cfg = dict(config)
    if "text_config" in cfg and cfg.get("model_type") in ALIASES:
        cfg = {**cfg, **cfg["text_config"]}
    model_type = ALIASES.get(cfg.get("model_type"), cfg.get("model_type"))
    if model_type not in SUPPORTED:
        raise UnsupportedError(f"model_type {cfg.get('model_type')!r} is not supported; "
                               f"supported: {', '.join(SUPPORTED)}.")
    cfg["model_type"] = model_type
    rope = cfg.pop("rope_parameters", None) or {}
    if model_type == "gemma3_text" and "full_attention" in rope:
        _apply_rope(cfg, rope["full_attention"])
        local = rope.get("sliding_attention", {})
        if "rope_theta" in local:
            cfg["rope_local_base_freq"] = local["rope_theta"]
    elif rope:
        _apply_rope(cfg, rope)
    if model_type in ("gemma2", "gemma3_text"):
        layer_types = cfg.pop("layer_types", None)
        if layer_types:
            cfg["sliding_window_pattern"] = _sliding_pattern(layer_types, all_sliding=model_type == "gemma3_text")
    if model_type in ("qwen2", "qwen3"):
        cfg.pop("layer_types", None)  # mlx-lm's qwen models attend fully on every layer
    if "num_key_value_heads" not in cfg or cfg["num_key_value_heads"] is None:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    return cfg


def _apply_rope(cfg: dict, rope: dict) -> None:
    if "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    if "partial_rotary_factor" in rope:
        cfg["partial_rotary_factor"] = rope["partial_rotary_factor"]
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
        scaling.setdefault("type", rope_type)
        scaling.setdefault("rope_type", rope_type)
        cfg["rope_scaling"] = scaling


def _sliding_pattern(layer_types: list, all_sliding: bool = False) -> int:
    """The period p with layer i global iff (i + 1) % p == 0, as mlx-lm's gemma models expect.

    Layers that all slide give p = n + 1 (no layer global) where the architecture can run that
    (`all_sliding`: gemma3_text, through architecture_fixes); elsewhere they are refused.
    """
    n = len(layer_types)
    for p in range(1, n + 2):
        if all((lt == "full_attention") == ((i + 1) % p == 0) for i, lt in enumerate(layer_types)):
            if p > n and not all_sliding:
                raise UnsupportedError("a model whose layers all use sliding-window attention is not supported "
                                       "by mlx-lm's gemma2 architecture.")
            return p
    raise UnsupportedError(f"layer_types {layer_types[:8]}... do not follow a periodic sliding/global pattern; "
                           "mlx-lm's gemma architecture cannot express it.")


def model_classes(cfg: dict):
    """mlx-lm's (Model, ModelArgs) for a normalised config."""
    from .architectures import import_architecture

    from .architecture_fixes import model_class

    module = import_architecture(ARCHITECTURE_MODULES.get(cfg["model_type"], cfg["model_type"]))
    return model_class(cfg["model_type"], module), module.ModelArgs
