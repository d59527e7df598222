"""How much memory a model will need, how much the device can give, and keeping generation inside that.

Pure arithmetic over a checkpoint's config and tensor headers (no weight is read), plus one probe per
platform for the budget:

- `device_budget`: macOS: Metal's recommended working set (`mx.device_info()`); Linux: MemAvailable and
  the cgroup (v2 `memory.max`, v1 `memory.limit_in_bytes`) headroom, plus what this process already holds;
  or a user override (`"6GB"`).
- `make_plan`: weights at the chosen precision (MLX's affine layout, byte-exact), KV cache at the context
  length, activation workspace of a prefill chunk, runtime overhead; `fits` against the budget.
- `check_plan` / `suggest_fitting` / `auto_fit`: refuse with a `MemoryBudgetError` naming what would fit,
  or pick the best setting that fits.
- `check_generation_context`: the generation loop's guard that the KV cache stays within the plan.
- `wired_limit`: on macOS, wire the plan's bytes for the duration of generation and restore after.
- `current_rss_bytes` / `peak_rss_bytes` / `reset_peak_rss`: measurement helpers for scripts and tests.

Imports only the standard library and mlx (psutil when installed); nothing here loads a model.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import resource
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from .errors import GenerationError, MemoryBudgetError, MlxedgeError
from .quant.affine import LOAD_BITS, QuantSpec, can_quantize
from .quant.requantize import planned_target

# ---------------------------------------------------------------------------------------------- sizes

_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 10**3, "kib": 1 << 10,
    "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
    "g": 1 << 30, "gb": 10**9, "gib": 1 << 30,
    "t": 1 << 40, "tb": 10**12, "tib": 1 << 40,
}
MAX_SIZE = 2**63 - 1  # what the OS and MLX can be told (a signed 64-bit byte count)
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value) -> int:
    """Bytes from an int or a string such as "6GB" (10^9), "6GiB"/"6G" (2^30), "512MiB", "1.5 GB", "4096".

    Decimal units (KB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB, GiB; bare K, M, G) powers of
    1024. Raises MlxedgeError on anything else, or on a size that is not positive.
    """
    if isinstance(value, bool):
        raise MlxedgeError(f"memory size {value!r} is not a size; use bytes or a string like '6GB' or '512MiB'.")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float) and math.isfinite(value):
        n = int(value)
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)) and m.group(2).lower() in _UNITS:
        n = int(Fraction(m.group(1)) * _UNITS[m.group(2).lower()])  # exact: no float overflow or rounding
    else:
        raise MlxedgeError(f"memory size {value!r} is not a size; use bytes or a string like '6GB' or '512MiB'.")
    if n <= 0:
        raise MlxedgeError(f"memory size {value!r} must be more than zero bytes.")
    if n > MAX_SIZE:
        raise MlxedgeError(f"memory size {str(value)[:40]!r} is more than any machine has (the limit is "
                           f"{format_bytes(MAX_SIZE)}); use a size like '6GB'.")
    return n


def format_bytes(n: int) -> str:
    """Human-readable bytes in decimal units ("1.23 GB", "512.0 MB"), matching how `parse_size` reads "GB"."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GB" else f"{n / scale:.1f} {unit}"
    return f"{n} B"


# ----------------------------------------------------------------------------------------- RSS helpers

def _proc_status_kb(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc VmRSS; psutil; macOS `ps`)."""
    rss = _proc_status_kb("VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil  # optional

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(os.getpid())], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) * 1024


def peak_rss_bytes() -> int:
    """Highest resident set size of this process so far (VmHWM on Linux; getrusage elsewhere).

    getrusage's ru_maxrss is in KiB on Linux and in bytes on macOS.
    """
    hwm = _proc_status_kb("VmHWM")
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


def reset_peak_rss() -> bool:
    """Reset the peak (VmHWM) to the current RSS where the kernel allows it (Linux); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rusage_maxrss_bytes(ru_maxrss: int) -> int:
    """ru_maxrss (from os.wait4 / getrusage) in bytes: KiB on Linux, bytes on macOS."""
    return int(ru_maxrss) if sys.platform == "darwin" else int(ru_maxrss) * 1024


# ---------------------------------------------------------------------------------------------- budget

