"""Mutation check for the native CPU kernels: each planted bug must make the correctness checks fail.

The kernel sources (src/mlxedge/cpu/kernels/core.cpp and ops.cpp) have no MLX dependency and a C ABI, so
they are compiled here into small shared libraries, once clean and once per planted bug
(-DMLXEDGE_PLANT_<NAME>), and driven through ctypes by the same checks test_cpu_kernels.py and
test_cpu_ops.py run on the MLX extension (check_qmm, check_qmm_many, check_gate_up, check_matmul against mx.dequantize +
float64 numpy; check_rms_norm, check_rope, check_sdpa against float64 numpy). The clean build must pass
them all; every planted build must fail at least one, on the ISA paths and GEMM backends they exercise.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from test_cpu_kernels import ISAS, check_gate_up, check_matmul, check_qmm, check_qmm_many
from test_cpu_ops import check_rms_norm, check_rope, check_sdpa

KERNELS = Path(__file__).resolve().parents[1] / "src" / "mlxedge" / "cpu" / "kernels"
SOURCES = [KERNELS / "core.cpp", KERNELS / "ops.cpp"]
OPS_PLANTS = ["rope_half", "causal_off_by_one", "gqa_head", "norm_mean"]  # planted in ops.cpp
PLANTS = OPS_PLANTS + [
    "nibble_shift",
    "group_index",
    "dropped_bias",
    "off_by_one_row",
    "off_by_one_col",
    "missing_remainder",
    "race_partition",
    "prepare_race",  # a GEMV's tasks start before its activations are prepared (core.cpp's Prelude)
]
CODES = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}
ISA_CODES = {"scalar": 1, "avx2": 2, "avx512": 4, "avx512vnni": 5}

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None or sys.platform == "win32",
    reason="needs a C++ compiler to build the kernel core",
)


def _build(out_dir: Path, plant: str | None) -> Path:
    tag = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(KERNELS.iterdir()))).hexdigest()[:12]
    lib = out_dir / f"core-{plant or 'clean'}-{tag}.so"
    if not lib.exists():
        cmd = [os.environ.get("CXX", "g++"), "-O1", "-std=c++17", "-shared", "-fPIC", "-pthread",
               *map(str, SOURCES), "-o", str(lib), "-ldl"]
        if plant:
            cmd.insert(1, f"-DMLXEDGE_PLANT_{plant.upper()}")
        subprocess.run(cmd, check=True, capture_output=True)
    return lib


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    """All variants, compiled two at a time (the kernel core takes a few seconds at -O1)."""
    out = Path(os.environ.get("MLXEDGE_MUTANT_DIR") or tmp_path_factory.mktemp("cpu-mutants"))
    out.mkdir(parents=True, exist_ok=True)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as ex:
        paths = dict(zip([None, *PLANTS], ex.map(lambda p: _build(out, p), [None, *PLANTS])))
    return paths


def _openblas() -> str | None:
    import mlxedge.cpu as cpu

    return cpu._openblas_path()


class Core:
    """ctypes view of one build of the kernel core."""

    def __init__(self, path: Path, threads: int = 4):
        lib = ctypes.CDLL(str(path))
        i64, i32, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
        lib.mlxe_init.argtypes = [i32, i32]
        lib.mlxe_set_blas.argtypes = [ctypes.c_char_p]
        lib.mlxe_use_blas.argtypes = [i32]
        lib.mlxe_plant.restype = ctypes.c_char_p
        lib.mlxe_set_gemv_parallel_min_bytes.argtypes = [i64]
        lib.mlxe_set_gemv_parallel_min_bytes.restype = i64
        lib.mlxe_qmm.argtypes = [vp, i32, vp, vp, vp, i32, vp, i32, i64, i64, i64, i32, i32]
        lib.mlxe_qmm_many.argtypes = [vp, i32, i32, vp, vp, vp, i32, vp, i32, i64, vp, i64, i32, i32]
        lib.mlxe_gate_up_silu.argtypes = [vp, i32, vp, vp, vp, vp, vp, vp, i32, vp, i32, i64, i64, i64, i32, i32]
        lib.mlxe_matmul.argtypes = [vp, i32, vp, i32, vp, i32, i64, i64, i64]
        lib.mlxe_ops_plant.restype = ctypes.c_char_p
        f32 = ctypes.c_float
        lib.mlxe_rms_norm.argtypes = [vp, i32, vp, i32, vp, i32, i64, i64, f32]
        lib.mlxe_rope.argtypes = [vp, i32, vp, i64, i64, i64, i32, i32, f32, f32, i64, vp]
        lib.mlxe_sdpa.argtypes = [vp, vp, vp, i32, vp, i64, i64, i64, i64, i64, i64, vp, vp, f32, i32]
        self.lib, self.threads = lib, threads

    def plant(self) -> str:
        return (self.lib.mlxe_plant() or self.lib.mlxe_ops_plant()).decode()

    def configure(self, isa: str, blas: bool):
        self.lib.mlxe_init(ISA_CODES[isa], self.threads)
        self.lib.mlxe_set_gemv_parallel_min_bytes(0)  # split every GEMV over the pool: the partition is tested
        path = _openblas()
        if blas and path:
            self.lib.mlxe_set_blas(path.encode())
        self.lib.mlxe_use_blas(1 if blas else 0)

    @staticmethod
    def _np(a: mx.array) -> np.ndarray:
        if a.dtype == mx.bfloat16:
            return np.ascontiguousarray(np.array(a.view(mx.uint16)))
        return np.ascontiguousarray(np.array(a))

    def _out(self, shape, dtype):
        out = np.empty(shape, dtype=np.uint16 if dtype != mx.float32 else np.float32)
        out.fill(0x7E00 if dtype != mx.float32 else np.nan)  # NaN: rows a kernel skips stay visible
        return out

    @staticmethod
    def _f64(out, dtype):
        if dtype == mx.float32:
            return out.astype(np.float64)
        return np.array(mx.array(out).view(dtype).astype(mx.float32), dtype=np.float64)

    def qmm(self, x, wq, s, b, gs, bits):
        M, K, N = x.shape[0], x.shape[1], wq.shape[0]
        xa, wa, sa, ba = self._np(x), self._np(wq), self._np(s), self._np(b)
        odt = x.dtype
        out = self._out((M, N), odt)
        self.lib.mlxe_qmm(xa.ctypes.data, CODES[x.dtype], wa.ctypes.data, sa.ctypes.data, ba.ctypes.data,
                          CODES[s.dtype], out.ctypes.data, CODES[odt], M, N, K, bits, gs)
        return self._f64(out, odt)

    def qmm_many(self, x, parts, gs, bits):
        M, K, n = x.shape[0], x.shape[1], len(parts)
        xa = self._np(x)
        arrs = [[self._np(a) for a in part] for part in parts]
        outs = [self._out((M, part[0].shape[0]), x.dtype) for part in parts]
        ptrs = lambda i: (ctypes.c_void_p * n)(*[a[i].ctypes.data for a in arrs])  # noqa: E731
        out_ptrs = (ctypes.c_void_p * n)(*[o.ctypes.data for o in outs])
        rows = (ctypes.c_int64 * n)(*[part[0].shape[0] for part in parts])
        self.lib.mlxe_qmm_many(xa.ctypes.data, CODES[x.dtype], n, ptrs(0), ptrs(1), ptrs(2), CODES[parts[0][1].dtype],
                               out_ptrs, CODES[x.dtype], M, rows, K, bits, gs)
        return [self._f64(o, x.dtype) for o in outs]

    def gate_up(self, x, gate, up, gs, bits):
        M, K, N = x.shape[0], x.shape[1], gate[0].shape[0]
        arrs = [self._np(a) for a in (x, *gate, *up)]
        odt = x.dtype
        out = self._out((M, N), odt)
        p = [a.ctypes.data for a in arrs]
        self.lib.mlxe_gate_up_silu(p[0], CODES[x.dtype], p[1], p[2], p[3], p[4], p[5], p[6], CODES[gate[1].dtype],
                                   out.ctypes.data, CODES[odt], M, N, K, bits, gs)
        return self._f64(out, odt)

    def matmul(self, x, w):
        M, K, N = x.shape[0], x.shape[1], w.shape[0]
        xa, wa = self._np(x), self._np(w)
        out = self._out((M, N), mx.float32)
        self.lib.mlxe_matmul(xa.ctypes.data, CODES[x.dtype], wa.ctypes.data, CODES[w.dtype], out.ctypes.data, 0, M, N, K)
        return out.astype(np.float64)


    def rms_norm(self, x, w, eps):
        M, D = x.shape
        xa = self._np(x)
        wa = self._np(w) if w is not None else None
        out = self._out((M, D), x.dtype)
        self.lib.mlxe_rms_norm(xa.ctypes.data, CODES[x.dtype], wa.ctypes.data if wa is not None else None,
                               CODES[w.dtype] if w is not None else 0, out.ctypes.data, CODES[x.dtype], M, D, eps)
        return self._f64(out, x.dtype)

    def rope(self, x, dims, traditional, base, scale, offset, freqs):
        xa = self._np(x)  # dense copy of a strided view
        L, D = x.shape[-2], x.shape[-1]
        R = x.size // (L * D)
        out = self._out(x.shape, x.dtype)
        inv = None
        if freqs is not None:
            inv = np.ascontiguousarray(1.0 / np.array(freqs, dtype=np.float32), dtype=np.float32)
        self.lib.mlxe_rope(xa.ctypes.data, CODES[x.dtype], out.ctypes.data, R, L, D, dims, int(traditional),
                           base, scale, offset, inv.ctypes.data if inv is not None else None)
        return self._f64(out, x.dtype)

    def sdpa(self, q, k, v, scale, causal):
        B, Hq, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        qa, ka, va = self._np(q), self._np(k), self._np(v)
        strides = (ctypes.c_int64 * 3)(Hkv * Lk * D, Lk * D, D)
        out = self._out(q.shape, q.dtype)
        self.lib.mlxe_sdpa(qa.ctypes.data, ka.ctypes.data, va.ctypes.data, CODES[q.dtype], out.ctypes.data,
                           B, Hq, Hkv, Lq, Lk, D, strides, strides, scale, int(causal))
        return self._f64(out, q.dtype)


class _Caught(Exception):
    pass


def run_suite(core: Core, stop_at_first: bool = False) -> list[str]:
    """The correctness checks, on every ISA path and GEMM backend; returns the failures."""
    failures = []

    def attempt(fn, *args, **kw):
        try:
            fn(*args, **kw)
        except AssertionError as e:
            failures.append(str(e).split("\n")[0][:200])
            if stop_at_first:
                raise _Caught from None

    try:
        _suite(core, attempt)
    except _Caught:
        pass
    return failures


def _ops_suite(core: Core, attempt, isa: str) -> None:
    for M, D in ((1, 576), (7, 64), (33, 13)):
        attempt(check_rms_norm, core.rms_norm, M, D, seed=M, what=f"rms_norm[{isa}]")
    for trad in (False, True):
        for shape, dims in (((1, 9, 1, 64), 64), ((2, 3, 7, 64), 64), ((1, 2, 5, 20), 12)):
            attempt(check_rope, core.rope, shape, dims, trad, offset=5, seed=dims, what=f"rope[{isa}]")
    for B, Hq, Hkv, Lq, Lk, D in ((1, 9, 3, 1, 37, 64), (1, 6, 2, 7, 7, 32), (2, 4, 2, 5, 40, 16)):
        for causal in (False, True):
            attempt(check_sdpa, core.sdpa, B, Hq, Hkv, Lq, Lk, D, causal, seed=Lk, what=f"sdpa[{isa}]")


def check_tasks_start_after_prepare(lib, ntasks: int = 16, jobs: int = 3) -> None:
    """mlxe_parallel_for_prepared: no task runs before its prepare(ctx) has returned. prepare holds the caller
    for 20 ms outside the GIL, long enough for the workers to join (with 2 ms, a late wake-up on this VM let
    4 of 50 jobs of a build that skips the wait pass); a task that ran meanwhile saw `ready` unset. This check
    comes first in the mutation suite: the GEMVs that follow would read activations still being written."""
    import time

    task_fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64)
    prep_fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    lib.mlxe_parallel_for_prepared.argtypes = [ctypes.c_int64, task_fn, prep_fn, ctypes.c_void_p]
    for _ in range(jobs):
        ready, seen = [False], []

        def prepare(_ctx, ready=ready):
            time.sleep(0.02)
            ready[0] = True

        task, prep = task_fn(lambda _ctx, t, ready=ready, seen=seen: seen.append(ready[0])), prep_fn(prepare)
        lib.mlxe_parallel_for_prepared(ntasks, task, prep, None)
        assert len(seen) == ntasks and all(seen), f"tasks before prepare returned: {seen.count(False)} of {len(seen)}"


def _suite(core: Core, attempt) -> None:
    core.configure("scalar", False)
    attempt(check_tasks_start_after_prepare, core.lib)
    for isa in ISAS:
        core.configure(isa, False)
        _ops_suite(core, attempt, isa)
        for blas in (False, True):
            core.configure(isa, blas)
            tag = f"[{isa},{'openblas' if blas else 'builtin'}]"
            rows = (1, 3, 33) if not blas else (33,)
            for bits in (4, 8):
                for gs in (32, 64, 128):
                    for K in (gs, 3 * gs):
                        for M in rows:
                            attempt(check_qmm, core.qmm, M, 77, K, bits, gs, "float32", seed=M + K, what="qmm" + tag)
            for M in rows:
                attempt(check_gate_up, core.gate_up, M, 45, 96, 4, 32, "float32", seed=M, what="gate_up" + tag)
                attempt(check_qmm_many, core.qmm_many, M, (77, 45, 45), 192, 4, 64, "float32", seed=M, what="qmm_many" + tag)
                attempt(check_matmul, core.matmul, M, 77, 100, seed=M, what="matmul" + tag)
            # many tiles over several threads: a shared tile buffer gets overwritten mid-GEMM
            for rep in range(5):
                attempt(check_qmm, core.qmm, 33, 64 * 24 + 5, 512, 4, 64, "float32", seed=rep, what="qmm-tiles" + tag)
                attempt(check_matmul, core.matmul, 33, 64 * 24 + 5, 512, "float32", "bfloat16", seed=rep, what="matmul-tiles" + tag)


def test_clean_core_passes_the_suite(libs):
    core = Core(libs[None])
    assert core.plant() == ""
    assert run_suite(core) == []


@pytest.mark.parametrize("plant", PLANTS)
def test_planted_bug_is_caught(libs, plant):
    core = Core(libs[plant])
    assert core.plant() == plant
    failures = run_suite(core, stop_at_first=True)
    assert failures, f"planted bug {plant!r} passed every correctness check"
    print(f"{plant}: caught by {failures[0]}")


def test_core_used_before_init_is_consistent(libs, tmp_path):
    """The first kernel call initialises the ISA and pool before preparing its inputs (a fresh load of
    the clean core, never configured: it once permuted inputs for one path and ran another)."""
    fresh = tmp_path / "core-uninitialised.so"
    shutil.copy(libs[None], fresh)
    core = Core(fresh)
    check_qmm(core.qmm, 1, 77, 192, 4, 32, "float32", what="qmm[uninitialised]")
    check_qmm(core.qmm, 2, 77, 96, 8, 32, "float32", what="qmm[uninitialised]")


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_pool_runs_every_task_exactly_once(libs, tmp_path, threads):
    """The kernels' thread pool (core.cpp's Pool: each thread takes its own run of tasks from the front, then
    steals the others' from the back) runs every task of every job exactly once, for task counts below, at and
    above the thread count, with more threads than cores (late joiners, stolen runs). The tasks here are Python
    callbacks: each waits for the GIL, so threads are held up at random and the stealing paths run."""
    own = tmp_path / f"core-pool-{threads}.so"  # a fresh load: its own pool of `threads`
    shutil.copy(libs[None], own)
    lib = Core(own, threads=threads).lib
    lib.mlxe_init(ISA_CODES["scalar"], threads)
    task_fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64)
    lib.mlxe_parallel_for.argtypes = [ctypes.c_int64, task_fn, ctypes.c_void_p]
    for ntasks in (1, 2, threads - 1, threads, threads + 1, 7, 16, 64, 257):
        for _ in range(5):
            hits = [0] * ntasks
            callback = task_fn(lambda _ctx, t: hits.__setitem__(t, hits[t] + 1))
            lib.mlxe_parallel_for(ntasks, callback, None)
            assert hits == [1] * ntasks, f"{threads} threads, {ntasks} tasks: runs per task {hits}"
    for ntasks in (0, 1, threads, 64):  # a job with a Prelude (the decode GEMVs'): prepare first, then the tasks
        check_tasks_start_after_prepare(lib, ntasks, jobs=1)
