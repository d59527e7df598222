"""The public entry points: plan, then load a model from any source, optionally quantizing on the way."""

from __future__ import annotations

from typing import Callable, Optional

from . import memory
from .loading import load_checkpoint, resolve_dtype
from .errors import UnsupportedError
from .generate.kv_cache import validate_kv_bits
from .model import Model
from .quant.affine import validate_settings
from .sources import open_source

KV_OVERFLOW = ("error", "rotate")


def _plan_checkpoint(checkpoint, bits, group_size, dtype, memory_budget, context_length, auto_fit=False,
                     check=True, kv_bits=None) -> memory.MemoryPlan:
    kwargs = dict(bits=bits, group_size=group_size, dtype_bytes=resolve_dtype(dtype, checkpoint).size, kv_bits=kv_bits,
                  context_length=context_length or memory.default_context_length(checkpoint.config),
                  budget=memory.device_budget(memory_budget), quantized=checkpoint.quantization)
    if check:
        return memory.check_plan(checkpoint.config, checkpoint.tensor_infos, auto_fit=auto_fit, **kwargs)
    return memory.make_plan(checkpoint.config, checkpoint.tensor_infos, **kwargs)


def plan(source, bits: Optional[int] = None, group_size: int = 64, dtype: Optional[str] = None,
         context_length: Optional[int] = None, memory_budget=None, kv_bits: Optional[int] = None) -> dict:
    """The memory plan for loading `source` at these settings, from config and tensor headers alone."""
    spec = validate_settings(bits, group_size)
    kv_bits = validate_kv_bits(kv_bits)
    checkpoint = open_source(source)
    result = _plan_checkpoint(checkpoint, spec.bits if spec else None, group_size, dtype, memory_budget,
                              context_length, check=False, kv_bits=kv_bits)
    return result.to_dict()


def load(source, bits: Optional[int] = None, group_size: int = 64, dtype: Optional[str] = None,
         memory_budget=None, context_length: Optional[int] = None, auto_fit: bool = False,
         kv_overflow: str = "error", progress: Optional[Callable[[int, int], None]] = None,
         kv_bits: Optional[int] = None) -> Model:
    """Load a model (directory, .gguf file, alias or hub id); bits=4|8 quantizes group-wise while loading.

    The memory plan is checked before any weight is read: a load that would not fit the budget raises
    MemoryBudgetError naming settings that would; auto_fit=True picks the best of those instead.
    context_length bounds the KV cache; past it generation fails, or keeps a rotating window when
    kv_overflow="rotate". kv_bits=4|8 keeps the KV cache quantized (mlx-lm's QuantizedKVCache), counted so
    in the plan; it cannot be combined with a rotating window.
    """
    if kv_overflow not in KV_OVERFLOW:
        raise ValueError(f"kv_overflow must be one of {KV_OVERFLOW}")
    requested = validate_settings(bits, group_size)
    kv_bits = validate_kv_bits(kv_bits)
    if kv_bits is not None and kv_overflow == "rotate":
        raise UnsupportedError("a quantized KV cache (kv_bits) cannot also be a rotating window; "
                               "drop kv_bits or kv_overflow='rotate'.")
    checkpoint = open_source(source)
    memory_plan = _plan_checkpoint(checkpoint, requested.bits if requested else None, group_size, dtype,
                                   memory_budget, context_length, auto_fit=auto_fit, kv_bits=kv_bits)
    if auto_fit:
        requested = validate_settings(memory_plan.settings["bits"], group_size)
    loaded = load_checkpoint(checkpoint, requested, dtype=dtype, progress=progress)
    info = model_info(checkpoint, loaded)
    info["context_length"] = memory_plan.settings["context_length"]
    info["memory_plan"] = memory_plan.to_dict()
    return Model(loaded, checkpoint.load_tokenizer, checkpoint.chat_template, info,
                 context_length=memory_plan.settings["context_length"], kv_overflow=kv_overflow, kv_bits=kv_bits,
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
