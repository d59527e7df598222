"""Compile a generated Metal kernel with g++ against the shim, and run it on guarded buffers in a subprocess.

The program is: metal_shim.h + the source MLX would generate (signature.py) + a main() written here. main()
reads the launch (grid, threadgroup, buffer sizes) from argv and the buffers from stdin; puts every buffer
flush against an inaccessible region (any access past the end faults) behind a band of guard bytes (input
guards read as NaN; output guards are checked afterwards); fills outputs with NaN first, so unwritten
elements show; poisons threadgroup memory with NaN before each threadgroup; runs each threadgroup's threads
as fibers (32-lane SIMD-groups; each pass runs every runnable thread, first-to-last or last-to-first,
until it blocks); writes outputs to stdout.
Binaries are cached by a hash of their full source under the test cache directory.

Before that, `check_address_spaces` compiles the same generated source with clang (-fsyntax-only) against
the shim's MLXE_TYPECHECK mode, where device/constant/threadgroup/thread are distinct address spaces: a
pointer passed where another address space is declared is a compile error here, as in Metal.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from .signature import Parameter

SHIM = Path(__file__).with_name("metal_shim.h")
GUARD_BYTES = 4096
INPUT_GUARD_BYTE = 0xFF   # NaN for float/half/bfloat, 0xffffffff for words
OUTPUT_GUARD_BYTE = 0xA5
CXX_FLAGS = ["-std=c++17", "-O1", "-w", "-fno-strict-aliasing", "-ffp-contract=off"]
EXIT_GUARD, EXIT_DEADLOCK, EXIT_USAGE = 2, 3, 4
TYPECHECK_FLAGS = ["-x", "c++", "-std=c++17", "-fsyntax-only", "-nostdinc", "-nostdinc++", "-w", "-DMLXE_TYPECHECK"]
CLANG_ENV = "MLXEDGE_CLANG"


class EmulatorError(RuntimeError):
    """The emulated kernel did something a GPU run would not survive or could not be trusted for."""


def cache_dir() -> Path:
    root = os.environ.get("MLXEDGE_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mlxedge-tests")
    path = Path(root) / "metal-emulator"
    path.mkdir(parents=True, exist_ok=True)
    return path


ATTRIBUTE_VALUES = {
    "dispatch_quadgroups_per_threadgroup": "(nthreads + 3) / 4",
    "dispatch_simdgroups_per_threadgroup": "(nthreads + 31) / 32",
    "dispatch_threads_per_threadgroup": "tg",
    "grid_origin": "uint3{0, 0, 0}",
    "grid_size": "grid",
    "quadgroup_index_in_threadgroup": "t.index / 4",
    "quadgroups_per_threadgroup": "(nthreads + 3) / 4",
    "simdgroup_index_in_threadgroup": "t.index / 32",
    "simdgroups_per_threadgroup": "(nthreads + 31) / 32",
    "thread_execution_width": "32u",
    "thread_index_in_quadgroup": "t.index % 4",
    "thread_index_in_simdgroup": "t.index % 32",
    "thread_index_in_threadgroup": "t.index",
    "thread_position_in_grid": "t.global",
    "thread_position_in_threadgroup": "t.local",
    "threadgroup_position_in_grid": "tg_pos",
    "threadgroups_per_grid": "ntg",
    "threads_per_grid": "grid",
    "threads_per_simdgroup": "32u",
    "threads_per_threadgroup": "tg_actual",
}

MAIN_TEMPLATE = r"""
// ---------------- emulator harness ----------------
#undef device
#undef constant
#undef thread
#undef threadgroup
#include <sys/mman.h>
extern "C" __attribute__((weak)) char __start_mlxe_tgmem[];
extern "C" __attribute__((weak)) char __stop_mlxe_tgmem[];

