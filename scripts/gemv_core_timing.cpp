// The decode GEMV of the native kernel core alone (mlxe_qmm, one activation row), no Python, no MLX:
// hot (the same weights every call: they sit in L2/L3, so this is the kernel's compute speed) and cold
// (rotating over copies filling 128 MiB, as a decode step reads them from DRAM). For trying kernel
// changes in seconds, ablating parts of the kernel (compile a copy of core.cpp with the part removed), and
// for running under a profiler on a host that has performance counters. The cold figure is what
// `_ext.kernel_seconds` (scripts/bench_cpu_kernels.py) measures through the built extension; use that for the
// issue's table. This file exists for what the extension cannot do without a rebuild: time a modified copy of
// core.cpp, the hot case, and huge-page weights.
//
//   K=src/mlxedge/cpu/kernels
//   g++ -O3 -fno-math-errno -std=c++17 -I$K scripts/gemv_core_timing.cpp $K/core.cpp -o /tmp/gemv -lpthread -ldl
//   /tmp/gemv N K BITS GROUP [THREADS=1] [ISA=5 (avx512vnni; see core.h)] [PARALLEL_MIN_BYTES]
//   HUGE_PAGES=1 /tmp/gemv ...   # weights on 2 MiB transparent huge pages (madvise), as numpy's arrays are
//
// Prints the best of five batches of 2000 calls, three times, in µs and GB/s (bytes of packed weights +
// float32 scales and biases over the time), and a checksum of the output.
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "core.h"

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// a 2 MiB-aligned allocation, on huge pages where HUGE_PAGES=1 asks (and the OS's THP mode allows madvise)
template <class T>
T* alloc(size_t n) {
  const size_t huge = size_t(2) << 20, bytes = (n * sizeof(T) + huge - 1) / huge * huge;
  void* p = std::aligned_alloc(huge, bytes);
  if (!p) {
    std::fprintf(stderr, "out of memory\n");
    std::exit(1);
  }
  const char* e = std::getenv("HUGE_PAGES");
  if (e && e[0] == '1') madvise(p, bytes, MADV_HUGEPAGE);
  return static_cast<T*>(p);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s N K BITS GROUP [THREADS] [ISA] [PARALLEL_MIN_BYTES]\n", argv[0]);
    return 2;
  }
  const int64_t N = std::atoll(argv[1]), K = std::atoll(argv[2]);
  const int bits = std::atoi(argv[3]), gs = std::atoi(argv[4]);
  const int threads = argc > 5 ? std::atoi(argv[5]) : 1, isa = argc > 6 ? std::atoi(argv[6]) : MLXE_ISA_AVX512_VNNI;
  if ((bits != 4 && bits != 8) || (gs != 32 && gs != 64 && gs != 128) || N <= 0 || K <= 0 || K % gs) {
    std::fprintf(stderr, "bits must be 4 or 8, GROUP 32/64/128 dividing K, N and K positive\n");
    return 2;
  }
  const int used = mlxe_init(isa, threads);
  if (argc > 7) mlxe_set_gemv_parallel_min_bytes(std::atoll(argv[7]));
  const int64_t wpr = K * bits / 32, G = K / gs;
  const int64_t bytes = N * wpr * 4 + 2 * N * G * 4;
  const int64_t copies = std::max<int64_t>(1, (int64_t(128) << 20) / bytes);
  std::mt19937 rng(1);
  uint32_t* w = alloc<uint32_t>(size_t(copies * N * wpr));
  float* s = alloc<float>(size_t(copies * N * G));
  float* b = alloc<float>(size_t(copies * N * G));
  for (int64_t i = 0; i < copies * N * wpr; i++) w[i] = rng();
  for (int64_t i = 0; i < copies * N * G; i++) s[i] = 0.01f * float(rng() % 100), b[i] = 0.001f * float(rng() % 100);
  std::vector<float> x(static_cast<size_t>(K)), y(static_cast<size_t>(N));
  for (auto& v : x) v = float(int(rng() % 2001) - 1000) / 1000.f;
  auto call = [&](int64_t c) {
    mlxe_qmm(x.data(), MLXE_F32, w + c * N * wpr, s + c * N * G, b + c * N * G, MLXE_F32, y.data(), MLXE_F32, 1, N,
             K, bits, gs);
  };
  std::printf("ISA %d, %d thread(s), %lld copies of %.3f MB\n", used, threads, (long long)copies, bytes / 1e6);
  for (int round = 0; round < 3; round++) {
    double hot = 1e9, cold = 1e9;
    for (int rep = 0; rep < 5; rep++) {
      const int calls = 2000;
      double t = now();
      for (int i = 0; i < calls; i++) call(0);
      hot = std::min(hot, (now() - t) / calls);
      t = now();
      for (int i = 0; i < calls; i++) call(i % copies);
      cold = std::min(cold, (now() - t) / calls);
    }
    std::printf("%lldx%lld %d/%d: hot %.2f us (%.1f GB/s)  cold %.2f us (%.1f GB/s)\n", (long long)N, (long long)K,
                bits, gs, hot * 1e6, bytes / hot / 1e9, cold * 1e6, bytes / cold / 1e9);
  }
  std::printf("checksum %g\n", double(y[0]) + double(y[size_t(N - 1)]));
  return 0;
}
