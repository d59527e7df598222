"""A quantized mlx-lm checkpoint seen as a float one: every (weight, scales, biases) triplet dequantized to
float32 with MLX's own `mx.dequantize` (the definition of the format, so the values are the file's exactly).

GGUF files do the same in their own reader (`open_gguf(..., dequantize=True)`, with gguf's dequantizer),
since several GGML block types have no MLX affine form at all.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx

from .checkpoint import Checkpoint, TensorInfo

PARTS = ("weight", "scales", "biases")


def _spec(quantization: dict, path: str) -> tuple:
    override = quantization.get(path)
    chosen = override if isinstance(override, dict) else quantization
    return int(chosen["bits"]), int(chosen["group_size"])


def dequantized_checkpoint(checkpoint: Checkpoint) -> Checkpoint:
    """`checkpoint` with its quantized modules as float32 weights; a float checkpoint is returned unchanged."""
    q = checkpoint.quantization
    if not q:
        return checkpoint
    quantized = {name.rpartition(".")[0] for name in checkpoint.tensor_infos if name.endswith(".scales")}
    infos = {}
    for name, info in checkpoint.tensor_infos.items():
        path, _, part = name.rpartition(".")
        if path not in quantized or part not in PARTS:
            infos[name] = info
        elif part == "weight":
            bits, _ = _spec(q, path)
            rows, words = info.shape
            cols = words * 32 // bits
            infos[name] = TensorInfo((rows, cols), "float32", rows * cols * 4)

    def iter_tensors():
        pending: dict = {}
        for name, array in checkpoint.iter_tensors():
            path, _, part = name.rpartition(".")
            if path not in quantized or part not in PARTS:
                yield name, array
                continue
            pending.setdefault(path, {})[part] = array
            if len(pending[path]) < 3:
                continue
            parts = pending.pop(path)
            bits, group_size = _spec(q, path)
            dense = mx.dequantize(parts["weight"], parts["scales"].astype(mx.float32),
                                  parts["biases"].astype(mx.float32), group_size=group_size, bits=bits)
            yield f"{path}.weight", dense

    config = dict(checkpoint.config, torch_dtype="float32")
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    return replace(checkpoint, kind="hf", config=config, tensor_infos=infos, iter_tensors=iter_tensors,
                   quantization=None, info=dict(checkpoint.info, dequantized=True))