@dataclass(frozen=True)
class Budget:
    """The bytes a model process may use in total, and where that figure came from."""

    bytes: int
    source: str  # "override", "metal recommended working set", "MemAvailable", "cgroup memory.max", ...
    details: dict = field(default_factory=dict)

    def describe(self) -> str:
        return f"{format_bytes(self.bytes)} ({self.source})"


_UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as 9223372036854771712


def _parse_meminfo(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1)
    return out


def _parse_stat(text: str) -> dict:
    """cgroup memory.stat: "key value" lines."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text()
    except OSError:
        return None


def _cgroup_dirs(root: Path, proc_cgroup: str) -> list:
    """Candidate memory-cgroup directories for this process, innermost first: (version, dir)."""
    dirs = []
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, rel = parts
        rel = rel.strip().lstrip("/")
        if hier == "0" and controllers == "":
            base, version = root / "sys/fs/cgroup", 2
        elif "memory" in controllers.split(","):
            base, version = root / "sys/fs/cgroup/memory", 1
        else:
            continue
        # Walk from our own cgroup up to the mount root: a parent's limit binds us too. Inside a container the
        # mount root *is* our cgroup and the recorded path does not exist; the walk ends at the root anyway.
        path = Path(rel) if rel else None
        while path is not None:
            dirs.append((version, base / path))
            path = path.parent if str(path.parent) not in (".", "") else None
        dirs.append((version, base))
    return dirs


def linux_probe(root: Path = Path("/")) -> dict:
    """Raw Linux facts for `device_budget`: /proc/meminfo text and the tightest memory cgroup's files.

    `root` lets tests point the probe at a fake filesystem.
    """
    facts: dict[str, Any] = {"platform": "linux", "meminfo": _read_text(root / "proc/meminfo") or ""}
    proc_cgroup = _read_text(root / "proc/self/cgroup") or ""
    best = None
    for version, d in _cgroup_dirs(root, proc_cgroup):
        names = ("memory.max", "memory.current") if version == 2 else ("memory.limit_in_bytes", "memory.usage_in_bytes")
        limit_text = _read_text(d / names[0])
        if limit_text is None:
            continue
        limit = _parse_cgroup_limit(limit_text)
        if limit is None:
            continue
        if best is None or limit < best["limit"]:
            usage_text = _read_text(d / names[1])
            best = {"version": version, "dir": str(d), "limit": limit,
                    "usage": int(usage_text.strip()) if usage_text and usage_text.strip().isdigit() else None,
                    "stat": _read_text(d / "memory.stat") or ""}
    facts["cgroup"] = best
    return facts


def _parse_cgroup_limit(text: str) -> Optional[int]:
    text = text.strip()
    if text == "max" or not text.isdigit():
        return None
    value = int(text)
    return None if value >= _UNLIMITED else value


def _darwin_probe() -> dict:
    import mlx.core as mx

    info = {}
    if mx.metal.is_available():
        info = dict(mx.device_info())
    total = None
    try:
        total = int(subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True,
                                   check=True).stdout.strip())
    except (OSError, ValueError, subprocess.CalledProcessError):
        pass
    return {"platform": "darwin", "device_info": info, "memory_size": total}


def system_probe() -> dict:
    """The real probe for this machine (see `device_budget`)."""
    if sys.platform == "darwin":
        facts = _darwin_probe()
    elif sys.platform.startswith("linux"):
        facts = linux_probe()
    else:
        facts = {"platform": sys.platform}
    facts["rss"] = current_rss_bytes()
    return facts


def device_budget(override=None, *, probe: Optional[Callable[[], dict]] = None) -> Budget:
    """The memory a model process may use in total on this device.

    override: bytes or a size string ("6GB"); wins over any probe.
    probe:    returns raw facts (default `system_probe`); tests pass fakes:
              {"platform": "darwin", "device_info": {"memory_size": .., "max_recommended_working_set_size": ..}}
              {"platform": "linux", "meminfo": "<text of /proc/meminfo>", "rss": <bytes this process holds>,
               "cgroup": None | {"version": 1|2, "limit": bytes, "usage": bytes|None, "stat": "<memory.stat>"}}

    macOS: Metal's recommended working set (what the GPU may keep resident), else 75% of total memory.
    Linux: what the process holds now plus what it could still get: the smaller of MemAvailable and the
    cgroup headroom (limit − usage + reclaimable page cache).
    """
    if override is not None:
        return Budget(parse_size(override), "override")
    facts = (probe or system_probe)()
    platform = facts.get("platform", "")
    if platform == "darwin":
        info = facts.get("device_info") or {}
        total = info.get("memory_size") or facts.get("memory_size")
        recommended = info.get("max_recommended_working_set_size")
        if recommended:
            value = min(int(recommended), int(total)) if total else int(recommended)
            return Budget(value, "metal recommended working set", {"memory_size": total, "recommended": recommended})
        if total:
            return Budget(int(total) * 3 // 4, "75% of total memory", {"memory_size": total})
        raise MlxedgeError("cannot tell how much memory this Mac has; pass memory_budget= (e.g. '6GB').")
    if platform == "linux":
        rss = int(facts.get("rss") or 0)
        meminfo = _parse_meminfo(facts.get("meminfo") or "")
        available = meminfo.get("MemAvailable")
        if available is None and "MemFree" in meminfo:
            available = meminfo["MemFree"] + meminfo.get("Cached", 0)
        details = {"MemAvailable": available, "rss": rss}
        candidates = []
        if available is not None:
            candidates.append((available + rss, "MemAvailable"))
        cg = facts.get("cgroup")
        if cg and cg.get("limit"):
            limit = int(cg["limit"])
            usage = cg.get("usage")
            stat = _parse_stat(cg.get("stat") or "")
            reclaimable = stat.get("inactive_file", stat.get("total_inactive_file", 0))
            headroom = limit if usage is None else max(0, limit - int(usage) + reclaimable)
            name = "cgroup memory.max" if cg.get("version") == 2 else "cgroup memory.limit_in_bytes"
            details.update(cgroup_limit=limit, cgroup_usage=usage)
            candidates.append((min(limit, headroom + rss), name))
        if not candidates:
            raise MlxedgeError("cannot read /proc/meminfo to size the memory budget; pass memory_budget= (e.g. '6GB').")
        value, source = min(candidates)
        return Budget(int(value), source, details)
    try:
        import psutil

        vm = psutil.virtual_memory()
        return Budget(int(vm.available) + int(facts.get("rss") or 0), "available memory (psutil)")
    except ImportError:
        raise MlxedgeError(f"cannot size the memory budget on {platform!r}; pass memory_budget= (e.g. '6GB').") from None


# ------------------------------------------------------------------------------------------------ plan

# Runtime overhead: the resident memory of a process that has imported MLX, mlx-lm and transformers and
# loaded a tokenizer, before any weight. Measured on this machine (Linux x86-64, Python 3.11, mlx 0.32.4
# CPU, mlx-lm 0.32.2, transformers 5.23) as VmHWM after `import mlx.core, mlx_lm.models.llama` and
# `AutoTokenizer.from_pretrained(<SmolLM2-135M>)`, three runs: 465.4–465.7 MB with torch installed
# (transformers imports it whenever it is importable: +325 MB), 140.7 MB with torch made unimportable.
# Rounded up to the next 5 MB.
RUNTIME_BASE_BYTES = 145_000_000
RUNTIME_TORCH_BYTES = 325_000_000

DEFAULT_PREFILL_CHUNK = 512
KV_STEP = 256  # mlx-lm's KVCache grows in steps of 256 tokens
DEFAULT_CONTEXT = 4096
MIN_SUGGESTED_CONTEXT = 512
SUGGESTED_BITS = tuple(sorted(LOAD_BITS, reverse=True))  # what the loader quantizes to, best first

_FLOAT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_DROPPED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.masked_bias")


def runtime_overhead_bytes() -> int:
    """The measured baseline of the runtime (see RUNTIME_BASE_BYTES), with torch's share when it will load."""
    torch_present = "torch" in sys.modules or importlib.util.find_spec("torch") is not None
    return RUNTIME_BASE_BYTES + (RUNTIME_TORCH_BYTES if torch_present else 0)


