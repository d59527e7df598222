"""Build an mlx-lm architecture from a Checkpoint and stream its tensors in, quantizing on the way.

The only module that sees both a Checkpoint and a model. Tensors flow one at a time
(read → cast → quantize → evaluate → assign), so peak memory stays near the final model size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .adapters import Adapter, attach_adapter
from .configs import model_classes, normalize_config
from .errors import MlxedgeError, SourceError, UnsupportedError
from .quant.affine import QuantSpec
from .quant.layers import QuantizedEmbedding, QuantizedLinear
from .quant.outcome import STORED_PARTS, Layout, Outcomes, tensor_outcomes
from .quant.recipes import Recipe
from .quant.requantize import Targets, refusal
from .sources.checkpoint import Checkpoint

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass
class LoadedModel:
    """An mlx-lm model with its weights in place, plus the facts `Model.info` reports."""

    model: nn.Module
    config: dict
    dtype: mx.Dtype
    quantized: dict  # module path -> QuantSpec, for every quantized module
    unquantized: list  # Linear/Embedding paths left in float because the group does not divide them
    parameters: int = 0
    nbytes: int = 0
    extra: dict = field(default_factory=dict)


def resolve_dtype(dtype, checkpoint: Checkpoint, for_compute: bool = True) -> mx.Dtype:
    """The compute/storage dtype of unquantized tensors: as asked, else the checkpoint's own.

    For computing on a machine without Metal (MLX's CPU build) the default is float32: there MLX's quantized
    matmul runs 4x (bfloat16) to 18x (float16) slower in half precision than in float32 (measured on a
    (1,576)x(1536,576) 4-bit matmul), which would make every decode step crawl. Files written for other
    machines (for_compute=False) keep the checkpoint's dtype.
    """
    if dtype is not None:
        name = dtype if isinstance(dtype, str) else str(dtype).split(".")[-1]
        if name not in DTYPES:
            raise MlxedgeError(f"dtype {dtype!r} is not supported; use float16, bfloat16 or float32.")
        return DTYPES[name]
    if for_compute and not mx.metal.is_available():
        return mx.float32
    declared = checkpoint.config.get("torch_dtype") or checkpoint.config.get("dtype")
    if declared in DTYPES:
        return DTYPES[declared]
    for info in checkpoint.tensor_infos.values():
        if info.dtype in DTYPES:
            return DTYPES[info.dtype]
    return mx.float16


def quantizable_modules(model: nn.Module) -> dict:
    """path -> every float Linear/Embedding of the model (what quantization and recipes decide about)."""
    return {path: m for path, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding)) and not isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}


def architecture_layout(model: nn.Module, checkpoint: Checkpoint) -> Layout:
    """What the built architecture makes of the checkpoint: the names its sanitize keeps, and its quantizable
    modules as path -> (input dims, is an embedding). The memory plan estimates the same from headers."""
    keep = _surviving_names(model, checkpoint)  # first: a sanitize may change the model (see there)
    modules = quantizable_modules(model)
    return Layout(frozenset(keep),
                  {path: (int(m.weight.shape[1]), isinstance(m, nn.Embedding)) for path, m in modules.items()})


def plan_tensors(model: nn.Module, checkpoint: Checkpoint, requested, allow_requantize: bool = False) -> Outcomes:
    """What each checkpoint tensor becomes in `model` (quant.outcome.tensor_outcomes, on the real layout).

    requested: None (keep the checkpoint's precision), one QuantSpec, or a Recipe (quant/recipes.py), resolved
    here against the model's modules (recipes start from float weights; recipe_search refuses stored-quantized
    sources). Raises QuantizationError for a coarser grid on stored-quantized modules (quant.requantize) and
    SourceError for stored-quantized modules whose grid the config does not give.
    """
    layout = architecture_layout(model, checkpoint)
    if isinstance(requested, Recipe):
        n_layers = int(normalize_config(checkpoint.config).get("num_hidden_layers", 0))
        requested = requested.assign(layout.modules, n_layers,
                                     tied=not any(p.endswith("lm_head") for p in layout.modules))
    outcomes = tensor_outcomes(checkpoint.tensor_infos, checkpoint.quantization, requested, layout, allow_requantize)
    error = refusal(outcomes.targets, requested)
    if error is not None:
        raise error
    if outcomes.unknown_stored:
        first = outcomes.unknown_stored[0]
        raise SourceError(f"{first} is stored quantized ({first}.scales) but config.json gives no bits and group "
                          "size for it (no 'quantization' entry); the checkpoint is incomplete.")
    return outcomes


def _replace_with_quantized(model: nn.Module, modules: dict, targets: dict, dtype) -> None:
    replacements = []
    for path, spec in targets.items():
        module = modules[path]
        if isinstance(module, nn.Embedding):
            num, dims = module.weight.shape
            new = QuantizedEmbedding(num, dims, spec, dtype)
        else:
            out_dims, in_dims = module.weight.shape
            new = QuantizedLinear(in_dims, out_dims, "bias" in module, spec, dtype)
        replacements.append((path, new))
    model.update_modules(tree_unflatten(replacements))


def _set_param(model: nn.Module, name: str, value: mx.array) -> None:
    *parents, leaf = name.split(".")
    node = model
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[leaf] = value


def _surviving_names(model: nn.Module, checkpoint: Checkpoint) -> set:
    """Run the architecture's sanitize over lazy placeholders: which checkpoint tensors it keeps.

    Some sanitizers change the model (gemma3 ties its head when lm_head.weight is absent), so this must run
    on the complete key set, before quantized layers are put in place.
    """
    if not hasattr(model, "sanitize"):
        return set(checkpoint.tensor_infos)
    placeholders = {name: mx.zeros((1,)) for name in checkpoint.tensor_infos}
    kept = model.sanitize(dict(placeholders))
    changed = [k for k, v in kept.items() if placeholders.get(k) is not v]
    if changed:
        raise UnsupportedError(f"the architecture rewrites tensors while loading ({changed[0]}, ...); "
                               "mlxedge streams tensors unchanged and cannot load it.")
    return set(kept)


def _build_model(checkpoint: Checkpoint) -> tuple:
    """(normalized config, the architecture's module) — parameters not yet materialised (MLX is lazy)."""
    config = normalize_config(checkpoint.config)
    model_class, args_class = model_classes(config)
    try:
        model = model_class(args_class.from_dict(config))
    except (TypeError, ValueError, KeyError, ZeroDivisionError, OverflowError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SourceError(f"config.json does not describe a valid {config['model_type']} model: {reason}") from None
    return config, model


def quantization_targets(checkpoint: Checkpoint, requested: Optional[QuantSpec],
                         allow_requantize: bool = False) -> Targets:
    """What `load_checkpoint` would do to each module at `requested`, decided by the same plan_tensors but
    without reading a weight: raises the same QuantizationError where it would refuse a coarser grid."""
    _, model = _build_model(checkpoint)
    return plan_tensors(model, checkpoint, requested, allow_requantize).targets


def load_checkpoint(checkpoint: Checkpoint, requested: Optional[QuantSpec], dtype=None,
                    progress: Optional[Callable[[int, int], None]] = None, for_compute: bool = True,
                    adapter: Optional[Adapter] = None, allow_requantize: bool = False) -> LoadedModel:
    """Build the architecture and stream every tensor of `checkpoint` into it (see resolve_dtype for for_compute).

    adapter: a LoRA/DoRA adapter attached, unfused, on top of the loaded layers (see adapters.py).
    allow_requantize: let already-quantized modules go onto a coarser grid (see quant.requantize).
    """
    config, model = _build_model(checkpoint)
    compute_dtype = resolve_dtype(dtype, checkpoint, for_compute)
    outcomes = plan_tensors(model, checkpoint, requested, allow_requantize)
    chosen = outcomes.targets
    targets, unquantized = chosen.specs, chosen.unquantized
    quantizer = getattr(requested, "quantizer", None)
    _replace_with_quantized(model, quantizable_modules(model), targets, compute_dtype)

    expected = dict(tree_flatten(model.parameters()))
    assigned = set()
    pending: dict = {}  # module path -> {part: array} while a quantized triplet is incomplete
    total = len(outcomes.tensors)
    done = 0
    for name, array in checkpoint.iter_tensors():
        outcome = outcomes.tensors.get(name)
        if outcome is None:
            continue  # the architecture drops it
        done += 1
        if progress is not None:
            progress(done, total)
        module_path, _, part = name.rpartition(".")
        if outcome.kind == "stored":
            triplet = pending.setdefault(module_path, {})
            triplet[part] = array
            if len(triplet) < 3:
                continue
            del pending[module_path]
            tensors = _convert_quantized(module_path, triplet, outcome.source, outcome.spec, compute_dtype, quantizer)
        else:
            tensors = _convert_float(name, array, outcome.spec, compute_dtype, quantizer)
        for tensor_name, tensor in tensors.items():
            _assign_checked(model, expected, tensor_name, tensor)
            assigned.add(tensor_name)
        del array, tensors
    if pending:
        first = next(iter(pending))
        raise SourceError(f"quantized module {first} lacks {set(STORED_PARTS) - set(pending[first])} in the checkpoint.")
    missing = sorted(set(expected) - assigned)
    if missing:
        raise SourceError(f"the checkpoint lacks {len(missing)} tensor(s) the {config['model_type']} architecture "
                          f"needs (e.g. {missing[0]}); it is incomplete or of another architecture.")
    model.eval()
    extra = {}
    if adapter is not None:  # the Model binds kernels after this: an adapted gate/up is never fused past it
        attach_adapter(model, adapter, compute_dtype)
        extra["adapter"] = adapter.describe()
    params = dict(tree_flatten(model.parameters()))
    return LoadedModel(
        model=model, config=config, dtype=compute_dtype, quantized=targets, unquantized=unquantized,
        parameters=_count_parameters(params, targets), nbytes=sum(v.nbytes for v in params.values()),
        extra={"kept_stored_precision": chosen.kept_stored, "requantized_coarser": chosen.requantized_coarser,
               **extra},
    )


def _convert_float(name: str, array: mx.array, target: Optional[QuantSpec], dtype, quantizer=None) -> dict:
    """Cast a float tensor to dtype, or quantize it (quantizer(module_path, array, spec), default mx.quantize)."""
    if target is None:
        if mx.issubdtype(array.dtype, mx.floating):
            array = array.astype(dtype)
        mx.eval(array)
        return {name: array}
    base = name.rpartition(".")[0]
    if quantizer is not None:
        w, scales, biases = quantizer(base, array, target)
    else:
        w, scales, biases = mx.quantize(array.astype(dtype), group_size=target.group_size, bits=target.bits)
    scales, biases = scales.astype(dtype), biases.astype(dtype)
    mx.eval(w, scales, biases)
    return {f"{base}.weight": w, f"{base}.scales": scales, f"{base}.biases": biases}


def _convert_quantized(path: str, triplet: dict, source: QuantSpec, target: Optional[QuantSpec], dtype,
                       quantizer=None) -> dict:
    if target == source:
        out = {f"{path}.weight": triplet["weight"],
               f"{path}.scales": triplet["scales"].astype(dtype),
               f"{path}.biases": triplet["biases"].astype(dtype)}
        mx.eval(*out.values())
        return out
    dense = mx.dequantize(triplet["weight"], triplet["scales"].astype(mx.float32),
                          triplet["biases"].astype(mx.float32), group_size=source.group_size, bits=source.bits)
    return _convert_float(f"{path}.weight", dense, target, dtype, quantizer)


def _assign_checked(model: nn.Module, expected: dict, name: str, tensor: mx.array) -> None:
    if name not in expected:
        raise SourceError(f"the checkpoint has tensor {name!r}, which the architecture does not use; "
                          "the checkpoint and its config.json disagree.")
    if tuple(expected[name].shape) != tuple(tensor.shape):
        raise SourceError(f"tensor {name!r} has shape {tuple(tensor.shape)} but the config implies "
                          f"{tuple(expected[name].shape)}; the checkpoint and its config.json disagree.")
    if mx.issubdtype(expected[name].dtype, mx.floating) and not mx.issubdtype(tensor.dtype, mx.floating):
        raise SourceError(f"tensor {name!r} is stored as {str(tensor.dtype).split('.')[-1]}, expected a floating-point "
                          "type; the checkpoint is corrupt.")
    if mx.issubdtype(tensor.dtype, mx.floating) and not mx.all(mx.isfinite(tensor)).item():
        hint = ("the checkpoint is corrupt." if tensor.dtype == mx.float32 else
                f"the checkpoint is corrupt, or its values overflow {str(tensor.dtype).split('.')[-1]}: try dtype float32.")
        raise SourceError(f"tensor {name!r} holds NaN or infinite values; {hint}")
    _set_param(model, name, tensor)


def _count_parameters(params: dict, quantized: dict) -> int:
    """Logical weights: a quantized module counts its unpacked elements, not its scales and biases."""
    total = 0
    for name, value in params.items():
        module_path, _, part = name.rpartition(".")
        if module_path in quantized:
            if part == "weight":
                total += value.size * 32 // quantized[module_path].bits
            elif part == "bias":
                total += value.size
        else:
            total += value.size
    return total
