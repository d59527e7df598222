// What reading memory costs on this machine: the references scripts/bench_cpu_kernels.py sets the GEMV
// kernels against. No kernel runs here, only reads whose result is kept (OR-ed), so nothing is optimised away.
// - read_bandwidth: one big fresh buffer streamed once (the machine's read bandwidth);
// - read_seconds: the very buffers a kernel call reads (weights, scales, biases), call after call over the
//   same rotation of copies, split over the same threads: how fast any code could read them in calls of
//   that size, from that memory. A small call cannot reach the big-buffer figure whatever it computes (the
//   first lines of each call wait for DRAM; a 4 KiB page's translation misses the TLB), so this is the
//   like-with-like reference for a kernel's share of the bandwidth.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <nanobind/nanobind.h>

#include "mlx/array.h"
#include "mlx/transforms.h"

#include "../kernels/core.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

namespace {

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument(what); }

// The OR of bytes [p, p + n): four independent chains of 512-bit (where the CPU has AVX-512F) or 256-bit
// loads, no arithmetic to wait on.
#if defined(__x86_64__) && !defined(MLXEDGE_NO_X86_SIMD)
__attribute__((target("avx2"))) uint64_t read_span256(const char* p, size_t n) {
  __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
  size_t i = 0;
  for (; i + 128 <= n; i += 128) {
    a = _mm256_or_si256(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    b = _mm256_or_si256(b, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    c = _mm256_or_si256(c, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    d = _mm256_or_si256(d, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  const __m256i r = _mm256_or_si256(_mm256_or_si256(a, b), _mm256_or_si256(c, d));
  uint64_t out[4];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), r);
  for (; i < n; i++) out[0] |= uint8_t(p[i]);
  return out[0] | out[1] | out[2] | out[3];
}
__attribute__((target("avx512f"))) uint64_t read_span512(const char* p, size_t n) {
  __m512i a = _mm512_setzero_si512(), b = a, c = a, d = a;
  size_t i = 0;
  for (; i + 256 <= n; i += 256) {
    a = _mm512_or_si512(a, _mm512_loadu_si512(p + i));
    b = _mm512_or_si512(b, _mm512_loadu_si512(p + i + 64));
    c = _mm512_or_si512(c, _mm512_loadu_si512(p + i + 128));
    d = _mm512_or_si512(d, _mm512_loadu_si512(p + i + 192));
  }
  uint64_t out[8];
  _mm512_storeu_si512(out, _mm512_or_si512(_mm512_or_si512(a, b), _mm512_or_si512(c, d)));
  uint64_t acc = read_span256(p + i, n - i);
  for (uint64_t v : out) acc |= v;
  return acc;
}
inline void prefetch_line(const char* p) { asm volatile("prefetcht2 %0" : : "m"(*p)); }
#else
uint64_t read_span_portable(const char* p, size_t n) {
  uint64_t acc = 0, v;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    std::memcpy(&v, p + i, 8);
    acc |= v;
  }
  for (; i < n; i++) acc |= uint8_t(p[i]);
  return acc;
}
inline void prefetch_line(const char* p) { __builtin_prefetch(p, 0, 2); }
#endif

using SpanFn = uint64_t (*)(const char*, size_t);

SpanFn read_span() {
#if defined(__x86_64__) && !defined(MLXEDGE_NO_X86_SIMD)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") ? read_span512 : read_span256;
#else
  return read_span_portable;
#endif
}

// read_span a kilobyte at a time, asking for the lines 4 KiB ahead as it goes (software prefetch, as the
// GEMVs do: on this Zen 4 VM it reads a small cold buffer 10-20% faster than the hardware prefetcher alone)
uint64_t read_span_ahead(SpanFn span, const char* p, size_t n) {
  constexpr size_t kPiece = 1024, kAhead = 4096;
  for (size_t o = 0; o < std::min(n, kAhead); o += 64) prefetch_line(p + o);
  uint64_t acc = 0;
  for (size_t i = 0; i < n; i += kPiece) {
    for (size_t o = i + kAhead; o < std::min(n, i + kAhead + kPiece); o += 64) prefetch_line(p + o);
    acc |= span(p + i, std::min(kPiece, n - i));
  }
  return acc;
}

// Bytes per second of reading a fresh `nbytes` buffer once, split over `threads` threads, best of `reps`.
double read_bandwidth(size_t nbytes, int threads, int reps) {
  if (threads < 1 || reps < 1 || nbytes < (size_t(1) << 20)) bad("read_bandwidth: nbytes >= 1 MiB, threads and reps >= 1");
  std::vector<char> buf(nbytes, 1);
  const SpanFn span = read_span();
  nb::gil_scoped_release unlocked;
  double best = 0;
  std::vector<uint64_t> sink(static_cast<size_t>(threads));
  for (int r = 0; r < reps; r++) {
    const size_t part = nbytes / size_t(threads) / 64 * 64;
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; t++)
      pool.emplace_back([&, t] { sink[size_t(t)] = span(buf.data() + size_t(t) * part, part); });
    sink[0] = span(buf.data(), threads == 1 ? nbytes : part);
    for (auto& th : pool) th.join();
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, double(threads == 1 ? nbytes : part * size_t(threads)) / sec);
  }
  volatile uint64_t keep = 0;
  for (auto v : sink) keep = keep | v;
  (void)keep;
  return best;
}

