"""The kernel each matmul layer runs, chosen once when a model is loaded; the Model owns the choice.

`KernelChoice` reads MLXEDGE_KERNELS once (auto | builtin | custom | native | metal; `cpu` = native;
default auto) and finds the one candidate this device has besides MLX's built-in: the native CPU kernels
(mlxedge.cpu) where the model runs on the CPU and the extension loads, else the custom Metal kernels
(mlxedge.metal) where Metal runs. For each layer shape it hands out a `Binding`: the callable that runs up
to `decode_rows` activation rows and the one for more. `custom` (and `native`/`metal`, which also name the
backend) takes the candidate wherever it supports the shape; `auto` keeps it only where a chained
measurement on this device showed it faster (metal.selection, kept on disk per device); `builtin` never
takes it. quant/binding.py puts the bindings into the layers; a call then costs one integer compare and
one call — no environment read, string key, closure or dict lookup. `fast_ops` offers the native RMS norm,
rope and attention for the non-matmul layers (fast_layers.py binds them), on the native candidate only.
"""

from __future__ import annotations

import os
import platform
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from .metal import dispatch as metal
from .metal.kernels import MAX_ROWS
from .metal.runner import MetalRunner
from .metal.selection import Selector, WithReference
from .paths import cache_root

ENV_VAR = "MLXEDGE_KERNELS"
MODES = ("auto", "builtin", "custom", "native", "metal")
ALIASES = {"cpu": "native"}
BUILTIN, NATIVE, METAL = "builtin", "native", "metal"
DECODE_ROWS = MAX_ROWS  # rows a decode-only kernel (Metal GEMV, fused gate·up) takes; more is prefill
ALL_ROWS = 1 << 62      # "every row count": the kernel covers prefill too
FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
_DEFAULT = object()


@dataclass(frozen=True)
class Binding:
    """What one layer calls: `decode` for up to `decode_rows` activation rows, `prefill` beyond."""

    backend: str          # what runs the decode rows: builtin | native | metal
    decode: Callable
    prefill: Optional[Callable]
    decode_rows: int
    prefill_backend: str


def read_mode(value: Optional[str] = None) -> str:
    """The kernel mode from `value` or MLXEDGE_KERNELS; an unknown one warns and means auto."""
    raw = os.environ.get(ENV_VAR, "auto") if value is None else value
    mode = raw.strip().lower() or "auto"
    mode = ALIASES.get(mode, mode)
    if mode not in MODES:
        warnings.warn(f"{ENV_VAR}={raw!r} is not one of {', '.join(MODES)}; using auto")
        return "auto"
    return mode


def _native_module():
    """mlxedge.cpu if it imports (it never raises on import, but it may be absent from this build)."""
    try:
        from . import cpu
    except ImportError:
        return None
    return cpu


def _true(fn) -> bool:
    try:
        return bool(fn())
    except Exception:
        return False


def _builtin_linear(x: mx.array, w: mx.array) -> mx.array:
    return x @ w.T


