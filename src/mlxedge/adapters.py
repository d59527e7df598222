"""LoRA and DoRA adapters: read mlx-lm and PEFT adapter directories, attach them to a loaded model, or fuse.

Two on-disk formats, one in-memory form (`Adapter`: module path -> `LowRank` update):
- mlx-lm: `adapter_config.json` (`fine_tune_type` lora|dora, `lora_parameters.scale` — an absolute scale)
  and `adapters.safetensors` with `<module>.lora_a` [in, r], `<module>.lora_b` [r, out], DoRA's `<module>.m`.
- PEFT: `adapter_config.json` (`r`, `lora_alpha`, `use_rslora`, `use_dora`, `rank_pattern`, `alpha_pattern`)
  and `adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` [r, in],
  `lora_B.weight` [out, r] and DoRA's `lora_magnitude_vector` [out]; its scale is alpha/r (alpha/sqrt(r)
  with rsLoRA). Pickled `adapter_model.bin` files are refused: loading them runs code.

Forward (the same expressions as mlx-lm's LoRALinear/DoRALinear, so float32 logits match it exactly):
  lora: y = base(x) + scale · (x A) B
  dora: y = m / ‖W + scale·(A B)ᵀ‖_row · (x Wᵀ + scale · (x A) B) + bias
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .errors import SourceError

MLX_LM_FILE = "adapters.safetensors"
PEFT_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class LowRank:
    """One module's update: lora_a [in, r], lora_b [r, out], an absolute scale, DoRA's magnitude m [out]."""

    lora_a: mx.array
    lora_b: mx.array
    scale: float
    magnitude: Optional[mx.array] = None

    @property
    def rank(self) -> int:
        return self.lora_a.shape[1]


@dataclass
class Adapter:
    path: str
    format: str  # "mlx-lm" or "peft"
    kind: str  # "lora" or "dora"
    modules: dict  # module path -> LowRank

    def describe(self) -> dict:
        ranks = sorted({u.rank for u in self.modules.values()})
        return {"path": self.path, "format": self.format, "type": self.kind, "modules": len(self.modules),
                "rank": ranks[0] if len(ranks) == 1 else ranks}


def read_adapter(directory) -> Adapter:
    """Read an mlx-lm or PEFT adapter directory; one-line SourceError for anything that is not one."""
    directory = Path(directory).expanduser()
    config_path = directory / "adapter_config.json"
    if not directory.is_dir() or not config_path.is_file():
        raise SourceError(f"{directory} is not an adapter directory: it has no adapter_config.json "
                          "(expected an mlx-lm or PEFT LoRA adapter).")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise SourceError(f"{config_path} must hold a JSON object.")
    if (directory / MLX_LM_FILE).is_file():
        return _read_mlx_lm(directory, config)
    if (directory / PEFT_FILE).is_file():
        return _read_peft(directory, config)
    if (directory / "adapter_model.bin").exists():
        raise SourceError(f"{directory} holds a pickled adapter_model.bin, which mlxedge never loads (unpickling "
                          "runs code); save the adapter with safetensors (PEFT: safe_serialization=True).")
    raise SourceError(f"{directory} has adapter_config.json but neither {MLX_LM_FILE} (mlx-lm) nor "
                      f"{PEFT_FILE} (PEFT).")


def _load_tensors(path: Path) -> dict:
    try:
        return mx.load(str(path))
    except Exception as e:  # MLX reports a bad file as RuntimeError/ValueError
        raise SourceError(f"cannot read {path}: {e}") from None


def _read_mlx_lm(directory: Path, config: dict) -> Adapter:
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise SourceError(f"{directory}: fine_tune_type {kind!r} is not an adapter (expected lora or dora); "
                          "full fine-tunes are whole models — load them as a model directory.")
    params = config.get("lora_parameters")
    if not isinstance(params, dict) or not isinstance(params.get("scale"), (int, float)):
        raise SourceError(f"{directory}/adapter_config.json needs lora_parameters.scale (mlx-lm's absolute scale).")
    scale = float(params["scale"])
    grouped: dict = {}
    for name, array in _load_tensors(directory / MLX_LM_FILE).items():
        module, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b", "m"):
            raise SourceError(f"{directory}/{MLX_LM_FILE}: tensor {name!r} is not a LoRA parameter "
                              "(expected <module>.lora_a, .lora_b or .m).")
        grouped.setdefault(module, {})[leaf] = array
    modules = {}
    for module, parts in grouped.items():
        _require(directory, module, parts, ("lora_a", "lora_b") + (("m",) if kind == "dora" else ()))
        modules[module] = LowRank(parts["lora_a"], parts["lora_b"], scale, parts.get("m"))
    return Adapter(str(directory), "mlx-lm", kind, _checked_shapes(directory, modules))


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern: a key matches the module path by regex at its end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _read_peft(directory: Path, config: dict) -> Adapter:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise SourceError(f"{directory}: PEFT type {peft_type} is not supported (only LORA, with or without DoRA).")
    if config.get("fan_in_fan_out"):
        raise SourceError(f"{directory}: fan_in_fan_out adapters (GPT-2 style Conv1D) are not supported.")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise SourceError(f"{directory}: the adapter trains biases or whole modules (bias/modules_to_save); "
                          "only low-rank updates are supported.")
    alpha_default = config.get("lora_alpha", config.get("r", 8))
    rslora = bool(config.get("use_rslora"))
    kind = "dora" if config.get("use_dora") else "lora"
    grouped: dict = {}
    for name, array in _load_tensors(directory / PEFT_FILE).items():
        stem = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        match = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)", stem)
        if match is None:
            raise SourceError(f"{directory}/{PEFT_FILE}: tensor {name!r} is not a LoRA parameter.")
        module, leaf = match.groups()
        leaf = {"lora_A.weight": "A", "lora_B.weight": "B"}.get(leaf, "m")
        grouped.setdefault(module, {})[leaf] = array
    modules = {}
    for module, parts in grouped.items():
        _require(directory, module, parts, ("A", "B") + (("m",) if kind == "dora" else ()))
        rank = parts["A"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern"), module, alpha_default)
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        modules[module] = LowRank(parts["A"].T, parts["B"].T, float(scale), parts.get("m"))
    return Adapter(str(directory), "peft", kind, _checked_shapes(directory, modules))


def _require(directory: Path, module: str, parts: dict, needed: tuple) -> None:
    missing = [p for p in needed if p not in parts]
    if missing:
        raise SourceError(f"adapter {directory}: module {module} lacks {', '.join(missing)}.")


def _checked_shapes(directory: Path, modules: dict) -> dict:
    if not modules:
        raise SourceError(f"adapter {directory} holds no LoRA tensors.")
    for module, u in modules.items():
        if u.lora_a.ndim != 2 or u.lora_b.ndim != 2 or u.lora_a.shape[1] != u.lora_b.shape[0]:
            raise SourceError(f"adapter {directory}: module {module} has A {tuple(u.lora_a.shape)} and B "
                              f"{tuple(u.lora_b.shape)}, which are not a rank-r pair.")
        if u.magnitude is not None and u.magnitude.shape != (u.lora_b.shape[1],):
            raise SourceError(f"adapter {directory}: module {module}'s DoRA magnitude has shape "
                              f"{tuple(u.magnitude.shape)}, expected ({u.lora_b.shape[1]},).")
    return modules


def _dense_weight(linear: nn.Module) -> mx.array:
    if "scales" in linear:
        return mx.dequantize(linear["weight"], linear["scales"], linear.get("biases"),
                             group_size=linear.group_size, bits=linear.bits)
    return linear["weight"]


def _dims(linear: nn.Module) -> tuple:
    """(in, out) of a float or quantized linear layer."""
    out_dims, width = linear["weight"].shape
    return (width * 32 // linear.bits if "scales" in linear else width), out_dims


class LoRALinear(nn.Module):
    """A linear layer (float or quantized) plus a low-rank update; DoRA when `magnitude` is given."""

    def __init__(self, linear: nn.Module, update: LowRank, dtype):
        super().__init__()
        self.linear = linear
        self.lora_a = update.lora_a.astype(dtype)
        self.lora_b = update.lora_b.astype(dtype)
        self.scale = update.scale
        self.dora = update.magnitude is not None
        if self.dora:
            w = _dense_weight(linear)
            adapted = w + (self.scale * self.lora_b.T) @ self.lora_a.T
            self.norm_scale = update.magnitude.astype(dtype) / mx.linalg.norm(adapted, axis=1)
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        z = (x @ self["lora_a"]) @ self["lora_b"]
        if not self.dora:
            return self.linear(x) + (self.scale * z).astype(x.dtype)
        out = x @ _dense_weight(self.linear).T + (self.scale * z).astype(x.dtype)
        out = self["norm_scale"].astype(x.dtype) * out
        if "bias" in self.linear:
            out = out + self.linear["bias"]
        return out



def attach_adapter(model: nn.Module, adapter: Adapter, dtype) -> None:
    """Wrap every module the adapter names; a module it names that the model lacks, or a shape that does
    not fit, is a one-line SourceError naming the module."""
    modules = dict(model.named_modules())
    replacements = []
    for path, update in adapter.modules.items():
        linear = modules.get(path)
        if linear is None:
            raise SourceError(f"adapter {adapter.path} names module {path}, which this model does not have; "
                              "the adapter was trained for another architecture.")
        if not isinstance(linear, nn.Module) or "weight" not in linear or linear["weight"].ndim != 2 \
                or isinstance(linear, (nn.Embedding, nn.QuantizedEmbedding)):
            raise SourceError(f"adapter {adapter.path}: module {path} is a {type(linear).__name__}, not a "
                              "linear layer an adapter can attach to.")
        _check_fit(adapter, path, *_dims(linear), update)
        replacements.append((path, LoRALinear(linear, update, dtype)))
    model.update_modules(tree_unflatten(replacements))
    mx.eval(model.parameters())


def _merged(weight: mx.array, update: LowRank) -> mx.array:
    """W + scale·(AB)ᵀ in float32, rescaled row-wise to DoRA's magnitude when it has one."""
    w = weight.astype(mx.float32)
    w = w + (update.scale * update.lora_b.T.astype(mx.float32)) @ update.lora_a.T.astype(mx.float32)
    if update.magnitude is not None:
        w = (update.magnitude.astype(mx.float32) / mx.linalg.norm(w, axis=1))[:, None] * w
    return w


