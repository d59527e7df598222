"""Local Hugging Face checkpoint directories (config.json + model*.safetensors), float or mlx-lm quantized.

mlx-lm's `convert` writes the same layout with a "quantization" entry in config.json, so both are one
source here: the Checkpoint says which modules are already quantized.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from ..errors import SourceError
from .checkpoint import Checkpoint
from .safetensors_header import read_header


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SourceError(f"cannot parse {path}: {e}") from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: from the shard index when present, else model*.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map", {})
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise SourceError(f"{path}: shard(s) {', '.join(missing)} listed in model.safetensors.index.json "
                              "are missing; download the complete checkpoint.")
        return files
    files = sorted(path.glob("model*.safetensors")) or sorted(path.glob("*.safetensors"))
    if not files:
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise SourceError(f"{path} has only PyTorch .bin weights; mlxedge reads safetensors "
                              "(re-save with transformers' save_pretrained(..., safe_serialization=True)).")
        raise SourceError(f"{path} has no model*.safetensors weight files; download the complete checkpoint.")
    return files


def read_chat_template(path: Path) -> str | None:
    """The chat template a directory carries: chat_template.jinja (transformers 5) or tokenizer_config.json."""
    jinja = path / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    tokenizer_config = path / "tokenizer_config.json"
    if tokenizer_config.exists():
        template = _read_json(tokenizer_config).get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template
    return None


def load_tokenizer_from_dir(path: Path):
    """A transformers tokenizer for the directory, or a SourceError if it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many kinds here
        raise SourceError(f"{path}: no usable tokenizer ({type(e).__name__}: {e}); "
                          "add tokenizer.json / tokenizer_config.json to the checkpoint.") from None


def _eos_ids(config: dict, path: Path) -> list:
    """EOS ids from config.json and generation_config.json (Llama 3 lists its end-of-turn id only there)."""
    ids = []
    sources = [config.get("eos_token_id")]
    generation_config = path / "generation_config.json"
    if generation_config.exists():
        sources.append(_read_json(generation_config).get("eos_token_id"))
    for value in sources:
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    return ids


def open_hf_dir(path: Path, source: str) -> Checkpoint:
    """Open a checkpoint directory: read config and tensor headers, nothing else."""
    config_path = path / "config.json"
    if not config_path.exists():
        raise SourceError(f"{path} has no config.json: not a Hugging Face checkpoint directory "
                          "(expected config.json, model*.safetensors and tokenizer files).")
    config = _read_json(config_path)
    if "model_type" not in config:
        raise SourceError(f"{config_path} has no model_type; is this a transformers model config?")
    config["eos_token_id"] = _eos_ids(config, path)
    files = weight_files(path)
    tensor_infos = {}
    for file in files:
        tensor_infos.update(read_header(file))

    def iter_tensors():
        for file in files:
            arrays = mx.load(str(file))  # lazy: each tensor is read when evaluated
            for name in list(arrays):
                yield name, arrays.pop(name)

    quantization = config.get("quantization") or config.get("quantization_config")
    if quantization is not None and "bits" not in quantization:
        raise SourceError(f"{path}: quantization method {quantization.get('quant_method', '?')!r} is not "
                          "supported; use a float checkpoint or one written by mlx-lm / mlxedge convert.")
    return Checkpoint(
        source=source,
        kind="mlx" if quantization else "hf",
        path=path,
        config=config,
        tensor_infos=tensor_infos,
        iter_tensors=iter_tensors,
        load_tokenizer=lambda: load_tokenizer_from_dir(path),
        quantization=quantization,
        chat_template=read_chat_template(path),
    )