class KernelChoice:
    """One decision per layer shape, made at load: candidate (native CPU or custom Metal) or MLX built-in.

    metal_runner: what runs Metal kernels (tests pass the emulator); cpu: the native-kernel module
    (None: none; default: mlxedge.cpu); selector: auto mode's per-device verdict cache (default: the
    process's, so two loads in one process bind alike even when a busy machine keeps verdicts off disk).
    """

    def __init__(self, mode: Optional[str] = None, *, metal_runner=None, cpu=_DEFAULT,
                 selector: Optional[Selector] = None):
        self.mode = read_mode(mode)
        self._metal = metal_runner if metal_runner is not None else MetalRunner()
        self._cpu = _native_module() if cpu is _DEFAULT else cpu
        self._selector = selector
        self._verdicts = {}  # shape key -> bool, so a shape is measured once per choice
        self._bindings = {}  # layer shape -> Binding
        self.verdicts = {"measured": 0, "reused": 0}  # auto mode: shapes timed now vs read from the cache
        self.candidate = self._find_candidate()

    # ---------------------------------------------------------------------------------------- device

    def _native_ok(self) -> bool:
        return self._cpu is not None and _true(self._cpu.available)

    def _find_candidate(self) -> Optional[str]:
        if self.mode == BUILTIN:
            return None
        native, metal_ok = self._native_ok(), _true(self._metal.available)
        if self.mode in (NATIVE, METAL):
            if (native if self.mode == NATIVE else metal_ok):
                return self.mode
            warnings.warn(f"{ENV_VAR}={self.mode}: the {self.mode} kernels are not available here; "
                          "using MLX's built-in kernels")
            return None
        if native and mx.default_device().type == mx.DeviceType.cpu:
            return NATIVE
        if metal_ok:
            return METAL
        return None

    @property
    def backend(self) -> str:
        """What runs instead of MLX's built-in kernels, in words (e.g. 'native cpu (avx2+fma, 2 threads)')."""
        if self.candidate == NATIVE:
            text = _describe(self._cpu)
            return text if text.startswith("native") else f"native cpu ({text})"
        if self.candidate == METAL:
            return f"custom metal ({self._metal.device_key})"
        return "mlx built-in"

    def _device_key(self) -> str:
        if self.candidate == NATIVE:
            return f"native {platform.machine()} {_describe(self._cpu)}"
        return str(self._metal.device_key)

    def _native_supports(self, dtype, bits, group_size) -> bool:
        try:
            return bool(self._cpu.supports(dtype, bits, group_size))
        except Exception:
            return False

    def _native_supports_matmul(self, dtype) -> bool:
        """Float matmul: `supports_matmul(dtype)` where the backend has it, else any of MLX's float dtypes."""
        check = getattr(self._cpu, "supports_matmul", None)
        if check is None:
            return dtype in FLOAT_DTYPES
        try:
            return bool(check(dtype))
        except Exception:
            return False

    # ---------------------------------------------------------------------------------------- shapes

    def _memo(self, key: tuple, make):
        """One Binding per distinct layer shape (bindings hold no arrays: layers pass theirs per call)."""
        if key not in self._bindings:
            self._bindings[key] = make()
        return self._bindings[key]

    def quantized(self, w: mx.array, scales: mx.array, biases, *, group_size: int, bits: int) -> Binding:
        """x @ dequantize(w).T for MLX's affine layout (w: [N, K*bits/32] uint32)."""
        key = ("qmm", w.shape, w.dtype, scales.shape, scales.dtype, biases is None, group_size, bits)
        return self._memo(key, lambda: self._quantized(w, scales, biases, group_size, bits))

    def _quantized(self, w, scales, biases, group_size, bits) -> Binding:
        builtin = partial(mx.quantized_matmul, transpose=True, group_size=group_size, bits=bits)
        n, k, dtype = w.shape[0], w.shape[1] * 32 // bits, scales.dtype
        if self.candidate == METAL and metal.supported(bits, group_size, w, scales, biases):
            fn, rows = metal.QMVLauncher(self._metal, n, k, bits, group_size, dtype), DECODE_ROWS
        elif (self.candidate == NATIVE and biases is not None and w.dtype == mx.uint32
              and self._native_supports(dtype, bits, group_size)):
            fn, rows = partial(self._cpu.quantized_matmul, group_size=group_size, bits=bits), ALL_ROWS
        else:
            return Binding(BUILTIN, builtin, builtin, 0, BUILTIN)
        key = f"qmm:{self.candidate}:bits{bits}:group{group_size}:{_name(dtype)}:n{n}:k{k}"
        f32 = [a.astype(mx.float32) if a is not None else None for a in (scales, biases)]
        if not self._wins(key, k, dtype, lambda x: fn(x, w, scales, biases), lambda x: builtin(x, w, scales, biases),
                          reference=lambda x: builtin(x.astype(mx.float32), w, *f32)):
            return Binding(BUILTIN, builtin, builtin, 0, BUILTIN)
        return self._binding(fn, rows, builtin)

    def gate_up(self, gate: tuple, up: tuple, *, group_size: int, bits: int) -> Optional[Binding]:
        """silu(x @ Wg.T) * (x @ Wu.T) in one fused kernel, or None where no fused kernel runs (or wins)."""
        key = ("gate_up", *((a.shape, a.dtype) if a is not None else None for a in (*gate, *up)), group_size, bits)
        return self._memo(key, lambda: self._gate_up(gate, up, group_size, bits))

    def _gate_up(self, gate, up, group_size, bits) -> Optional[Binding]:
        (wg, sg, bg), (wu, su, bu) = gate, up
        if wg.shape != wu.shape or sg.shape != su.shape or sg.dtype != su.dtype or bg is None or bu is None:
            return None
        n, k, dtype = wg.shape[0], wg.shape[1] * 32 // bits, sg.dtype
        if (self.candidate == METAL and metal.supported(bits, group_size, wg, sg, bg)
                and metal.supported(bits, group_size, wu, su, bu)):
            fn = metal.GateUpLauncher(self._metal, n, k, bits, group_size, dtype)
        elif self.candidate == NATIVE and wg.dtype == mx.uint32 and self._native_supports(dtype, bits, group_size):
            fn = partial(self._cpu.gate_up_silu, group_size=group_size, bits=bits)
        else:
            return None
        # the alternative is not fusing: each projection through its own binding, then silu(g) * u
        g = self.quantized(wg, sg, bg, group_size=group_size, bits=bits).decode
        u = self.quantized(wu, su, bu, group_size=group_size, bits=bits).decode
        key = f"gate_up:{self.candidate}:bits{bits}:group{group_size}:{_name(dtype)}:n{n}:k{k}"
        g32, u32 = [(w_, s_.astype(mx.float32), b_.astype(mx.float32)) for w_, s_, b_ in (gate, up)]
        q32 = partial(mx.quantized_matmul, transpose=True, group_size=group_size, bits=bits)
        if not self._wins(key, k, dtype, lambda x: fn(x, gate, up),
                          lambda x: metal.swiglu(g(x, wg, sg, bg), u(x, wu, su, bu)),
                          reference=lambda x: metal.swiglu(q32(x.astype(mx.float32), *g32),
                                                           q32(x.astype(mx.float32), *u32))):
            return None
        return Binding(self.candidate, fn, None, DECODE_ROWS, BUILTIN)

    def projections(self, parts: tuple, *, group_size: int, bits: int) -> Optional[Binding]:
        """[x @ W_i.T for each (w, scales, biases) part] in one native call (a layer's q, k and v projections,
        quantized alike), or None where no such kernel runs or, in auto, it does not beat each part through
        its own binding. Its decode callable takes (x, parts) and returns one array per part."""
        key = ("projections", *((a.shape, a.dtype) for part in parts for a in part), group_size, bits)
        return self._memo(key, lambda: self._projections(parts, group_size, bits))

    def _projections(self, parts, group_size, bits) -> Optional[Binding]:
        if (self.candidate != NATIVE or not hasattr(self._cpu, "quantized_matmuls") or len(parts) < 2
                or any(b is None or w.dtype != mx.uint32 for w, _, b in parts)):
            return None
        words, dtype = parts[0][0].shape[1], parts[0][1].dtype
        if (any(w.shape[1] != words or s.dtype != dtype for w, s, _ in parts)
                or not self._native_supports(dtype, bits, group_size)):
            return None
        k = words * 32 // bits
        fn = partial(self._cpu.quantized_matmuls, group_size=group_size, bits=bits)
        each = [self.quantized(*part, group_size=group_size, bits=bits).decode for part in parts]
        q32 = partial(mx.quantized_matmul, transpose=True, group_size=group_size, bits=bits)
        joined = partial(mx.concatenate, axis=-1)  # one array to time and compare
        n = "+".join(str(w.shape[0]) for w, _, _ in parts)
        key = f"projections:{self.candidate}:bits{bits}:group{group_size}:{_name(dtype)}:n{n}:k{k}"
        if not self._wins(key, k, dtype, lambda x: joined(fn(x, parts)),
                          lambda x: joined([f(x, *part) for f, part in zip(each, parts)]),
                          reference=lambda x: joined([q32(x.astype(mx.float32), w, s.astype(mx.float32),
                                                          b.astype(mx.float32)) for w, s, b in parts])):
            return None
        return Binding(self.candidate, fn, None, DECODE_ROWS, BUILTIN)

    def linear(self, w: mx.array) -> Binding:
        """x @ w.T for a float weight [N, K] (unquantized Linear, tied float head)."""
        return self._memo(("matmul", w.shape, w.dtype), lambda: self._linear(w))

    def _linear(self, w) -> Binding:
        n, k, dtype = w.shape[0], w.shape[1], w.dtype
        if self.candidate == NATIVE and self._native_supports_matmul(dtype):
            fn = self._cpu.matmul
            key = f"matmul:{self.candidate}:{_name(dtype)}:n{n}:k{k}"
            if self._wins(key, k, dtype, lambda x: fn(x, w), lambda x: _builtin_linear(x, w)):
                return self._binding(fn, ALL_ROWS, _builtin_linear)
        return Binding(BUILTIN, _builtin_linear, _builtin_linear, 0, BUILTIN)

    def fast_ops(self, *, heads: int, kv_heads: int, head_dim: int, dtype=mx.float32):
        """Native RMS norm / rope / attention for the model's non-matmul layers (fast_layers.FastOps), or
        None where they are not the choice: only the native CPU candidate has them (on Metal, MLX's fast
        ops are real kernels); `auto` keeps each one that a chained measurement on this device, at a
        decode step's shape for these head counts, showed faster than MLX's own."""
        from .fast_layers import FastOps

        cpu = self._cpu
        if self.candidate != NATIVE or not all(hasattr(cpu, n) for n in ("rms_norm", "rope", "sdpa")):
            return None
        if dtype not in FLOAT_DTYPES:
            return None
        hidden, ctx, tag = heads * head_dim, 256, f"{_name(dtype)}:h{heads}:kv{kv_heads}:d{head_dim}"
        keys = mx.random.split(mx.random.key(3), 4)
        x = mx.random.normal((1, 1, hidden), key=keys[0]).astype(dtype)
        w = mx.ones((hidden,), dtype=dtype)
        q = mx.random.normal((1, heads, 1, head_dim), key=keys[1]).astype(dtype)
        kv = [mx.random.normal((1, kv_heads, ctx, head_dim), key=k).astype(dtype) for k in keys[2:]]
        scale = head_dim ** -0.5
        norm_ok = self._wins_with(f"rms_norm:native:{tag}", lambda: cpu.rms_norm(x, w, 1e-5),
                                  lambda: mx.fast.rms_norm(x, w, 1e-5))
        rope_ok = self._wins_with(
            f"rope:native:{tag}",
            lambda: cpu.rope(q, head_dim, traditional=False, base=10000.0, scale=1.0, offset=ctx),
            lambda: mx.fast.rope(q, head_dim, traditional=False, base=10000.0, scale=1.0, offset=ctx))
        sdpa_ok = self._wins_with(f"sdpa:native:{tag}:ctx{ctx}", lambda: cpu.sdpa(q, *kv, scale=scale, causal=False),
                                  lambda: mx.fast.scaled_dot_product_attention(q, *kv, scale=scale, mask=None))
        if not (norm_ok or rope_ok or sdpa_ok):
            return None
        return FastOps(NATIVE, rms_norm=cpu.rms_norm if norm_ok else None, rope=cpu.rope if rope_ok else None,
                       sdpa=cpu.sdpa if sdpa_ok else None)

    def logits_filter(self):
        """The native sampling filters (mlxedge.cpu.filter_logits) where the native candidate has them and,
        in `auto`, a chained measurement at a 32k vocabulary showed them faster; else None (MLX ops)."""
        cpu = self._cpu
        if self.candidate != NATIVE or not hasattr(cpu, "filter_logits"):
            return None
        x = mx.random.normal((1, 32768), key=mx.random.key(5)) * 3

        def finite(y):  # the measurement compares finite outputs: removed tokens (-inf) become -1
            return mx.where(mx.isinf(y), -1.0, y)

        def builtin():
            from .generate.sampler import SamplingParams, make_sampler

            return finite(make_sampler(SamplingParams(temperature=0.8, top_k=40, top_p=0.9)).process(x))

        if not self._wins_with("filter_logits:native:v32768", lambda: finite(cpu.filter_logits(
                x, temperature=0.8, top_k=40, top_p=0.9, min_p=0.0)), builtin):
            return None
        return cpu.filter_logits

    def _wins_with(self, key: str, run_candidate, run_builtin) -> bool:
        """custom/native/metal modes: always; auto: the measured (or cached) verdict for `key` on this device,
        for thunks that carry their own inputs."""
        if self.mode != "auto":
            return True
        if key not in self._verdicts:
            if self._selector is None:
                self._selector = default_selector()
            self._verdicts[key] = self._decide(key, run_candidate, run_builtin)
        return self._verdicts[key]

    def _decide(self, key: str, run_candidate, run_builtin) -> bool:
        """The selector's verdict for `key`, counted as measured now or read from the cache."""
        before = getattr(self._selector, "measured", 0)
        verdict = self._selector.prefers_custom(self._device_key(), key, run_candidate, run_builtin)
        self.verdicts["measured" if getattr(self._selector, "measured", 0) > before else "reused"] += 1
        return verdict

    def _binding(self, fn, rows: int, builtin) -> Binding:
        if rows == ALL_ROWS:
            return Binding(self.candidate, fn, fn, ALL_ROWS, self.candidate)
        return Binding(self.candidate, fn, builtin, rows, BUILTIN)

    def _wins(self, key: str, k: int, dtype, run_candidate, run_builtin, reference=None) -> bool:
        """custom/native/metal modes: always; auto: the measured verdict for this shape on this device.
        reference(x): what the candidate must agree with when it is not the built-in itself (half precision:
        the built-in in float32)."""
        x = mx.random.normal((1, k), key=mx.random.key(0)).astype(dtype)  # lazy: evaluated only if measured
        builtin = lambda: run_builtin(x)  # noqa: E731
        if reference is not None and dtype != mx.float32:
            builtin = WithReference(builtin, lambda: reference(x))
        return self._wins_with(key, lambda: run_candidate(x), builtin)

    def summary(self, report: dict) -> dict:
        """info["kernels"]: the mode, what runs instead of the built-ins, layer counts per backend, and (auto)
        how many shape verdicts were measured at this load vs read from the per-device cache."""
        summary = {"mode": self.mode, "backend": self.backend, "layers": report}
        if self.mode == "auto":
            summary["verdicts"] = dict(self.verdicts)
        return summary


_selector: Optional[Selector] = None


def selection_file() -> Path:
    """Where measured kernel verdicts are kept: $MLXEDGE_KERNEL_CACHE, else in the cache root (mlxedge.paths)."""
    explicit = os.environ.get("MLXEDGE_KERNEL_CACHE")
    return Path(explicit) if explicit else cache_root() / "kernel-selection.json"


def default_selector() -> Selector:
    """The process's verdict cache (over the per-device file), so every load in a process decides alike."""
    global _selector
    if _selector is None:
        _selector = Selector(selection_file())
    return _selector


def _describe(cpu) -> str:
    try:
        return str(cpu.describe())
    except Exception:
        return "native"


def _name(dtype) -> str:
    return str(dtype).split(".")[-1]