namespace mlxe_h {
const int N_IN = @N_IN@, N_OUT = @N_OUT@;
const size_t GUARD = @GUARD@;
char* in_buf[N_IN > 0 ? N_IN : 1];
size_t in_len[N_IN > 0 ? N_IN : 1];
std::vector<int> in_shape[N_IN > 0 ? N_IN : 1];
std::vector<int64_t> in_strides[N_IN > 0 ? N_IN : 1];
int in_ndim[N_IN > 0 ? N_IN : 1];
char* out_buf[N_OUT];
size_t out_len[N_OUT];
uint3 grid, tg, ntg, tg_pos, tg_actual;
uint nthreads;
struct ThreadIds { uint index; uint3 local; uint3 global; };
std::vector<ThreadIds> ids;

void entry() {
  mlxe_emu::Threadgroup* group = mlxe_emu::active();
  const ThreadIds t = ids[group->current];
  (void)t;
  @CALL@;
  mlxe_emu::Fiber& f = group->fibers[group->current];
  f.done = true;
  group->live--;
  mlxe_emu::SimdGroup& g = group->groups[f.simdgroup];
  g.live--;
  if (g.arrived > 0 && g.arrived == g.live) mlxe_emu::release_simdgroup(group, f.simdgroup);
  if (group->at_barrier > 0) {
    std::fprintf(stderr, "emulator: a thread returned while others wait at threadgroup_barrier\n");
    std::exit(5);
  }
}

// Each buffer ends flush against an inaccessible region (reads or writes past the end fault at once) and
// starts after a band of guard bytes (checked afterwards) preceded by another inaccessible region.
char* guarded(size_t n, unsigned char guard_byte) {
  const size_t page = 4096, before = 64 * 1024, after = 1024 * 1024;
  const size_t body = ((n + GUARD + page - 1) / page) * page;
  char* base = (char*)mmap(nullptr, before + body + after, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == (char*)MAP_FAILED || mprotect(base + before, body, PROT_READ | PROT_WRITE) != 0) {
    std::fprintf(stderr, "emulator: mmap failed\n");
    std::exit(@EXIT_USAGE@);
  }
  char* data = base + before + body - n;
  std::memset(base + before, guard_byte, body - n);
  return data;
}

bool guard_intact(const char* p, size_t n, unsigned char guard_byte) {
  (void)n;
  for (size_t i = 0; i < GUARD; i++) {
    if ((unsigned char)p[-1 - (long)i] != guard_byte) return false;
  }
  return true;
}

bool read_all(char* p, size_t n) {
  size_t got = 0;
  while (got < n) {
    size_t r = std::fread(p + got, 1, n - got, stdin);
    if (r == 0) return false;
    got += r;
  }
  return true;
}
}  // namespace mlxe_h

