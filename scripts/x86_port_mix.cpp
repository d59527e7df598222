// How many of the 4-bit GEMVs' vector instructions an x86-64 core runs per cycle, alone and mixed: the
// ceiling the avx2 and integer kernels (src/mlxedge/cpu/kernels/core.cpp) work against on a given CPU,
// for hosts without performance counters (perf stat says "not supported" in these VMs).
//
//   g++ -O2 scripts/x86_port_mix.cpp -o /tmp/port_mix && /tmp/port_mix
//
// Every instruction in a timed loop is independent of the others (no chain longer than one FMA latency per
// accumulator, eight accumulators), so each figure is a throughput: cycles per instruction, the clock
// measured by a chain of dependent integer adds (one per cycle). The avx2 decode GEMV spends one mask (vpand)
// or shift, one convert and one FMA on every 8 weights of a row (qdotr_avx2_t): the "and+cvt+fma" line is
// its floor per 8 weights. The integer alternative (the VNNI kernel's digits on AVX2) spends vpmaddubsw and
// vpmaddwd instead.
#include <immintrin.h>

#include <chrono>
#include <cstdio>

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

#define TARGET __attribute__((target("avx2,fma"), noinline))

// seconds per cycle: four dependent adds per iteration, one cycle each
TARGET double cycle_seconds(long n) {
  long a = 0;
  const double t = now();
  for (long i = 0; i < n; i++) asm volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(a));
  return (now() - t) / (4.0 * n);
}

#define AND(d) "vpand %%ymm14, %%ymm15, %%ymm" #d "\n\t"
#define CVT(d) "vcvtdq2ps %%ymm15, %%ymm" #d "\n\t"
#define FMA(d) "vfmadd231ps %%ymm14, %%ymm13, %%ymm" #d "\n\t"
#define MUBS(d) "vpmaddubsw %%ymm14, %%ymm15, %%ymm" #d "\n\t"
#define MWD(d) "vpmaddwd %%ymm14, %%ymm15, %%ymm" #d "\n\t"
#define CLOBBERS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11"
#define TIMED(name, body, per)                             \
  TARGET double name(long n) {                             \
    const double t = now();                                \
    for (long i = 0; i < n; i++) asm volatile(body ::: CLOBBERS); \
    return (now() - t) / (double(per) * n);                \
  }

TIMED(t_and, AND(0) AND(1) AND(2) AND(3) AND(4) AND(5) AND(6) AND(7), 8)
TIMED(t_cvt, CVT(0) CVT(1) CVT(2) CVT(3) CVT(4) CVT(5) CVT(6) CVT(7), 8)
TIMED(t_fma, FMA(0) FMA(1) FMA(2) FMA(3) FMA(4) FMA(5) FMA(6) FMA(7), 8)
TIMED(t_mubs, MUBS(0) MUBS(1) MUBS(2) MUBS(3) MUBS(4) MUBS(5) MUBS(6) MUBS(7), 8)
TIMED(t_mwd, MWD(0) MWD(1) MWD(2) MWD(3) MWD(4) MWD(5) MWD(6) MWD(7), 8)
TIMED(t_and_cvt, AND(0) CVT(1) AND(2) CVT(3) AND(4) CVT(5) AND(6) CVT(7), 8)
TIMED(t_and_fma, AND(0) FMA(1) AND(2) FMA(3) AND(4) FMA(5) AND(6) FMA(7), 8)
TIMED(t_cvt_fma, CVT(0) FMA(1) CVT(2) FMA(3) CVT(4) FMA(5) CVT(6) FMA(7), 8)
TIMED(t_mubs_fma, MUBS(0) FMA(1) MUBS(2) FMA(3) MUBS(4) FMA(5) MUBS(6) FMA(7), 8)
// per and+cvt+fma triple (12 instructions = 4 triples)
TIMED(t_triple, AND(0) CVT(1) FMA(2) AND(3) CVT(4) FMA(5) AND(6) CVT(7) FMA(8) AND(9) CVT(10) FMA(11), 4)

}  // namespace

int main() {
  const long n = 30000000;
  const double c = cycle_seconds(n);
  std::printf("clock %.2f GHz; cycles per instruction (mixes: per instruction of the mix)\n", 1e-9 / c);
  std::printf("  vpand %.2f  vcvtdq2ps %.2f  vfmadd231ps %.2f  vpmaddubsw %.2f  vpmaddwd %.2f\n", t_and(n) / c,
              t_cvt(n) / c, t_fma(n) / c, t_mubs(n) / c, t_mwd(n) / c);
  std::printf("  and+cvt %.2f  and+fma %.2f  cvt+fma %.2f  maddubsw+fma %.2f\n", t_and_cvt(n) / c, t_and_fma(n) / c,
              t_cvt_fma(n) / c, t_mubs_fma(n) / c);
  const double triple = t_triple(n);
  std::printf("  and+cvt+fma: %.2f cycles, %.3f ns per triple (the avx2 GEMV's floor per 8 weights of a row: set it\n"
              "  against the kernel's time per N*K/8 in scripts/gemv_core_timing.cpp's hot column, long rows)\n",
              triple / c, triple * 1e9);
}
