"""Which sampling settings a command uses when the user sets none: the model's, else Ollama's habits.

- `chat` and `run` sample, as Ollama and llama-cli do: the model's own recommendation from
  `generation_config.json` (temperature, top_k, top_p, repetition_penalty; do_sample=false means
  greedy) where the checkpoint has one, else Ollama's defaults (temperature 0.8, top-k 40, top-p 0.9)
  with a mild repetition penalty (1.1, llama.cpp's value).
- `generate` is greedy (temperature 0) unless asked: it is the scripting command, and the same prompt
  should give the same text every time (see the README).
Flags the user gives always win, one by one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

SAMPLED = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "repetition_penalty": 1.1}
GREEDY = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0}
_FROM_GENERATION_CONFIG = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")

DEFAULTS_HELP = ("Unset sampling flags: chat and run use the model's generation_config.json, else "
                 "temperature 0.8, top-k 40, top-p 0.9, repetition penalty 1.1; generate is greedy.")


def model_recommendation(source: Optional[str]) -> dict:
    """The sampling settings a checkpoint directory recommends in generation_config.json ({} if none)."""
    if not source:
        return {}
    path = Path(source).expanduser()
    config_file = path / "generation_config.json" if path.is_dir() else None
    if config_file is None or not config_file.is_file():
        return {}
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if config.get("do_sample") is False:
        return dict(GREEDY)
    out = {}
    for name in _FROM_GENERATION_CONFIG:
        value = config.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = int(value) if name == "top_k" else float(value)
    return out


def resolve_sampling(explicit: dict, source: Optional[str], sample: bool) -> dict:
    """Model.stream keywords: explicit flags over the model's recommendation (when sampling) over the defaults."""
    settings = dict(SAMPLED, **model_recommendation(source)) if sample else dict(GREEDY)
    settings.update({k: v for k, v in explicit.items() if v is not None})
    return settings


def describe(settings: dict) -> str:
    """E.g. "temperature 0.8, top-k 40, top-p 0.9, repetition penalty 1.1" or "greedy"."""
    if not settings.get("temperature"):
        text = "greedy"
    else:
        text = f"temperature {settings['temperature']:g}"
        if settings.get("top_k"):
            text += f", top-k {settings['top_k']}"
        if settings.get("top_p", 1.0) < 1.0:
            text += f", top-p {settings['top_p']:g}"
        if settings.get("min_p"):
            text += f", min-p {settings['min_p']:g}"
    if settings.get("repetition_penalty", 1.0) != 1.0:
        text += f", repetition penalty {settings['repetition_penalty']:g}"
    return text