// One set of buffers (what one kernel call reads), read on the kernels' pool in `threads` tasks: task t
// takes the t-th of `threads` contiguous slices (64-byte aligned, the last one to the end) of every buffer.
// (Built once per batch and pointed at each call's set, so a timed call allocates nothing.)
using Spans = std::vector<std::pair<const char*, size_t>>;
struct SetRead {
  const Spans* spans;
  SpanFn span;
  bool ahead;
  int threads;
  std::vector<uint64_t> acc;  // per task

  uint64_t run(const Spans& set) {
    spans = &set;
    acc.assign(size_t(threads), 0);
    mlxe_parallel_for(threads, &SetRead::task, this);
    uint64_t all = 0;
    for (auto v : acc) all |= v;
    return all;
  }
  static void task(void* ctx, int64_t t) {
    auto& r = *static_cast<SetRead*>(ctx);
    uint64_t a = 0;
    for (const auto& [p, n] : *r.spans) {
      const size_t slice = n / size_t(r.threads) / 64 * 64;
      const size_t lo = size_t(t) * slice, hi = t + 1 == r.threads ? n : lo + slice;
      a |= r.ahead ? read_span_ahead(r.span, p + lo, hi - lo) : r.span(p + lo, hi - lo);
    }
    r.acc[size_t(t)] = a;
  }
};

// the arrays' buffers as sets of `per_set` consecutive arrays
std::vector<Spans> buffer_sets(const nb::list& arrays, int per_set, const char* what) {
  if (nb::len(arrays) == 0 || per_set < 1 || nb::len(arrays) % size_t(per_set) != 0)
    bad(std::string(what) + ": give at least one array and a whole number of sets of per_set arrays");
  std::vector<mx::array> held;
  for (auto item : arrays) held.push_back(nb::cast<mx::array>(item));
  for (auto& a : held) {
    mx::eval(a);
    if (!a.flags().row_contiguous) bad(std::string(what) + ": arrays must be row-contiguous");
  }
  std::vector<Spans> sets(held.size() / size_t(per_set));
  for (size_t i = 0; i < held.size(); i++)
    sets[i / size_t(per_set)].emplace_back(held[i].data<char>(), held[i].nbytes());
  return sets;  // the caller's list keeps the buffers alive
}

void check_threads(int threads, const char* what) {
  if (threads < 1 || threads > mlxe_threads())
    bad(std::string(what) + ": threads must be between 1 and the pool's " + std::to_string(mlxe_threads()));
}

// Seconds per call of reading set i % sets on call i, `calls` calls, split over `threads` threads as a
// kernel call on that many is: the best of five batches, each the faster of a plain read and one with
// software prefetch (read_span_ahead), so the reference is the best this code can do.
double read_seconds(const nb::list& arrays, int per_set, int calls, int threads) {
  auto sets = buffer_sets(arrays, per_set, "read_seconds");
  check_threads(threads, "read_seconds");
  if (calls < 1) bad("read_seconds: calls >= 1");
  const SpanFn span = read_span();
  nb::gil_scoped_release unlocked;
  double best = 1e30;
  uint64_t keep = 0;
  for (int rep = 0; rep < 5; rep++)
    for (bool ahead : {false, true}) {
      SetRead r{nullptr, span, ahead, threads, std::vector<uint64_t>(size_t(threads))};
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < calls; i++) keep |= r.run(sets[size_t(i) % sets.size()]);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / calls);
    }
  volatile uint64_t sink = keep;
  (void)sink;
  return best;
}

// The OR of every byte of the arrays, read as read_seconds reads them (for the tests: each byte is read).
uint64_t read_or(const nb::list& arrays, int threads, bool ahead) {
  auto sets = buffer_sets(arrays, 1, "read_or");
  check_threads(threads, "read_or");
  Spans all;
  for (auto& s : sets) all.push_back(s[0]);
  nb::gil_scoped_release unlocked;
  return SetRead{nullptr, read_span(), ahead, threads, {}}.run(all);
}

}  // namespace

void register_read_reference(nb::module_& m) {
  m.def("read_bandwidth", &read_bandwidth, "nbytes"_a, "threads"_a, "reps"_a);
  m.def("read_seconds", &read_seconds, "arrays"_a, nb::kw_only(), "per_set"_a, "calls"_a, "threads"_a);
  m.def("read_or", &read_or, "arrays"_a, nb::kw_only(), "threads"_a, "ahead"_a);
}
