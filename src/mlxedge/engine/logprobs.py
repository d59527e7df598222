"""Log-probabilities of generated tokens, OpenAI-style: each token's logprob, bytes and the most likely
alternatives, under the model's raw distribution (one full forward pass in float64)."""

from __future__ import annotations

import math
from typing import List

import numpy as np


def token_logprobs(model, prompt_ids: List[int], tokens: List[int], top: int) -> List[dict]:
    """Log-probabilities of generated tokens under the model's raw distribution (one full forward pass).

    Each entry: token (its text), token_id, logprob, bytes, top_logprobs (the `top` most likely ids).
    """
    if not tokens:
        return []
    logits = model.logits(list(prompt_ids) + list(tokens)).astype(np.float64)
    rows = logits[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(tokens)]
    peak = rows.max(axis=-1, keepdims=True)
    logp = rows - (peak + np.log(np.exp(rows - peak).sum(axis=-1, keepdims=True)))
    decode = model.tokenizer.decode
    out = []
    for i, token in enumerate(tokens):
        entry = _entry(decode, int(token), float(logp[i, token]))
        if top:
            best = np.argsort(-logp[i])[:top]
            entry["top_logprobs"] = [_entry(decode, int(t), float(logp[i, t])) for t in best]
        out.append(entry)
    return out


def _entry(decode, token: int, logprob: float) -> dict:
    text = decode([token])
    return {"token": text, "token_id": token, "logprob": logprob if math.isfinite(logprob) else -9999.0,
            "bytes": list(text.encode("utf-8"))}
