"""What each checkpoint tensor becomes at given settings: the one answer the loader acts on and the plan sizes.

`tensor_outcomes` is asked by both sides with the same inputs, as plain data:

- a `Layout`: the checkpoint tensors the architecture keeps, and its quantizable (Linear/Embedding) modules
  as path -> (input dims, is an embedding). The loader reads both off the architecture it built
  (loading.py: its sanitize, its module classes). The memory plan must not build or import model code, so
  it passes `header_layout`, the same facts estimated from tensor headers by the three rules written there;
  tests check that estimate against the real architectures.
- the checkpoint's stored quantization in mlx-lm's config format (`stored_specs` reads it);
- the request: None (keep the checkpoint's precision), one QuantSpec, or path -> QuantSpec | None (a recipe
  resolved against the modules).

The answer (`Outcomes`) holds each module's stored grid, its target grid (quant.requantize's policy decides;
a refusal is recorded for the loader to raise) and, per kept tensor, an `Outcome`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

from ..configs import text_config
from .affine import QuantSpec
from .requantize import Targets, decide_targets

STORED_PARTS = ("weight", "scales", "biases")  # one module stored quantized: packed words, scales, biases
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64", "F16", "BF16", "F32", "F64"})
# Buffers some Hugging Face checkpoints carry that no mlx-lm architecture keeps (their sanitize drops them).
DROPPED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.masked_bias")
# Architectures whose sanitize drops a stored lm_head.weight when the config ties the head to the embedding
# (mlx-lm 0.32). The others keep it: gemma3_text then loads it as a head of its own; gemma2 and phi3 have no
# head module and refuse such a checkpoint.
DROPS_TIED_HEAD = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class Layout:
    """What the architecture makes of a checkpoint's names: kept tensors, quantizable modules."""

    keep: frozenset
    modules: Dict[str, Tuple[int, bool]]  # module path -> (input dims, is an embedding)


@dataclass(frozen=True)
class Outcome:
    """What one kept checkpoint tensor becomes.

    kind "stored":   one part (weight, scales, biases) of a module stored quantized; the module goes from its
                     stored grid `source` to `spec` (the same grid: kept; another: re-quantized; None: float).
         "quantize": a float weight quantized to `spec`.
         "cast":     kept unquantized: cast to the compute dtype when `floating`, else kept as it is.
    shape: the tensor's logical shape (a stored weight's input dimension unpacked).
    """

    kind: str
    shape: Tuple[int, ...]
    spec: Optional[QuantSpec] = None
    source: Optional[QuantSpec] = None
    floating: bool = True


@dataclass
class Outcomes:
    """The answer of `tensor_outcomes`; `tensors` lacks the names the architecture drops."""

    stored: Dict[str, QuantSpec]
    targets: Targets
    tensors: Dict[str, Outcome]
    unknown_stored: List[str] = field(default_factory=list)  # have .scales, but the config gives no grid


def stored_specs(quantization: Optional[dict], tensor_infos: Mapping) -> Tuple[Dict[str, QuantSpec], List[str]]:
    """Module path -> QuantSpec it is stored at, by mlx-lm's config rules, for every module holding `.scales`:
    a per-module entry (a dict; False: not quantized) overrides the top-level bits and group size.
    Also returns the modules holding `.scales` whose grid the config does not give (no "quantization" entry,
    or False for that module): bits and group cannot be told from the shapes (4-bit g64 and 8-bit g32 pack
    alike), so the loader refuses them."""
    specs, unknown = {}, []
    for name in tensor_infos:
        if not name.endswith(".scales"):
            continue
        path = name[: -len(".scales")]
        override = quantization.get(path) if quantization else False
        if override is False:
            unknown.append(path)
        elif isinstance(override, dict):
            specs[path] = QuantSpec(int(override["bits"]), int(override["group_size"]))
        else:
            specs[path] = QuantSpec(int(quantization["bits"]), int(quantization["group_size"]))
    return specs, unknown


def header_layout(config: dict, tensor_infos: Mapping, quantization: Optional[dict]) -> Layout:
    """The architecture's layout estimated from headers alone, for the memory plan:

    1. kept: every tensor but the buffers architectures drop (DROPPED_SUFFIXES) and, where the architecture
       drops a tied head (DROPS_TIED_HEAD) and the head is tied (config's tie_word_embeddings; when absent,
       no lm_head.weight stored), lm_head's tensors;
    2. quantizable: every module whose kept "weight" is a 2-D float tensor (Linear and Embedding are the
       only 2-D weights of the supported architectures), input dims its last axis;
    3. and every module stored quantized with a known grid, input dims its unpacked last axis.
    Embeddings are recognised by name (quant.requantize.is_embedding_or_head).
    """
    cfg = text_config(config)
    tied = (cfg.get("model_type") in DROPS_TIED_HEAD
            and cfg.get("tie_word_embeddings", "lm_head.weight" not in tensor_infos))
    keep = frozenset(name for name in tensor_infos if not name.endswith(DROPPED_SUFFIXES)
                     and not (tied and name.rpartition(".")[0] == "lm_head"))
    stored, _ = stored_specs(quantization, tensor_infos)
    modules = {}
    for name in keep:
        module, _, leaf = name.rpartition(".")
        info = tensor_infos[name]
        if leaf != "weight":
            continue
        if module in stored:
            modules[module] = (int(info.shape[-1]) * 32 // stored[module].bits, False)
        elif len(info.shape) == 2 and info.dtype in FLOAT_DTYPES:
            modules[module] = (int(info.shape[-1]), False)
    return Layout(keep, modules)


def tensor_outcomes(tensor_infos: Mapping, quantization: Optional[dict], requested, layout: Layout,
                    allow_requantize: bool = False) -> Outcomes:
    """What every kept tensor of a checkpoint becomes at `requested` (see the module docstring)."""
    stored, unknown = stored_specs(quantization, tensor_infos)
    stored = {path: spec for path, spec in stored.items() if path in layout.modules}
    targets = decide_targets(layout.modules, stored, requested, allow_requantize)
    tensors = {}
    for name, info in tensor_infos.items():
        if name not in layout.keep:
            continue
        module, _, part = name.rpartition(".")
        shape = tuple(int(d) for d in info.shape)
        if module in stored and part in STORED_PARTS:
            source = stored[module]
            if part == "weight":
                shape = shape[:-1] + (shape[-1] * 32 // source.bits,)
            tensors[name] = Outcome("stored", shape, targets.specs.get(module), source)
        elif part == "weight" and module in targets.specs:
            tensors[name] = Outcome("quantize", shape, targets.specs[module])
        else:
            tensors[name] = Outcome("cast", shape, floating=info.dtype in FLOAT_DTYPES)
    return Outcomes(stored, targets, tensors, [p for p in unknown if p in layout.modules])
