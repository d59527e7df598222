// Two (or more) builds of the native kernel core, timed side by side in one process: each build of
// src/mlxedge/cpu/kernels/core.cpp is loaded as its own shared library (RTLD_LOCAL: its own ISA choice and
// thread pool), and their decode GEMVs (mlxe_qmm, one activation row) run in turn, in bursts of a few
// milliseconds, 60 rounds, the best burst of each kept. These VMs' speed moves by up to 2x from one minute to
// the next with their neighbours' load, so builds timed one after the other (gemv_core_timing.cpp run twice)
// cannot show a 5% change; interleaved bursts see the same machine. Hot by default (the same weights every
// call: L2/L3, the kernel's compute), COLD=1 rotates over copies filling 128 MiB (ROTATE_MB=...: twice the
// last-level cache or more, so that it is DRAM, as a decode step);
// SEP=1 puts each copy's arrays in allocations of their own, in shuffled order (see below); BF16=1 passes
// x, scales, biases and y as bfloat16 (the model's own dtype in mlx-lm checkpoints) instead of float32.
//
//   K=src/mlxedge/cpu/kernels
//   mkdir -p /tmp/base && git archive HEAD~1 $K | tar -x -C /tmp/base      # the build to compare against
//   g++ -O3 -fno-math-errno -std=c++17 -fPIC -shared -I/tmp/base/$K /tmp/base/$K/core.cpp -o /tmp/base.so -lpthread
//   g++ -O3 -fno-math-errno -std=c++17 -fPIC -shared -I$K $K/core.cpp -o /tmp/work.so -lpthread
//   g++ -O2 scripts/ab_core_builds.cpp -o /tmp/ab_core -ldl
//   [COLD=1 [SEP=1] [ROTATE_MB=640]] /tmp/ab_core N K BITS GROUP THREADS ISA /tmp/base.so /tmp/work.so
//
// ISA as in core.h (2 = avx2, 4 = avx512, 5 = avx512vnni). Prints each build's best time per call, per 8
// weights, and a checksum of the output (builds computing the same thing agree to float rounding).
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

using InitFn = int (*)(int, int);
using QmmFn = void (*)(const void*, int, const uint32_t*, const void*, const void*, int, void*, int, int64_t, int64_t,
                       int64_t, int, int);
constexpr int kF32 = 0;   // MLXE_F32
constexpr int kBF16 = 2;  // MLXE_BF16

