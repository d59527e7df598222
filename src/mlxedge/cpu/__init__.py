"""Native CPU kernels (an MLX C++ extension): quantized matmul (also of several weights in one call, for
q·k·v), fused gate*up(silu), float matmul, and the rest of a decode step: RMS norm, rotary embedding and
attention (mx.fast's ops, which on MLX's CPU backend expand into their reference graphs).

The operations return lazy MLX arrays made by a custom Primitive that runs only on the CPU stream
(``mx.cpu``), so they compose with MLX graphs and ``async_eval`` like built-ins. Importing this module
never raises: when the compiled extension is missing or fails its self-check, ``available()`` is False
and ``describe()`` says why. Environment, read once at import:

- ``MLXEDGE_CPU_ISA``: ``auto`` (default), ``avx512vnni``, ``avx512``, ``avx2`` or ``scalar`` (the portable path;
  arm64 runs it with NEON as the compiler's baseline). ``avx512vnni`` runs the 4- and 8-bit decode GEMV in integer
  dot products on activations split exactly into 8-bit digits; ``avx512`` the same GEMV in float.
- ``MLXEDGE_CPU_THREADS``: size of the persistent thread pool (default: the cores this process may use).
- ``MLXEDGE_CPU_BLAS``: ``openblas`` (default; the scipy-openblas32 wheel, for prefill GEMM tiles) or
  ``none`` (the built-in micro-kernel).
- ``MLXEDGE_CPU_SPIN``: pause-loop iterations an idle pool worker spins before sleeping (default: 2000
  where the cores outnumber the pool by two, else 0 — spinning steals the core the decode loop needs).
- ``MLXEDGE_CPU_YIELD_US``: then how long it keeps polling for work while yielding its core to any other
  runnable thread (default 300 µs; 0 sleeps at once — a sleeping worker takes 10-30 µs to wake on a VM).
- ``MLXEDGE_CPU_PARALLEL_MIN_KB``: a GEMV reading fewer KiB than this runs on one thread (default 128:
  below it, handing half to a worker costs more than it saves).
- ``MLXEDGE_CPU_EXT``: path of an alternative build of the extension (the sanitizer build uses it).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import mlx.core as mx  # loads libmlx before the extension, which links against it

_ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "neon": 3, "avx512": 4, "avx512vnni": 5}
_ISA_NAMES = {v: k for k, v in _ISAS.items()}
_FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)

_ext = None
_reason = ""
_checked: bool | None = None
_blas_on = False


def _load_extension():
    path = os.environ.get("MLXEDGE_CPU_EXT")
    if path:
        spec = importlib.util.spec_from_file_location(__name__ + "._ext", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"MLXEDGE_CPU_EXT={path} is not a loadable extension")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    # not `from . import _ext`: the package's own `_ext = None` would shadow the submodule
    return importlib.import_module(__name__ + "._ext")


def _threads_default() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _openblas_path() -> str | None:
    try:
        import scipy_openblas32
    except ImportError:
        return None
    lib_dir = scipy_openblas32.get_lib_dir()
    for name in sorted(os.listdir(lib_dir)):
        if name.startswith("lib" + scipy_openblas32.get_library()) and (".so" in name or name.endswith(".dylib")):
            return os.path.join(lib_dir, name)
    return None


def _configure(isa: str | None = None, threads: int | None = None, blas: str | None = None) -> None:
    """Set the ISA path, pool size and GEMM backend (import does this from the environment)."""
    global _blas_on
    if _ext is None:
        return
    if isa is not None:
        if isa not in _ISAS:
            raise ValueError(f"MLXEDGE_CPU_ISA must be one of {', '.join(_ISAS)}, got {isa!r}")
        _ext.init(_ISAS[isa], threads if threads is not None else _ext.threads() or _threads_default())
    elif threads is not None:
        _ext.init(_ext.isa(), threads)
    if blas is not None:
        if blas not in ("openblas", "none"):
            raise ValueError(f"MLXEDGE_CPU_BLAS must be openblas or none, got {blas!r}")
        if blas == "openblas" and not _ext.has_blas():
            path = _openblas_path()
            if path:
                _ext.set_blas(path)
        _blas_on = _ext.use_blas(blas == "openblas")


try:
    _ext = _load_extension()
    _configure(
        isa=os.environ.get("MLXEDGE_CPU_ISA", "auto").strip().lower() or "auto",
        threads=int(os.environ.get("MLXEDGE_CPU_THREADS", "0") or 0) or _threads_default(),
        blas=os.environ.get("MLXEDGE_CPU_BLAS", "openblas").strip().lower() or "openblas",
    )
except Exception as e:  # a missing or broken build must not break the package
    _ext = None
    _reason = f"{type(e).__name__}: {e}"


def _self_check() -> str:
    """Run each kernel once on a small problem and compare with MLX's built-ins ('' when fine)."""
    try:
        k = mx.random.key(0)
        kx, kw = mx.random.split(k)
        x = mx.random.normal((2, 64), key=kx)
        w = mx.random.normal((24, 64), key=kw)
        wq, s, b = mx.quantize(w, group_size=32, bits=4)
        with mx.stream(mx.cpu):
            want = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=32, bits=4)
            got = quantized_matmul(x, wq, s, b, group_size=32, bits=4)
            fwant = x @ w.T
            fgot = matmul(x, w)
        if not mx.allclose(got, want, rtol=1e-4, atol=1e-4).item():
            return "self-check failed: quantized_matmul disagrees with mx.quantized_matmul"
        if not mx.allclose(fgot, fwant, rtol=1e-4, atol=1e-4).item():
            return "self-check failed: matmul disagrees with x @ w.T"
    except Exception as e:
        return f"self-check raised {type(e).__name__}: {e}"
    return ""


