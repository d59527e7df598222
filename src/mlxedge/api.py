"""The public entry points: plan, then load a model from any source, optionally quantizing on the way."""

from __future__ import annotations

from typing import Callable, Optional

from .adapters import read_adapter
from .loading import load_checkpoint, quantization_targets, resolve_dtype
from .memory.budget import device_budget
from .memory.fit import check_plan
from .memory.plan import MemoryPlan, default_context_length, make_plan
from .errors import QuantizationError, UnsupportedError
from .quant.affine import quantization_summary, validate_settings
from .quant.recipes import Recipe
from .quant.requantize import default_group_size
from .recipe_search import resolve_quantization
from .sources import open_source

KV_OVERFLOW = ("error", "rotate")


def _plan_checkpoint(checkpoint, bits, group_size, dtype, memory_budget, context_length, auto_fit=False,
                     check=True, kv_bits=None) -> MemoryPlan:
    kwargs = dict(bits=bits, group_size=group_size, dtype_bytes=resolve_dtype(dtype, checkpoint).size, kv_bits=kv_bits,
                  context_length=context_length or default_context_length(checkpoint.config),
                  budget=device_budget(memory_budget), quantized=checkpoint.quantization)
    if check:
        return check_plan(checkpoint.config, checkpoint.tensor_infos, auto_fit=auto_fit, **kwargs)
    return make_plan(checkpoint.config, checkpoint.tensor_infos, **kwargs)


def plan(source, bits: Optional[int] = None, group_size: Optional[int] = None, dtype: Optional[str] = None,
         context_length: Optional[int] = None, memory_budget=None, kv_bits: Optional[int] = None) -> dict:
    """The memory plan for loading `source` at these settings, from config and tensor headers alone.

    group_size None: the source's own for a quantized source, else 64.
    """
    validate_settings(bits, group_size or 64)
    kv_bits = _validate_kv_bits(kv_bits)
    checkpoint = open_source(source)
    group_size = default_group_size(group_size, checkpoint.quantization)
    spec = validate_settings(bits, group_size)
    result = _plan_checkpoint(checkpoint, spec.bits if spec else None, group_size, dtype, memory_budget,
                              context_length, check=False, kv_bits=kv_bits)
    return result.to_dict()


def check_requantize(source, bits: Optional[int], group_size: Optional[int] = None,
                     allow_requantize: bool = False) -> dict:
    """What `load(source, bits, group_size)` would do to modules stored quantized, decided without reading a
    weight (config, tensor headers, the architecture): raises the QuantizationError load would raise for a
    coarser grid unless allow_requantize; else {"requantized_coarser": [...], "kept_stored_precision": [...]}.
    Front-ends that load several settings (bench, eval) call it for all of them before the first one runs."""
    validate_settings(bits, group_size or 64)
    checkpoint = open_source(source)
    requested = validate_settings(bits, default_group_size(group_size, checkpoint.quantization))
    if requested is None or not checkpoint.quantization:
        return {"requantized_coarser": [], "kept_stored_precision": []}
    targets = quantization_targets(checkpoint, requested, allow_requantize)
    return {"requantized_coarser": list(targets.requantized_coarser), "kept_stored_precision": list(targets.kept_stored)}


