"""Which sampling settings chat/run and generate use when the user sets none (cli/sampling.py)."""

from __future__ import annotations

import json

from mlxedge.cli.sampling import GREEDY, SAMPLED, describe, resolve_sampling

UNSET = {"temperature": None, "top_p": None, "top_k": None, "min_p": None, "repetition_penalty": None, "seed": None}


def test_chat_samples_like_ollama_without_a_generation_config(tmp_path):
    settings = resolve_sampling(UNSET, str(tmp_path), sample=True)
    assert {k: settings[k] for k in SAMPLED} == SAMPLED
    assert SAMPLED["temperature"] == 0.8 and SAMPLED["top_k"] == 40 and SAMPLED["top_p"] == 0.9
    assert describe(settings) == "temperature 0.8, top-k 40, top-p 0.9, repetition penalty 1.1"


def test_the_models_generation_config_wins_over_the_defaults_and_flags_win_over_both(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.2, "top_p": 0.95, "top_k": 20,
                                                                 "do_sample": True, "eos_token_id": 2}))
    settings = resolve_sampling(UNSET, str(tmp_path), sample=True)
    assert (settings["temperature"], settings["top_p"], settings["top_k"]) == (0.2, 0.95, 20)
    assert settings["repetition_penalty"] == SAMPLED["repetition_penalty"]  # not in the file: the default
    explicit = dict(UNSET, temperature=0.0, seed=3)
    settings = resolve_sampling(explicit, str(tmp_path), sample=True)
    assert settings["temperature"] == 0.0 and settings["seed"] == 3 and settings["top_k"] == 20


def test_do_sample_false_means_greedy(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert resolve_sampling(UNSET, str(tmp_path), sample=True) == dict(GREEDY)


def test_generate_is_greedy_unless_asked(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6}))
    assert resolve_sampling(UNSET, str(tmp_path), sample=False) == dict(GREEDY)
    assert resolve_sampling(dict(UNSET, temperature=0.7), None, sample=False)["temperature"] == 0.7
    assert describe(dict(GREEDY)) == "greedy"


def test_a_gguf_file_or_a_broken_config_falls_back_to_the_defaults(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_sampling(UNSET, str(gguf), sample=True)["temperature"] == 0.8
    (tmp_path / "generation_config.json").write_text("{not json")
    assert resolve_sampling(UNSET, str(tmp_path), sample=True)["temperature"] == 0.8
