// How many of the 4-bit GEMVs' vector instructions an x86-64 core runs per cycle, alone and mixed: the
// ceiling the avx2 and integer kernels (src/mlxedge/cpu/kernels/core.cpp) work against on a given CPU,
// for hosts without performance counters (perf stat says "not supported" in these VMs).
//
//   g++ -O2 scripts/x86_port_mix.cpp -o /tmp/port_mix && /tmp/port_mix
//
// Each figure is a throughput: cycles per instruction, the clock measured by a chain of dependent integer adds
// (one per cycle). The FMAs accumulate, as the kernel's do, into eight registers (ymm0-7), each taking one FMA per
// loop iteration: with a 4-cycle FMA latency that lets two FMAs start every cycle, so no mix is held back by its
// accumulator chains (with four accumulators, every mix holding four FMAs would read 0.5 cycles per instruction
// whatever its ports). The other instructions write ymm8-11, which nothing reads across iterations. The avx2 decode GEMV spends one mask (vpand)
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

// ymm13 and ymm14 hold 1.0f, ymm15 the int32 3 (set per timed function): no denormal or NaN operand anywhere
#define AND(d) "vpand %%ymm14, %%ymm15, %%ymm" #d "\n\t"
#define CVT(d) "vcvtdq2ps %%ymm15, %%ymm" #d "\n\t"
#define FMA(acc) "vfmadd231ps %%ymm14, %%ymm13, %%ymm" #acc "\n\t"
#define MUBS(d) "vpmaddubsw %%ymm14, %%ymm15, %%ymm" #d "\n\t"
#define MWD(d) "vpmaddwd %%ymm14, %%ymm15, %%ymm" #d "\n\t"
// the avx2 GEMV's step for one sub-element of a row: mask, convert the result, multiply-add it into acc
#define TRIPLE(t, acc)                                                                     \
  "vpand %%ymm14, %%ymm15, %%ymm" #t "\n\tvcvtdq2ps %%ymm" #t ", %%ymm" #t "\n\t" \
  "vfmadd231ps %%ymm" #t ", %%ymm13, %%ymm" #acc "\n\t"
#define CLOBBERS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11"
#define TIMED(name, body, per)                                                         \
  TARGET double name(long n) {                                                         \
    register __m256 one_a asm("ymm13") = _mm256_set1_ps(1.f);                          \
    register __m256 one_b asm("ymm14") = _mm256_set1_ps(1.f);                          \
    register __m256i three asm("ymm15") = _mm256_set1_epi32(3);                        \
    asm volatile("vxorps %%ymm0, %%ymm0, %%ymm0\n\tvmovaps %%ymm0, %%ymm1\n\tvmovaps %%ymm0, %%ymm2\n\t" \
                 "vmovaps %%ymm0, %%ymm3\n\tvmovaps %%ymm0, %%ymm4\n\tvmovaps %%ymm0, %%ymm5\n\t"     \
                 "vmovaps %%ymm0, %%ymm6\n\tvmovaps %%ymm0, %%ymm7" ::: CLOBBERS);                    \
    const double t = now();                                                            \
    for (long i = 0; i < n; i++) asm volatile(body ::"x"(one_a), "x"(one_b), "x"(three) : CLOBBERS); \
    return (now() - t) / (double(per) * n);                                            \
  }

TIMED(t_and, AND(8) AND(9) AND(10) AND(11) AND(8) AND(9) AND(10) AND(11), 8)
TIMED(t_cvt, CVT(8) CVT(9) CVT(10) CVT(11) CVT(8) CVT(9) CVT(10) CVT(11), 8)
TIMED(t_fma, FMA(0) FMA(1) FMA(2) FMA(3) FMA(4) FMA(5) FMA(6) FMA(7), 8)
TIMED(t_mubs, MUBS(8) MUBS(9) MUBS(10) MUBS(11) MUBS(8) MUBS(9) MUBS(10) MUBS(11), 8)
TIMED(t_mwd, MWD(8) MWD(9) MWD(10) MWD(11) MWD(8) MWD(9) MWD(10) MWD(11), 8)
TIMED(t_and_cvt, AND(8) CVT(9) AND(10) CVT(11) AND(8) CVT(9) AND(10) CVT(11), 8)
TIMED(t_and_fma, AND(8) FMA(0) AND(9) FMA(1) AND(10) FMA(2) AND(11) FMA(3)
                 AND(8) FMA(4) AND(9) FMA(5) AND(10) FMA(6) AND(11) FMA(7), 16)
TIMED(t_cvt_fma, CVT(8) FMA(0) CVT(9) FMA(1) CVT(10) FMA(2) CVT(11) FMA(3)
                 CVT(8) FMA(4) CVT(9) FMA(5) CVT(10) FMA(6) CVT(11) FMA(7), 16)
TIMED(t_mubs_fma, MUBS(8) FMA(0) MUBS(9) FMA(1) MUBS(10) FMA(2) MUBS(11) FMA(3)
                  MUBS(8) FMA(4) MUBS(9) FMA(5) MUBS(10) FMA(6) MUBS(11) FMA(7), 16)
// per triple (eight of them, one per accumulator)
TIMED(t_triple, TRIPLE(8, 0) TRIPLE(9, 1) TRIPLE(10, 2) TRIPLE(11, 3) TRIPLE(8, 4) TRIPLE(9, 5) TRIPLE(10, 6)
                    TRIPLE(11, 7), 8)

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