def load(source, bits: Optional[int] = None, group_size: Optional[int] = None, dtype: Optional[str] = None,
         memory_budget=None, context_length: Optional[int] = None, auto_fit: bool = False,
         kv_overflow: str = "error", progress: Optional[Callable[[int, int], None]] = None,
         adapter=None, allow_requantize: bool = False, recipe: Optional[str] = None,
         target_bpw: Optional[float] = None, calibration=None, data_aware: bool = False,
         kv_bits: Optional[int] = None, dequantize: bool = False) -> "Model":
    """Load a model (directory, .gguf file, alias or hub id); bits=4|8 quantizes group-wise while loading.

    The memory plan is checked before any weight is read: a load that would not fit the budget raises
    MemoryBudgetError naming settings that would; auto_fit=True picks the best of those instead.
    context_length bounds the KV cache; past it generation fails, or keeps a rotating window when
    kv_overflow="rotate". adapter: an mlx-lm or PEFT LoRA/DoRA adapter directory, applied unfused.
    recipe/target_bpw/calibration/data_aware: per-module quantization as in convert. kv_bits=4|8 keeps the
    KV cache quantized (mlx-lm's QuantizedKVCache), counted so in the plan; it cannot be combined with a
    rotating window.

    A source stored quantized keeps its precision unless `bits` is given; a grid coarser than the stored
    one is refused unless allow_requantize=True (quant.requantize). group_size None: the source's own
    for a quantized source, else 64.

    dequantize=True reads a quantized source as float32 holding exactly the file's weights (every GGUF block
    type through gguf's own dequantizer, Q6_K/Q3_K/Q2_K included; mlx-lm files through mx.dequantize), so
    what is run and scored is the file's model, not its nearest MLX affine form; bits/recipes then start
    from those floats.
    """
    if kv_overflow not in KV_OVERFLOW:
        raise UnsupportedError(f"kv_overflow must be one of {', '.join(map(repr, KV_OVERFLOW))}, got {kv_overflow!r}.")
    if recipe is None and target_bpw is None:
        validate_settings(bits, group_size or 64)  # bad settings fail before the source is opened
    kv_bits = _validate_kv_bits(kv_bits)
    if kv_bits is not None and kv_overflow == "rotate":
        raise UnsupportedError("a quantized KV cache (kv_bits) cannot also be a rotating window; "
                               "drop kv_bits or kv_overflow='rotate'.")
    lora = read_adapter(adapter) if adapter is not None else None
    checkpoint = open_source(source, dequantize=dequantize)
    group_size = default_group_size(group_size, checkpoint.quantization)
    requested = resolve_quantization(checkpoint, bits, group_size, recipe=recipe, target_bpw=target_bpw,
                                     calibration=calibration, data_aware=data_aware)
    if isinstance(requested, Recipe):
        if auto_fit:
            raise QuantizationError("auto_fit picks one bits setting; it cannot be combined with a recipe or target_bpw.")
        planned_bits = requested.max_bits()  # the plan's conservative bound for a mix
    else:
        planned_bits = requested.bits if requested else None
    memory_plan = _plan_checkpoint(checkpoint, planned_bits, group_size, dtype,
                                   memory_budget, context_length, auto_fit=auto_fit, kv_bits=kv_bits)
    if auto_fit:
        requested = validate_settings(memory_plan.settings["bits"], group_size)
    loaded = load_checkpoint(checkpoint, requested, dtype=dtype, progress=progress, adapter=lora,
                             allow_requantize=allow_requantize)
    from .model import Model  # the generation loop: after the architecture import (see architectures.py)

    info = model_info(checkpoint, loaded)
    info["context_length"] = memory_plan.settings["context_length"]
    info["memory_plan"] = memory_plan.to_dict()
    return Model(loaded, checkpoint.load_tokenizer, checkpoint.chat_template, info,
                 context_length=memory_plan.settings["context_length"], kv_overflow=kv_overflow, kv_bits=kv_bits,
                 wired_bytes=memory_plan.weight_bytes + memory_plan.kv_cache_bytes + memory_plan.activation_bytes)


def _validate_kv_bits(kv_bits):
    if kv_bits is None:
        return None
    from .generate.kv_cache import validate_kv_bits  # imports mlx-lm's caches: only when one is asked for

    return validate_kv_bits(kv_bits)


def model_info(checkpoint, loaded) -> dict:
    """`Model.info`: plain types, one type per key (bits and group_size: the predominant spec's int, or None
    when unquantized; the per-spec breakdown of a mixed model is under "quantization")."""
    info = {
        "architecture": loaded.config["model_type"],
        "parameters": loaded.parameters,
        **quantization_summary(loaded.quantized),
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
