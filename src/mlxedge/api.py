"""The public entry points: plan, then load a model from any source, optionally quantizing on the way."""

from __future__ import annotations

from typing import Callable, Optional

from . import memory
from .adapters import read_adapter
from .loading import load_checkpoint, resolve_dtype
from .model import Model
from .quant.affine import validate_settings
from .sources import open_source

KV_OVERFLOW = ("error", "rotate")


def _plan_checkpoint(checkpoint, bits, group_size, dtype, memory_budget, context_length, auto_fit=False,
                     check=True) -> memory.MemoryPlan:
    kwargs = dict(bits=bits, group_size=group_size, dtype_bytes=resolve_dtype(dtype, checkpoint).size,
                  context_length=context_length or memory.default_context_length(checkpoint.config),
                  budget=memory.device_budget(memory_budget), quantized=checkpoint.quantization)
    if check:
        return memory.check_plan(checkpoint.config, checkpoint.tensor_infos, auto_fit=auto_fit, **kwargs)
    return memory.make_plan(checkpoint.config, checkpoint.tensor_infos, **kwargs)


def plan(source, bits: Optional[int] = None, group_size: int = 64, dtype: Optional[str] = None,
         context_length: Optional[int] = None, memory_budget=None) -> dict:
    """The memory plan for loading `source` at these settings, from config and tensor headers alone."""
    spec = validate_settings(bits, group_size)
    checkpoint = open_source(source)
    result = _plan_checkpoint(checkpoint, spec.bits if spec else None, group_size, dtype, memory_budget,
                              context_length, check=False)
    return result.to_dict()


def load(source, bits: Optional[int] = None, group_size: int = 64, dtype: Optional[str] = None,
         memory_budget=None, context_length: Optional[int] = None, auto_fit: bool = False,
         kv_overflow: str = "error", progress: Optional[Callable[[int, int], None]] = None,
         adapter=None) -> Model:
    """Load a model (directory, .gguf file, alias or hub id); bits=4|8 quantizes group-wise while loading.

    The memory plan is checked before any weight is read: a load that would not fit the budget raises
    MemoryBudgetError naming settings that would; auto_fit=True picks the best of those instead.
    context_length bounds the KV cache; past it generation fails, or keeps a rotating window when
    kv_overflow="rotate". adapter: an mlx-lm or PEFT LoRA/DoRA adapter directory, applied unfused.
    """
    if kv_overflow not in KV_OVERFLOW:
        raise ValueError(f"kv_overflow must be one of {KV_OVERFLOW}")
    requested = validate_settings(bits, group_size)
    lora = read_adapter(adapter) if adapter is not None else None
    checkpoint = open_source(source)
    memory_plan = _plan_checkpoint(checkpoint, requested.bits if requested else None, group_size, dtype,
                                   memory_budget, context_length, auto_fit=auto_fit)
    if auto_fit:
        requested = validate_settings(memory_plan.settings["bits"], group_size)
    loaded = load_checkpoint(checkpoint, requested, dtype=dtype, progress=progress, adapter=lora)
    info = model_info(checkpoint, loaded)
    info["context_length"] = memory_plan.settings["context_length"]
    info["memory_plan"] = memory_plan.to_dict()
    return Model(loaded, checkpoint.load_tokenizer, checkpoint.chat_template, info,
                 context_length=memory_plan.settings["context_length"], kv_overflow=kv_overflow,
                 wired_bytes=memory_plan.weight_bytes + memory_plan.kv_cache_bytes + memory_plan.activation_bytes)


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
        **loaded.extra,
    }
    info.update(checkpoint.info)
    return info