def fused_checkpoint(checkpoint, adapter: Adapter):
    """The checkpoint with the adapter merged into its weights, before any quantization while loading.

    Float weights are merged in float32 and cast back to their stored dtype; a module the source stores
    quantized is dequantized, merged and re-quantized at its stored bits and group size (as mlx-lm's fuse
    does). Every module the adapter names must be a 2-D weight of the checkpoint with fitting shapes.
    """
    from dataclasses import replace

    for path, update in adapter.modules.items():
        info = checkpoint.tensor_infos.get(f"{path}.weight")
        if info is None or len(info.shape) != 2:
            raise SourceError(f"adapter {adapter.path} names module {path}, which {checkpoint.source} does not "
                              "have as a linear weight; the adapter was trained for another architecture.")
    quantized = checkpoint.quantization or {}
    default_spec = (quantized.get("bits"), quantized.get("group_size"))

    def spec_of(path):
        override = quantized.get(path)
        return (override["bits"], override["group_size"]) if isinstance(override, dict) else default_spec

    def iter_tensors():
        pending: dict = {}
        for name, array in checkpoint.iter_tensors():
            path, _, part = name.rpartition(".")
            update = adapter.modules.get(path)
            if update is None or part not in ("weight", "scales", "biases"):
                yield name, array
                continue
            if f"{path}.scales" not in checkpoint.tensor_infos:  # float weight
                _check_fit(adapter, path, array.shape[1], array.shape[0], update)
                yield name, _merged(array, update).astype(array.dtype)
                continue
            parts = pending.setdefault(path, {})
            parts[part] = array
            if len(parts) < 3:
                continue
            del pending[path]
            bits, group_size = spec_of(path)
            dense = mx.dequantize(parts["weight"], parts["scales"], parts["biases"], group_size=group_size,
                                  bits=bits)
            _check_fit(adapter, path, dense.shape[1], dense.shape[0], update)
            q, scales, biases = mx.quantize(_merged(dense, update), group_size=group_size, bits=bits)
            dtype = parts["scales"].dtype
            yield f"{path}.weight", q
            yield f"{path}.scales", scales.astype(dtype)
            yield f"{path}.biases", biases.astype(dtype)

    return replace(checkpoint, iter_tensors=iter_tensors,
                   info={**checkpoint.info, "adapter": {**adapter.describe(), "fused": True}})


def _check_fit(adapter: Adapter, path: str, in_dims: int, out_dims: int, update: LowRank) -> None:
    if update.lora_a.shape[0] != in_dims or update.lora_b.shape[1] != out_dims:
        raise SourceError(f"adapter {adapter.path}: module {path} is {in_dims}->{out_dims} but the adapter's "
                          f"update is {update.lora_a.shape[0]}->{update.lora_b.shape[1]} (rank {update.rank}); "
                          "it was trained for another model size.")