def default_context_length(config: dict) -> int:
    """The context planned when none is asked for: the model's maximum, capped at DEFAULT_CONTEXT."""
    cfg = _text_config(config)
    return int(min(cfg.get("max_position_embeddings") or DEFAULT_CONTEXT, DEFAULT_CONTEXT))


def checkpoint_dtype_bytes(config: dict, tensor_infos: Mapping) -> int:
    """Bytes per element of the checkpoint's own float dtype (the loader's default compute dtype)."""
    declared = config.get("torch_dtype") or config.get("dtype")
    if declared in _FLOAT_BYTES:
        return _FLOAT_BYTES[declared]
    for info in tensor_infos.values():
        if info.dtype in _FLOAT_BYTES:
            return _FLOAT_BYTES[info.dtype]
    return 2


@dataclass
class MemoryPlan:
    """Predicted bytes of a model at given settings, against a budget. `to_dict()` gives plain types."""

    weight_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    overhead_bytes: int
    total_bytes: int
    budget_bytes: int
    budget_source: str
    fits: bool
    breakdown: dict
    settings: dict
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        s = self.settings
        bits = f"{s['bits']}-bit" if s["bits"] is not None else ("as stored" if s.get("stored_quantized") else "float")
        return (f"{bits}, context {s['context_length']}: {format_bytes(self.total_bytes)} "
                f"(weights {format_bytes(self.weight_bytes)}, KV cache {format_bytes(self.kv_cache_bytes)}, "
                f"activations {format_bytes(self.activation_bytes)}, runtime {format_bytes(self.overhead_bytes)})")

    def rows(self) -> list:
        """(label, value) rows for a table."""
        s = self.settings
        return [
            ("bits", str(s["bits"]) if s["bits"] is not None else ("as stored" if s.get("stored_quantized") else "float")),
            ("group size", str(s["group_size"])),
            ("context length", str(s["context_length"])),
            ("weights", format_bytes(self.weight_bytes)),
            ("KV cache", format_bytes(self.kv_cache_bytes)),
            ("activations", format_bytes(self.activation_bytes)),
            ("runtime overhead", format_bytes(self.overhead_bytes)),
            ("total", format_bytes(self.total_bytes)),
            ("budget", f"{format_bytes(self.budget_bytes)} ({self.budget_source})"),
            ("fits", "yes" if self.fits else "no"),
        ]