def available() -> bool:
    """True when the extension is built, loads, and computes correctly on this CPU."""
    global _checked, _reason
    if _ext is None:
        return False
    if _checked is None:
        problem = _self_check()
        _checked = not problem
        _reason = problem
    return _checked


def describe() -> str:
    """One line for `mlxedge info` / bench: which native path runs, or why none does."""
    if not available():
        return f"unavailable: {_reason or 'the extension is not built'}"
    isa = {
        "avx512vnni": "avx-512 vnni 4-bit gemv, avx-512 gemv, avx2+fma",
        "avx512": "avx-512 gemv, avx2+fma",
        "avx2": "avx2+fma",
        "scalar": "portable scalar",
        "neon": "neon",
    }[_ISA_NAMES[_ext.isa()]]
    gemm = "openblas gemm tiles" if _blas_on else "built-in gemm"
    return f"native cpu ({isa}, {_ext.threads()} threads, {gemm})"


def supports(x_dtype, bits: int, group_size: int) -> bool:
    """Whether the native kernels take this activation dtype and quantization (pure Python)."""
    return x_dtype in _FLOAT_DTYPES and bits in (4, 8) and group_size in (32, 64, 128)


def quantized_matmul(x, w, scales, biases, *, group_size: int, bits: int) -> mx.array:
    """mx.quantized_matmul(x, w, scales, biases, transpose=True, ...) for MLX's affine layout, on mx.cpu."""
    return _ext.quantized_matmul(x, w, scales, biases, group_size=group_size, bits=bits)


def quantized_matmuls(x, weights, *, group_size: int, bits: int) -> list:
    """[x @ deq(W_i).T for each (w, scales, biases) in `weights`]: one native call for weights quantized alike
    (a layer's q, k and v projections), one output array each, on mx.cpu."""
    return _ext.quantized_matmuls(x, [tuple(t) for t in weights], group_size=group_size, bits=bits)


def gate_up_silu(x, gate: tuple, up: tuple, *, group_size: int, bits: int) -> mx.array:
    """silu(x @ deq(Wg).T) * (x @ deq(Wu).T), fused for decode; gate and up are (w, scales, biases)."""
    return _ext.gate_up_silu(x, tuple(gate), tuple(up), group_size=group_size, bits=bits)


def matmul(x, w) -> mx.array:
    """x @ w.T for a float weight w [N, K] (nn.Linear layout), on mx.cpu."""
    return _ext.matmul(x, w)



# The ops below exist only where the loaded build has them (an older or alternative build may not), so
# `hasattr(mlxedge.cpu, name)` is what callers (kernels.KernelChoice) check.


def _rms_norm(x, weight, eps: float) -> mx.array:
    """mx.fast.rms_norm(x, weight, eps) in one native pass (weight may be None), on mx.cpu."""
    return _ext.rms_norm(x, weight, float(eps))


def _rope(x, dims: int, *, traditional: bool, base, scale: float, offset: int, freqs=None) -> mx.array:
    """mx.fast.rope with an integer offset, in one native pass, on mx.cpu (x: [..., L, D])."""
    return _ext.rope(x, int(dims), traditional=bool(traditional), base=float(base) if base is not None else 0.0,
                     scale=float(scale), offset=int(offset), freqs=freqs)


def _sdpa(q, k, v, *, scale: float, causal: bool) -> mx.array:
    """mx.fast.scaled_dot_product_attention for mask None or "causal", grouped-query aware, on mx.cpu.

    q [B, Hq, Lq, D]; k, v [B, Hkv, Lk, D] (strided views such as a KV-cache slice are read in place).
    """
    return _ext.sdpa(q, k, v, scale=float(scale), causal=bool(causal))


def _filter_logits(x, *, temperature: float, top_k: int, top_p: float, min_p: float) -> mx.array:
    """transformers' sampling filters (temperature, top-k, top-p, min-p, in that order) on float32 logits
    [batch, vocab] in one native pass; removed tokens become -inf (generate/sampler.py's semantics)."""
    return _ext.filter_logits(x, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                              min_p=float(min_p))



for _name, _fn in (("rms_norm", _rms_norm), ("rope", _rope), ("sdpa", _sdpa), ("filter_logits", _filter_logits)):
    if _ext is not None and hasattr(_ext, _name):
        _fn.__name__ = _fn.__qualname__ = _name
        globals()[_name] = _fn
del _name, _fn
