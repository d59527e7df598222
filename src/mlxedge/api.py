"""The public entry points: load a model from any source, optionally quantizing it on the way."""

from __future__ import annotations

from typing import Callable, Optional

from .loading import load_checkpoint
from .model import Model
from .quant.affine import validate_settings
from .sources import open_source


def load(source, bits: Optional[int] = None, group_size: int = 64, dtype: Optional[str] = None,
         memory_budget=None, context_length: Optional[int] = None,
         progress: Optional[Callable[[int, int], None]] = None) -> Model:
    """Load a model (directory, .gguf file, alias or hub id); bits=4|8 quantizes group-wise while loading."""
    requested = validate_settings(bits, group_size)
    checkpoint = open_source(source)
    loaded = load_checkpoint(checkpoint, requested, dtype=dtype, progress=progress)
    info = model_info(checkpoint, loaded)
    return Model(loaded, checkpoint.load_tokenizer, checkpoint.chat_template, info)


def model_info(checkpoint, loaded) -> dict:
    specs = set(loaded.quantized.values())
    bits = sorted({s.bits for s in specs})
    groups = sorted({s.group_size for s in specs})
    info = {
        "architecture": loaded.config["model_type"],
        "parameters": loaded.parameters,
        "bits": (bits[0] if len(bits) == 1 else bits) if bits else None,
        "group_size": (groups[0] if len(groups) == 1 else groups) if groups else None,
        "dtype": str(loaded.dtype).split(".")[-1],
        "bytes": loaded.nbytes,
        "source": checkpoint.source,
        "source_kind": checkpoint.kind,
        "quantized_modules": len(loaded.quantized),
        "unquantized_modules": list(loaded.unquantized),
        "context_length": loaded.config.get("max_position_embeddings"),
        **loaded.extra,
    }
    info.update(checkpoint.info)
    return info
