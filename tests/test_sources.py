"""Checkpoint directories: sharded weights, headers-only opening, EOS ids and chat templates."""

import json

import numpy as np
import torch
import transformers as T

import mlxedge
from mlxedge.sources import open_source
from tiny_models import build_tiny

IDS = [1, 2, 3, 50, 100, 200]


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    single = build_tiny("qwen2", tmp_path / "single")
    model = T.AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    a = mlxedge.load(single, dtype="float32").logits(IDS)
    b = mlxedge.load(tmp_path / "sharded", dtype="float32").logits(IDS)
    assert np.array_equal(a, b)


def test_missing_shard_is_named(tmp_path):
    single = build_tiny("llama", tmp_path / "single")
    T.AutoModelForCausalLM.from_pretrained(single).save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    victim = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    victim.unlink()
    try:
        mlxedge.load(tmp_path / "sharded")
    except mlxedge.SourceError as e:
        assert victim.name in str(e)
    else:
        raise AssertionError("a missing shard was not reported")


def test_open_reads_headers_only(tmp_path):
    path = build_tiny("llama", tmp_path / "m")
    checkpoint = open_source(path)
    info = checkpoint.tensor_infos["model.layers.0.mlp.up_proj.weight"]
    assert info.shape == (128, 64) and info.dtype == "float32" and info.nbytes == 128 * 64 * 4
    assert checkpoint.kind == "hf" and checkpoint.quantization is None


def test_eos_ids_include_generation_config(tmp_path):
    path = build_tiny("llama", tmp_path / "m")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert open_source(path).config["eos_token_id"] == [2, 7]


def test_chat_template_from_tokenizer_config(tmp_path):
    path = build_tiny("llama", tmp_path / "m")
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    assert open_source(path).chat_template == "{{ messages[0]['content'] }}"