float from_top_half(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 8) {
    std::fprintf(stderr, "usage: [COLD=1] %s N K BITS GROUP THREADS ISA build.so [build.so ...]\n", argv[0]);
    return 2;
  }
  const int64_t N = std::atoll(argv[1]), K = std::atoll(argv[2]);
  const int bits = std::atoi(argv[3]), gs = std::atoi(argv[4]), threads = std::atoi(argv[5]), isa = std::atoi(argv[6]);
  if ((bits != 4 && bits != 8) || (gs != 32 && gs != 64 && gs != 128) || N <= 0 || K <= 0 || K % gs) {
    std::fprintf(stderr, "bits must be 4 or 8, GROUP 32/64/128 dividing K, N and K positive\n");
    return 2;
  }
  const int builds = argc - 7;
  std::vector<QmmFn> qmm(size_t(builds), nullptr);
  for (int v = 0; v < builds; v++) {
    void* lib = dlopen(argv[7 + v], RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      std::fprintf(stderr, "%s\n", dlerror());
      return 1;
    }
    auto init = reinterpret_cast<InitFn>(dlsym(lib, "mlxe_init"));
    qmm[size_t(v)] = reinterpret_cast<QmmFn>(dlsym(lib, "mlxe_qmm"));
    if (!init || !qmm[size_t(v)]) {
      std::fprintf(stderr, "%s: no mlxe_init/mlxe_qmm\n", argv[7 + v]);
      return 1;
    }
    const int used = init(isa, threads);
    if (used != isa) std::fprintf(stderr, "%s: ISA %d asked, %d chosen\n", argv[7 + v], isa, used);
  }
  const bool cold = std::getenv("COLD") != nullptr;
  const bool bf16 = std::getenv("BF16") != nullptr;
  const int fdt = bf16 ? kBF16 : kF32;
  const int64_t fsz = bf16 ? 2 : 4;  // bytes per scale, bias, x and y element
  const int64_t wpr = K * bits / 32, G = K / gs, bytes = N * wpr * 4 + 2 * N * G * fsz;
  // ROTATE_MB: at least twice the last-level cache (a 300 MiB L3 holds the default 128 MiB whole)
  const int64_t rotate = int64_t(std::getenv("ROTATE_MB") ? std::atoll(std::getenv("ROTATE_MB")) : 128) << 20;
  const int64_t copies = cold ? std::max<int64_t>(1, rotate / bytes) : 1;
  std::mt19937 rng(1);
  std::vector<uint32_t> w(static_cast<size_t>(copies * N * wpr));
  std::vector<float> s(static_cast<size_t>(copies * N * G)), b(s.size()), x(static_cast<size_t>(K)), y(static_cast<size_t>(N));
  for (auto& v : w) v = rng();
  for (size_t i = 0; i < s.size(); i++) s[i] = 0.01f * float(rng() % 100), b[i] = 0.001f * float(rng() % 100);
  for (auto& v : x) v = float(int(rng() % 2001) - 1000) / 1000.f;
  // the bfloat16 arrays hold the top halves of the float32 ones (rounding does not matter here)
  auto top_halves = [](const std::vector<float>& f) {
    std::vector<uint16_t> h(f.size());
    for (size_t i = 0; i < f.size(); i++) {
      uint32_t u;
      std::memcpy(&u, &f[i], 4);
      h[i] = uint16_t(u >> 16);
    }
    return h;
  };
  const std::vector<uint16_t> s16 = top_halves(s), b16 = top_halves(b), x16 = top_halves(x);
  std::vector<uint16_t> y16(y.size());
  const char* sbase = bf16 ? reinterpret_cast<const char*>(s16.data()) : reinterpret_cast<const char*>(s.data());
  const char* bbase = bf16 ? reinterpret_cast<const char*>(b16.data()) : reinterpret_cast<const char*>(b.data());
  // Each copy's words, scales and biases: slices of the three arrays, one after another (the hardware
  // prefetcher's stream runs on from one call into the next), or with SEP=1 each in its own allocation, in
  // shuffled order, as the separate MLX arrays of a model or of scripts/bench_cpu_kernels.py lie.
  const bool sep = std::getenv("SEP") != nullptr;
  std::vector<const uint32_t*> wp;
  std::vector<const char*> sp, bp;
  std::vector<std::vector<uint32_t>> own_w;
  std::vector<std::vector<char>> own_s, own_b;
  for (int64_t c = 0; c < copies; c++) {
    const uint32_t* wc = w.data() + c * N * wpr;
    const char *sc = sbase + c * N * G * fsz, *bc = bbase + c * N * G * fsz;
    if (sep) {
      own_w.emplace_back(wc, wc + N * wpr);
      own_s.emplace_back(sc, sc + N * G * fsz);
      own_b.emplace_back(bc, bc + N * G * fsz);
      wc = own_w.back().data(), sc = own_s.back().data(), bc = own_b.back().data();
    }
    wp.push_back(wc), sp.push_back(sc), bp.push_back(bc);
  }
  if (sep) {
    std::shuffle(wp.begin(), wp.end(), rng);
    std::shuffle(sp.begin(), sp.end(), rng);
    std::shuffle(bp.begin(), bp.end(), rng);
  }
  int64_t copy = 0;
  auto call = [&](int v) {
    copy = (copy + 1) % copies;
    qmm[size_t(v)](bf16 ? static_cast<const void*>(x16.data()) : x.data(), fdt, wp[size_t(copy)], sp[size_t(copy)],
                   bp[size_t(copy)], fdt, bf16 ? static_cast<void*>(y16.data()) : y.data(), fdt, 1, N, K, bits, gs);
  };
  double t = now();
  call(0);
  const int64_t calls = std::max<int64_t>(5, int64_t(4e-3 / std::max(1e-7, now() - t)));  // ~4 ms bursts
  std::vector<double> best(static_cast<size_t>(builds), 1e9), checksum(static_cast<size_t>(builds));
  for (int round = 0; round < 60; round++)
    for (int v = 0; v < builds; v++) {
      t = now();
      for (int64_t i = 0; i < calls; i++) call(v);
      best[size_t(v)] = std::min(best[size_t(v)], (now() - t) / double(calls));
      if (bf16) y[0] = from_top_half(y16[0]), y[size_t(N - 1)] = from_top_half(y16[size_t(N - 1)]);
      checksum[size_t(v)] = double(y[0]) + double(y[size_t(N - 1)]);
    }
  std::printf("%lldx%lld %d/%d %s, %d thread(s), ISA %d, %s (%lld copies of %.3f MB), best of 60 bursts of %lld calls\n",
              (long long)N, (long long)K, bits, gs, bf16 ? "bfloat16" : "float32", threads, isa,
              cold ? (sep ? "cold, separate arrays" : "cold") : "hot", (long long)copies,
              double(bytes) / 1e6, (long long)calls);
  for (int v = 0; v < builds; v++)
    std::printf("  %-28s %9.2f us  %.3f ns per 8 weights  checksum %.6g\n", argv[7 + v], best[size_t(v)] * 1e6,
                best[size_t(v)] * 1e9 / (double(N) * double(K) / 8.0), checksum[size_t(v)]);
  return 0;
}
