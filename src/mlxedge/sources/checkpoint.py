"""The one shape every weight source returns: a config, tensor headers, a lazy tensor stream, a tokenizer.

Sources (hf.py, mlx.py, gguf.py) produce a `Checkpoint`; only loading.py consumes it. Nothing here
touches model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Tuple

import mlx.core as mx


@dataclass(frozen=True)
class TensorInfo:
    """What a tensor header says, without reading the data: shape, dtype name (numpy-style) and bytes."""

    shape: Tuple[int, ...]
    dtype: str
    nbytes: int


@dataclass
class Checkpoint:
    """A model source opened but not read.

    config:        Hugging Face style config dict (as in config.json; not yet normalised for mlx-lm).
    tensor_infos:  name -> TensorInfo for every tensor `iter_tensors` will yield (headers only).
    iter_tensors:  returns an iterator of (name, mx.array) with Hugging Face / mlx-lm names; arrays are
                   lazy or produced one at a time, so the caller controls peak memory.
    quantization:  None for float checkpoints; otherwise mlx-lm's config format: {"group_size": g,
                   "bits": b, "<module path>": {"group_size": g, "bits": b} | False, ...}. Quantized
                   modules come as "<path>.weight" (uint32), "<path>.scales", "<path>.biases".
    load_tokenizer: returns a transformers tokenizer (called only when generation needs it).
    chat_template: Jinja chat template string, when the source has one.
    info:          extra facts for `Model.info` (e.g. GGUF per-block-type mapping statistics).
    """

    source: str
    kind: str  # "hf", "mlx" or "gguf"
    path: Path
    config: dict
    tensor_infos: dict
    iter_tensors: Callable[[], Iterator[Tuple[str, mx.array]]]
    load_tokenizer: Callable[[], Any]
    quantization: Optional[dict] = None
    chat_template: Optional[str] = None
    info: dict = field(default_factory=dict)