def _text_config(config: dict) -> dict:
    """Multimodal configs nest the language model's shape in text_config; its keys win."""
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def _numel(shape) -> int:
    return math.prod(int(d) for d in shape)


def quantized_bytes(shape, bits: int, group_size: int, scale_bytes: int) -> int:
    """Bytes of one tensor in MLX's affine layout: packed uint32 words + a scale and a bias per group.

    MLX packs along the last (input) dimension: rows × (in·bits/32) uint32 words; scales and biases are
    rows × (in/group) in the compute dtype. 4-bit, group 64, fp16 → 4.5 bits per weight.
    """
    rows, cols = _numel(shape[:-1]), int(shape[-1])
    if cols % group_size:
        raise MlxedgeError(f"input dimension {cols} is not divisible by group size {group_size}.")
    return rows * (cols * bits // 32) * 4 + 2 * rows * (cols // group_size) * scale_bytes


def _source_bits(module_path: str, quantized: Optional[dict]) -> Optional[tuple]:
    """(bits, group_size) the checkpoint stores a module at, per mlx-lm's quantization config."""
    if not quantized:
        return None
    override = quantized.get(module_path)
    if override is False:
        return None
    if isinstance(override, dict):
        return int(override["bits"]), int(override["group_size"])
    return int(quantized["bits"]), int(quantized["group_size"])


def weight_plan(config: dict, tensor_infos: Mapping, *, bits: Optional[int], group_size: int, dtype_bytes: int,
                quantized: Optional[dict] = None, keep: Optional[set] = None) -> dict:
    """Bytes of every weight once loaded, following the loader's rules (loading.py):

    - bits=None keeps the checkpoint's precision: float tensors are cast to dtype_bytes, modules stored
      quantized stay as stored (their scales and biases in the compute dtype).
    - bits=b quantizes every Linear/Embedding weight (a 2-D "*.weight", float or stored quantized) whose
      input dimension group_size divides; others stay float at dtype_bytes.
    - A tied lm_head is not counted; names the architecture drops (rotary inv_freq) are skipped; `keep`
      (the names the architecture's sanitize keeps) restricts the count when the caller knows it.
    Returns totals and counts: {"bytes", "quantized_bytes", "float_bytes", "quantized_tensors",
    "float_tensors", "parameters", "stored_quantized"}.
    """
    cfg = _text_config(config)
    tied = cfg.get("tie_word_embeddings", "lm_head.weight" not in tensor_infos)
    stored_quantized = {name[: -len(".scales")] for name in tensor_infos if name.endswith(".scales")}
    out = {"bytes": 0, "quantized_bytes": 0, "float_bytes": 0, "quantized_tensors": 0, "float_tensors": 0,
           "parameters": 0, "stored_quantized": bool(stored_quantized)}
    for name, info in tensor_infos.items():
        if keep is not None and name not in keep:
            continue
        if name.endswith(_DROPPED_SUFFIXES):
            continue
        module, _, leaf = name.rpartition(".")
        if tied and module == "lm_head":
            continue
        if module in stored_quantized:
            if leaf != "weight":
                continue  # scales and biases are counted with their weight
            src = _source_bits(module, quantized) or _guess_source_bits(info, tensor_infos[module + ".scales"])
            src_bits, src_group = src
            shape = tuple(info.shape[:-1]) + (info.shape[-1] * 32 // src_bits,)
            target = planned_target((src_bits, src_group), bits, group_size, module)  # quant.requantize
            if shape[-1] % target[1] == 0:
                nbytes = quantized_bytes(shape, target[0], target[1], dtype_bytes)
                out["quantized_bytes"] += nbytes
                out["quantized_tensors"] += 1
            else:
                nbytes = _numel(shape) * dtype_bytes
                out["float_bytes"] += nbytes
                out["float_tensors"] += 1
            out["parameters"] += _numel(shape)
            out["bytes"] += nbytes
            continue
        numel = _numel(info.shape)
        out["parameters"] += numel
        floating = info.dtype in _FLOAT_BYTES
        is_matrix = leaf == "weight" and len(info.shape) == 2 and floating
        if bits is not None and is_matrix and can_quantize(int(info.shape[-1]), QuantSpec(bits, group_size)):
            nbytes = quantized_bytes(info.shape, bits, group_size, dtype_bytes)
            out["quantized_bytes"] += nbytes
            out["quantized_tensors"] += 1
        else:
            nbytes = numel * dtype_bytes if floating else int(info.nbytes)
            out["float_bytes"] += nbytes
            out["float_tensors"] += 1
        out["bytes"] += nbytes
    return out


def _guess_source_bits(weight_info, scales_info) -> tuple:
    """Bits and group of a stored quantized module from its shapes, when the config does not say.

    in = groups·group = words·32/bits; try the group sizes MLX allows.
    """
    words, groups = int(weight_info.shape[-1]), int(scales_info.shape[-1])
    for group in (64, 32, 128):
        cols = groups * group
        if (words * 32) % cols == 0 and (bits := words * 32 // cols) in (2, 3, 4, 5, 6, 8):
            return bits, group
    raise MlxedgeError("cannot tell the bits and group size of a quantized tensor; the checkpoint's config "
                       "lacks its 'quantization' entry.")


def kv_cache_plan(config: dict, context_length: int, dtype_bytes: int,
                  prefill_chunk: int = DEFAULT_PREFILL_CHUNK, kv_bits: Optional[int] = None) -> dict:
    """Peak KV cache bytes at `context_length`: 2 (K and V) × kv_heads × head_dim × tokens × dtype_bytes per layer.

    Tokens per layer: the context rounded up to mlx-lm's 256-token allocation step. A layer that attends to a
    sliding window keeps the window, but mlx-lm's RotatingKVCache holds window − 1 + chunk tokens while a
    prefill chunk goes through (measured), so that is its peak. Sliding layers are read from `layer_types` ("sliding_attention")
    or, failing that, gemma3's `sliding_window_pattern` (every pattern-th layer is global). Anything else is
    taken as full attention on every layer: an upper bound (e.g. gemma2 configs without `layer_types`, for
    which mlx-lm allocates full caches anyway).
    kv_bits (4 or 8): full layers hold mlx-lm's QuantizedKVCache — packed values plus a scale and a bias (compute
    dtype) per group of 64 (32 when head_dim is not a multiple of 64) — while sliding layers stay float.
    """
    cfg = _text_config(config)
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    full_tokens = -(-int(context_length) // KV_STEP) * KV_STEP
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    pattern = cfg.get("sliding_window_pattern")
    sliding = 0  # counted, not listed per layer: the arithmetic stays instant for any layer count
    if window:
        if isinstance(layer_types, list) and len(layer_types) == layers:
            sliding = sum(t == "sliding_attention" for t in layer_types)
        elif isinstance(pattern, int) and pattern > 0:
            sliding = layers - layers // pattern
    per_token = 2 * kv_heads * head_dim * dtype_bytes
    full_per_token = per_token
    if kv_bits:
        group = 64 if head_dim % 64 == 0 else 32
        full_per_token = 2 * kv_heads * (head_dim * int(kv_bits) // 8 + 2 * (head_dim // group) * dtype_bytes)
    chunk = min(int(prefill_chunk), int(context_length))
    sliding_tokens = min(full_tokens, int(window) - 1 + chunk) if sliding else 0
    total = sliding * sliding_tokens * per_token + (layers - sliding) * full_tokens * full_per_token
    return {"bytes": total, "layers": layers, "sliding_layers": sliding, "kv_bits": kv_bits,
            "kv_heads": kv_heads, "head_dim": head_dim, "tokens_per_full_layer": full_tokens,
            "bytes_per_token_per_layer": per_token}


def activation_plan(config: dict, context_length: int, dtype_bytes: int,
                    prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> dict:
    """Transient bytes of one prefill chunk at the end of the context.

    residual stream (input, normed input, output of a layer) + the larger of the attention transient
    (q, k, v, output and the fp32 scores of the chunk against the whole context) and the MLP transient
    (gate, up and their product) + the fp32 logits of the chunk (vocab × chunk × 4).
    """
    cfg = _text_config(config)
    chunk = min(int(prefill_chunk), int(context_length))
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    inter = int(cfg.get("intermediate_size") or 4 * hidden)
    vocab = int(cfg["vocab_size"])
    residual = 3 * chunk * hidden * dtype_bytes
    scores = heads * chunk * int(context_length) * 4
    attention = chunk * (2 * heads + 2 * kv_heads) * head_dim * dtype_bytes + scores
    mlp = 3 * chunk * inter * dtype_bytes
    logits = vocab * chunk * 4
    return {"bytes": residual + max(attention, mlp) + logits, "chunk": chunk, "residual": residual,
            "attention_scores": scores, "attention": attention, "mlp": mlp, "logits": logits}


def make_plan(config: dict, tensor_infos: Mapping, *, bits: Optional[int], group_size: int, dtype_bytes: int,
              context_length: int, budget, quantized: Optional[dict] = None, keep: Optional[set] = None,
              prefill_chunk: int = DEFAULT_PREFILL_CHUNK, overhead_bytes: Optional[int] = None,
              kv_bits: Optional[int] = None) -> MemoryPlan:
    """The memory plan of a checkpoint (config + tensor headers) at the given settings; reads no weight.

    bits:           None keeps the checkpoint's precision; 4 or 8 quantizes (see `weight_plan`).
    dtype_bytes:    bytes per element of the compute dtype (unquantized tensors, scales/biases, KV cache).
    budget:         a Budget, or bytes / a size string.
    quantized:      the checkpoint's mlx-lm quantization dict, for checkpoints stored quantized.
    keep:           names the architecture keeps (the loader knows them after sanitize), optional.
    overhead_bytes: runtime baseline; default `runtime_overhead_bytes()`.
    kv_bits:        4 or 8 for a quantized KV cache (see `kv_cache_plan`).
    """
    if not isinstance(budget, Budget):
        budget = Budget(parse_size(budget), "override")
    weights = weight_plan(config, tensor_infos, bits=bits, group_size=group_size, dtype_bytes=dtype_bytes,
                          quantized=quantized, keep=keep)
    kv = kv_cache_plan(config, context_length, dtype_bytes, prefill_chunk, kv_bits=kv_bits)
    act = activation_plan(config, context_length, dtype_bytes, prefill_chunk)
    overhead = runtime_overhead_bytes() if overhead_bytes is None else int(overhead_bytes)
    total = weights["bytes"] + kv["bytes"] + act["bytes"] + overhead
    settings = {"bits": bits, "group_size": group_size, "dtype_bytes": dtype_bytes,
                "context_length": int(context_length), "prefill_chunk": int(prefill_chunk),
                "stored_quantized": weights["stored_quantized"]}
    if kv_bits:
        settings["kv_bits"] = kv_bits
    return MemoryPlan(weight_bytes=weights["bytes"], kv_cache_bytes=kv["bytes"], activation_bytes=act["bytes"],
                      overhead_bytes=overhead, total_bytes=total, budget_bytes=budget.bytes,
                      budget_source=budget.source, fits=total <= budget.bytes,
                      breakdown={"weights": weights, "kv_cache": kv, "activations": act}, settings=settings)


def _candidates(bits: Optional[int], context_length: int, prequantized: bool) -> list:
    """(bits, context) settings to try, best first: keep the asked context as long as possible, and at each
    context the highest precision that is not above the one asked for."""
    if prequantized and bits is None:
        bit_options = [None]  # keep as stored; mlxedge does not requantize unless asked
    else:
        ceiling = bits if bits is not None else 16
        bit_options = ([None] if bits is None else []) + [b for b in SUGGESTED_BITS if b <= ceiling]
    contexts = [int(context_length)]
    while contexts[-1] // 2 >= MIN_SUGGESTED_CONTEXT:
        contexts.append(contexts[-1] // 2)
    return [(b, c) for c in contexts for b in bit_options]


def suggest_fitting(config: dict, tensor_infos: Mapping, *, bits: Optional[int], group_size: int, dtype_bytes: int,
                    context_length: int, budget, **kwargs) -> list:
    """Settings that fit the budget, best quality first:
    [{"bits", "context_length", "total_bytes", "stored_quantized"}, ...].

    Tries the asked context, then halves it down to 512; at each context 8-bit then 4-bit (or, when no bits
    were asked, float first), never above the precision asked for. The asked setting itself is included
    when it fits.
    """
    out = []
    prequantized = bool(kwargs.get("quantized"))
    for b, c in _candidates(bits, context_length, prequantized):
        plan = make_plan(config, tensor_infos, bits=b, group_size=group_size, dtype_bytes=dtype_bytes,
                         context_length=c, budget=budget, **kwargs)
        if plan.fits:
            out.append({"bits": b, "context_length": c, "total_bytes": plan.total_bytes,
                        "stored_quantized": plan.settings["stored_quantized"]})
    return out


def _describe_setting(s: dict) -> str:
    bits = f"bits={s['bits']}" if s["bits"] is not None else (
        "bits=None (as stored)" if s.get("stored_quantized") else "bits=None (float)")
    return f"{bits} context_length={s['context_length']} ({format_bytes(s['total_bytes'])})"


def auto_fit(config: dict, tensor_infos: Mapping, *, bits: Optional[int], group_size: int, dtype_bytes: int,
             context_length: int, budget, **kwargs) -> MemoryPlan:
    """The plan of the best setting that fits (see `suggest_fitting`); its `note` says what was chosen.

    Raises MemoryBudgetError when nothing down to 4-bit and a 512-token context fits.
    """
    return check_plan(config, tensor_infos, bits=bits, group_size=group_size, dtype_bytes=dtype_bytes,
                      context_length=context_length, budget=budget, auto_fit=True, **kwargs)


def _chosen_plan(asked: MemoryPlan, best: dict, config: dict, tensor_infos: Mapping, **kwargs) -> MemoryPlan:
    plan = make_plan(config, tensor_infos, bits=best["bits"], context_length=best["context_length"], **kwargs)
    plan.note = (f"auto-fit: chose {_describe_setting(best)} instead of the asked "
                 f"{asked.summary().split(':')[0]} "
                 f"({format_bytes(asked.total_bytes)}), to fit the {format_bytes(plan.budget_bytes)} budget "
                 f"({plan.budget_source}).")
    return plan


def _refusal(plan: MemoryPlan, fitting: list, limit: int = 3) -> str:
    msg = (f"the model needs {plan.summary()}, but the memory budget is {format_bytes(plan.budget_bytes)} "
           f"({plan.budget_source}); ")
    if fitting:
        msg += ("settings that fit: " + "; ".join(_describe_setting(s) for s in fitting[:limit])
                + ". Pass one of them, or auto_fit=True (--auto-fit) to pick the best.")
    else:
        msg += ("nothing down to 4-bit and a 512-token context fits; free memory or raise memory_budget "
                "(--memory-budget).")
    return msg


def check_plan(config: dict, tensor_infos: Mapping, *, bits: Optional[int], group_size: int, dtype_bytes: int,
               context_length: int, budget, auto_fit: bool = False, **kwargs) -> MemoryPlan:
    """What `load` calls before reading any weight: the plan if it fits; with auto_fit the best plan that
    fits (its `note` says which); otherwise MemoryBudgetError naming the settings that would fit."""
    common = dict(group_size=group_size, dtype_bytes=dtype_bytes, budget=budget, **kwargs)
    plan = make_plan(config, tensor_infos, bits=bits, context_length=context_length, **common)
    if plan.fits:
        return plan
    fitting = suggest_fitting(config, tensor_infos, bits=bits, context_length=context_length, **common)
    if auto_fit and fitting:
        return _chosen_plan(plan, fitting[0], config, tensor_infos, **common)
    raise MemoryBudgetError(_refusal(plan, fitting))


# ------------------------------------------------------------------------------------- generation guards

@dataclass(frozen=True)
class ContextDecision:
    """How the KV cache is to be kept: "full" (every token, within the plan) or "rotating" (last `window`)."""

    mode: str
    window: int
    tokens_needed: int


def check_generation_context(prompt_tokens: int, max_tokens: int, context_length: int, *,
                             rotating: bool = False) -> ContextDecision:
    """Check prompt + max_tokens against the planned context before generating.

    Fits: mode "full". Too long and rotating=True: mode "rotating" with a window of `context_length` (the KV
    cache keeps the latest tokens, memory stays at the plan). Too long otherwise: GenerationError saying
    by how much and what to change.
    """
    if prompt_tokens < 0 or max_tokens < 0:
        raise GenerationError(f"prompt_tokens and max_tokens must not be negative (got {prompt_tokens}, {max_tokens}).")
    needed = int(prompt_tokens) + int(max_tokens)
    if needed <= context_length:
        return ContextDecision("full", int(context_length), needed)
    if rotating:
        return ContextDecision("rotating", int(context_length), needed)
    if prompt_tokens > context_length:
        raise GenerationError(
            f"the prompt has {prompt_tokens} tokens but the model was planned for a {context_length}-token context; "
            f"shorten the prompt, load with context_length={needed} or more, or ask for a rotating KV window.")
    raise GenerationError(
        f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = {needed} exceeds the planned "
        f"{context_length}-token context; use max_tokens={context_length - prompt_tokens} or less, load with "
        f"context_length={needed} or more, or ask for a rotating KV window.")


class _MlxMetal:
    """The slice of MLX that `wired_limit` uses; tests substitute a fake with the same methods."""

    def is_available(self) -> bool:
        import mlx.core as mx

        return bool(mx.metal.is_available())

    def device_info(self) -> dict:
        import mlx.core as mx

        return dict(mx.device_info())

    def set_wired_limit(self, limit: int) -> int:
        import mlx.core as mx

        return int(mx.set_wired_limit(int(limit)))

    def synchronize(self) -> None:
        import mlx.core as mx

        mx.synchronize()


@contextmanager
def wired_limit(plan_bytes: int, *, metal=None) -> Iterator[Optional[int]]:
    """Keep the plan's bytes wired (resident) on the GPU for the duration of the block, then restore.

    On macOS with Metal: set the wired limit to min(plan_bytes, the recommended working set) on enter, and
    on exit (also on an exception) synchronize and set it back to the previous value. Yields the limit set,
    or None where Metal is absent (a no-op) or the system refuses the limit (nothing to restore then).
    """
    metal = metal if metal is not None else _MlxMetal()
    if not metal.is_available():
        yield None
        return
    recommended = (metal.device_info() or {}).get("max_recommended_working_set_size")
    target = int(min(plan_bytes, recommended)) if recommended else int(plan_bytes)
    try:
        previous = metal.set_wired_limit(target)
    except (RuntimeError, ValueError):
        yield None
        return
    try:
        yield target
    finally:
        sync = getattr(metal, "synchronize", None)
        if sync is not None:
            sync()
        metal.set_wired_limit(previous)
