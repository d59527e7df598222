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
from .config_check import check_config
from .safetensors_header import read_header
from .tokenizers import load_tokenizer


def read_text(path: Path) -> str:
    """A text file of the checkpoint as UTF-8, or a one-line SourceError naming the file and the bad byte."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path} is not valid UTF-8 (byte {e.start}: {e.object[e.start:e.start + 4]!r}); "
                          "fix or re-download the file") from None
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}") from None


def _read_json(path: Path, expect=dict):
    """A JSON file of the checkpoint; an object unless `expect` says otherwise (None: anything)."""
    try:
        value = json.loads(read_text(path))
    except (json.JSONDecodeError, RecursionError) as e:
        raise SourceError(f"cannot parse {path}: {str(e)[:120]}") from None
    if expect is not None and not isinstance(value, expect):
        raise SourceError(f"{path} holds {type(value).__name__} JSON, expected an object; fix or re-download it")
    return value


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: from the shard index when present, else model*.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise SourceError(f"{index}: 'weight_map' is not an object of tensor name -> file name; "
                              "fix or re-download it")
        files = sorted({_inside(path, name, index) for name in weight_map.values()})
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


def _inside(path: Path, name: str, index: Path) -> Path:
    """`path / name`, refusing a name that leaves the model directory (absolute, `..`, or a symlink out of it).

    A hub snapshot (`<repo>/snapshots/<rev>/`) links its files to `<repo>/blobs/`; that is inside too.
    """
    target = path / name
    roots = [path.resolve()]
    if path.parent.name == "snapshots":
        roots.append((path.parent.parent / "blobs").resolve())
    resolved = target.resolve()
    if Path(name).is_absolute() or ".." in Path(name).parts or not any(resolved.is_relative_to(r) for r in roots):
        raise SourceError(f"{index} names weight file {name[:100]!r}, which lies outside {path}; "
                          "mlxedge reads only files inside the model directory")
    return target


def read_chat_template(path: Path) -> str | None:
    """The chat template a directory carries: chat_template.jinja (transformers 5) or tokenizer_config.json."""
    jinja = path / "chat_template.jinja"
    if jinja.exists():
        return read_text(jinja)
    tokenizer_config = path / "tokenizer_config.json"
    if tokenizer_config.exists():
        template = _read_json(tokenizer_config).get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        if template is not None and not isinstance(template, str):
            raise SourceError(f"{tokenizer_config}: 'chat_template' is not a string; fix or re-download it")
        return template
    return None


def _eos_ids(config: dict, path: Path) -> list:
    """EOS ids from config.json and generation_config.json (Llama 3 lists its end-of-turn id only there)."""
    ids = []
    sources = [config.get("eos_token_id")]
    generation_config = path / "generation_config.json"
    if generation_config.exists():
        extra = _read_json(generation_config).get("eos_token_id")
        check_config({**config, "eos_token_id": extra}, str(generation_config))
        sources.append(extra)
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
    check_config(config, str(config_path))
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
        load_tokenizer=lambda: load_tokenizer(path),
        quantization=quantization,
        chat_template=read_chat_template(path),
    )