int main(int argc, char** argv) {
  using namespace mlxe_h;
  // argv: gx gy gz tx ty tz, then per input: nbytes ndim dims... strides..., then per output: nbytes
  int a = 1;
  auto next = [&]() -> long long {
    if (a >= argc) { std::fprintf(stderr, "emulator: short argv\n"); std::exit(@EXIT_USAGE@); }
    return std::atoll(argv[a++]);
  };
  grid = uint3{(uint)next(), (uint)next(), (uint)next()};
  uint3 tg_req = uint3{(uint)next(), (uint)next(), (uint)next()};
  // MLX dispatches threads with group dims min(threadgroup, grid).
  tg = uint3{tg_req.x < grid.x ? tg_req.x : grid.x, tg_req.y < grid.y ? tg_req.y : grid.y,
             tg_req.z < grid.z ? tg_req.z : grid.z};
  ntg = uint3{(grid.x + tg.x - 1) / tg.x, (grid.y + tg.y - 1) / tg.y, (grid.z + tg.z - 1) / tg.z};
  for (int i = 0; i < N_IN; i++) {
    in_len[i] = (size_t)next();
    in_ndim[i] = (int)next();
    for (int d = 0; d < in_ndim[i]; d++) in_shape[i].push_back((int)next());
    for (int d = 0; d < in_ndim[i]; d++) in_strides[i].push_back((int64_t)next());
    in_buf[i] = guarded(in_len[i], @IN_GUARD@);
    if (!read_all(in_buf[i], in_len[i])) { std::fprintf(stderr, "emulator: short stdin\n"); return @EXIT_USAGE@; }
  }
  for (int i = 0; i < N_OUT; i++) {
    out_len[i] = (size_t)next();
    out_buf[i] = guarded(out_len[i], @OUT_GUARD@);
    if (!read_all(out_buf[i], out_len[i])) { std::fprintf(stderr, "emulator: short stdin\n"); return @EXIT_USAGE@; }
  }

  // MLXE_EMU_SCHEDULE=reverse runs threads last-to-first in every pass (exposes order-dependent races).
  const char* schedule = std::getenv("MLXE_EMU_SCHEDULE");
  const bool reverse = schedule && std::strcmp(schedule, "reverse") == 0;
  const size_t STACK = 128 * 1024;
  const uint max_threads = tg.x * tg.y * tg.z;
  std::vector<std::vector<char>> stacks(max_threads, std::vector<char>(STACK));
  mlxe_emu::Threadgroup group;
  mlxe_emu::active() = &group;
  for (uint gz = 0; gz < ntg.z; gz++)
  for (uint gy = 0; gy < ntg.y; gy++)
  for (uint gx = 0; gx < ntg.x; gx++) {
    tg_pos = uint3{gx, gy, gz};
    tg_actual = uint3{std::min(tg.x, grid.x - gx * tg.x), std::min(tg.y, grid.y - gy * tg.y),
                      std::min(tg.z, grid.z - gz * tg.z)};
    nthreads = tg_actual.x * tg_actual.y * tg_actual.z;
    ids.clear();
    for (uint lz = 0; lz < tg_actual.z; lz++)
    for (uint ly = 0; ly < tg_actual.y; ly++)
    for (uint lx = 0; lx < tg_actual.x; lx++) {
      uint3 local{lx, ly, lz};
      uint3 global{gx * tg.x + lx, gy * tg.y + ly, gz * tg.z + lz};
      ids.push_back(ThreadIds{lx + ly * tg_actual.x + lz * tg_actual.x * tg_actual.y, local, global});
    }
    // Poison threadgroup memory: NaN in every float/half lane.
    if (__start_mlxe_tgmem && __stop_mlxe_tgmem)
      std::memset(__start_mlxe_tgmem, 0xFF, (size_t)(__stop_mlxe_tgmem - __start_mlxe_tgmem));
    group.fibers.assign(nthreads, mlxe_emu::Fiber());
    group.groups.assign((nthreads + 31) / 32, mlxe_emu::SimdGroup());
    group.live = (int)nthreads;
    group.total = (int)nthreads;
    group.at_barrier = 0;
    for (uint i = 0; i < nthreads; i++) {
      mlxe_emu::Fiber& f = group.fibers[i];
      f.simdgroup = (int)(ids[i].index / 32);
      f.lane = (int)(ids[i].index % 32);
      group.groups[f.simdgroup].live++;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = stacks[i].data();
      f.ctx.uc_stack.ss_size = STACK;
      f.ctx.uc_link = &group.scheduler;
      makecontext(&f.ctx, (void (*)())entry, 0);
    }
    while (group.live > 0) {
      bool progressed = false;
      for (uint step = 0; step < nthreads; step++) {
        const uint i = reverse ? nthreads - 1 - step : step;
        mlxe_emu::Fiber& f = group.fibers[i];
        if (f.done || f.waiting) continue;
        group.current = (int)i;
        swapcontext(&group.scheduler, &f.ctx);
        progressed = true;
      }
      if (!progressed) {
        std::fprintf(stderr, "emulator: deadlock in threadgroup (%u,%u,%u): threads wait at simd_sum or "
                     "threadgroup_barrier that others never reach\n", gx, gy, gz);
        return @EXIT_DEADLOCK@;
      }
    }
  }

  bool ok = true;
  for (int i = 0; i < N_IN; i++) {
    if (!guard_intact(in_buf[i], in_len[i], @IN_GUARD@)) {
      std::fprintf(stderr, "emulator: guard band of input %d overwritten\n", i);
      ok = false;
    }
  }
  for (int i = 0; i < N_OUT; i++) {
    if (!guard_intact(out_buf[i], out_len[i], @OUT_GUARD@)) {
      std::fprintf(stderr, "emulator: write before the start of output %d (guard band overwritten)\n", i);
      ok = false;
    }
    std::fwrite(out_buf[i], 1, out_len[i], stdout);
  }
  std::fflush(stdout);
  return ok ? 0 : @EXIT_GUARD@;
}
"""


def _argument(p: Parameter, output_index: dict) -> str:
    """The C++ expression main() passes for one kernel parameter."""
    if p.kind == "input":
        if p.by_reference:
            return f"*(const {p.ctype}*)in_buf[{p.input_index}]"
        return f"(const {p.ctype}*)in_buf[{p.input_index}]"
    if p.kind == "shape":
        return f"(const int*)in_shape[{p.input_index}].data()"
    if p.kind == "strides":
        return f"(const int64_t*)in_strides[{p.input_index}].data()"
    if p.kind == "ndim":
        return f"in_ndim[{p.input_index}]"
    if p.kind == "output":
        return f"({p.ctype}*)out_buf[{output_index[p.name]}]"
    return ATTRIBUTE_VALUES[p.name]


def program(kernel_name: str, kernel_source: str, params: list[Parameter], template: list,
            n_inputs: int, output_names) -> str:
    """The whole translation unit: shim, MLX-shaped kernel source, harness main()."""
    from .signature import template_value

    output_index = {n: i for i, n in enumerate(output_names)}
    callee = kernel_name
    if template:
        callee += "<" + ", ".join(template_value(v) for _, v in template) + ">"
    call = callee + "(" + ", ".join(_argument(p, output_index) for p in params) + ")"
    main = (MAIN_TEMPLATE.replace("@N_IN@", str(n_inputs)).replace("@N_OUT@", str(len(output_names)))
            .replace("@GUARD@", str(GUARD_BYTES)).replace("@CALL@", call)
            .replace("@IN_GUARD@", str(INPUT_GUARD_BYTE)).replace("@OUT_GUARD@", str(OUTPUT_GUARD_BYTE))
            .replace("@EXIT_USAGE@", str(EXIT_USAGE)).replace("@EXIT_DEADLOCK@", str(EXIT_DEADLOCK))
            .replace("@EXIT_GUARD@", str(EXIT_GUARD)))
    return '#include "metal_shim.h"\n' + kernel_source + main


def clang_command() -> list[str]:
    """The clang that type-checks address spaces: $MLXEDGE_CLANG, else the ziglang wheel's, else clang++.

    `python -m ziglang clang` is the plain clang driver inside zig (no zig libc/libc++ set-up, which a
    `zig c++` call would build first); the check includes no headers, so it needs nothing else.
    """
    explicit = os.environ.get(CLANG_ENV)
    if explicit:
        return shlex.split(explicit)
    if importlib.util.find_spec("ziglang") is not None:
        return [sys.executable, "-m", "ziglang", "clang"]
    if shutil.which("clang++"):
        return ["clang++"]
    raise EmulatorError(
        "no clang for the Metal address-space check: install the test extra (pip install -e '.[test]' brings "
        f"the ziglang wheel, whose `python -m ziglang clang` is clang), put clang++ on PATH, or set {CLANG_ENV}")


# MLX marks the explicit instantiation [[host_name(...)]] [[kernel]]; clang refuses attributes there outside
# Metal, and they name nothing the type check needs, so that line loses them (the rest is checked verbatim).
_INSTANTIATION_ATTRIBUTES = re.compile(r'^template \[\[host_name\("[^"]*"\)\]\] \[\[kernel\]\] ', re.M)


def check_address_spaces(kernel_source: str) -> None:
    """Compile the generated kernel source with distinct address spaces; EmulatorError on any error."""
    shim = SHIM.read_text()
    command = clang_command()
    source = '#include "metal_shim.h"\n' + _INSTANTIATION_ATTRIBUTES.sub("template ", kernel_source)
    key = hashlib.sha256("\0".join([source, shim, " ".join(command + TYPECHECK_FLAGS)]).encode()).hexdigest()[:24]
    stamp = cache_dir() / f"typecheck-{key}.ok"
    if stamp.exists():
        return
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cpp = Path(tmp) / "kernel.cpp"
        cpp.write_text(source)
        try:
            proc = subprocess.run([*command, *TYPECHECK_FLAGS, "-I", str(SHIM.parent), str(cpp)],
                                  capture_output=True, text=True, timeout=300)
        except FileNotFoundError as e:
            raise EmulatorError(f"cannot run the address-space check's compiler {command[0]!r} ({e}); "
                                f"install the test extra or set {CLANG_ENV}") from None
    if proc.returncode != 0:
        errors = "\n".join(line for line in proc.stderr.splitlines() if "unused during compilation" not in line)
        raise EmulatorError(f"clang rejected the kernel source with Metal's address spaces:\n{errors[-4000:]}")
    stamp.touch()


def compile_program(source: str) -> Path:
    """Build (or find in the cache) the binary for one translation unit."""
    shim = SHIM.read_text()
    key = hashlib.sha256("\0".join([source, shim, " ".join(CXX_FLAGS)]).encode()).hexdigest()[:24]
    binary = cache_dir() / f"kernel-{key}"
    if binary.exists():
        return binary
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cpp = Path(tmp) / "kernel.cpp"
        cpp.write_text(source)
        out = Path(tmp) / "kernel"
        proc = subprocess.run(["g++", *CXX_FLAGS, "-I", str(SHIM.parent), str(cpp), "-o", str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise EmulatorError(f"g++ rejected the kernel source:\n{proc.stderr[-4000:]}")
        os.replace(out, binary)
    return binary


SCHEDULES = ("forward", "reverse")


def run_binary(binary: Path, grid, threadgroup, inputs: list, outputs: list, schedule: str = "forward") -> list[bytes]:
    """inputs: (bytes, shape, strides) per input; outputs: initial bytes per output. Returns output bytes.

    schedule: "forward" runs each threadgroup's threads first-to-last in every pass, "reverse" last-to-first.
    """
    assert schedule in SCHEDULES
    argv = [str(binary), *map(str, grid), *map(str, threadgroup)]
    blob = []
    for data, shape, strides in inputs:
        argv += [str(len(data)), str(len(shape)), *map(str, shape), *map(str, strides)]
        blob.append(data)
    for data in outputs:
        argv.append(str(len(data)))
        blob.append(data)
    env = {**os.environ, "MLXE_EMU_SCHEDULE": schedule}
    proc = subprocess.run(argv, input=b"".join(blob), capture_output=True, timeout=120, env=env)
    if proc.returncode < 0 and -proc.returncode in (signal.SIGSEGV, signal.SIGBUS):
        raise EmulatorError("emulated kernel touched memory outside its buffers (fault on a guard region)")
    if proc.returncode != 0:
        raise EmulatorError(f"emulated kernel failed (exit {proc.returncode}): "
                            f"{proc.stderr.decode(errors='replace').strip()}")
    result, offset = [], 0
    for data in outputs:
        result.append(proc.stdout[offset:offset + len(data)])
        offset += len(data)
    if offset != len(proc.stdout):
        raise EmulatorError("emulated kernel wrote an unexpected amount of output")
    return result
