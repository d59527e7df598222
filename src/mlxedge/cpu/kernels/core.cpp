// mlxedge native CPU kernels: affine quantized GEMV/GEMM (4/8 bits), fused gate*up(silu), float GEMM.
//
// One translation unit, no MLX dependency, C ABI (core.h). Three ISA paths share one driver:
//   scalar  portable C++ (the reference path; also what arm64 runs, where NEON is the compiler's
//           baseline and -O3 vectorises the dequantise-then-dot loops)
//   avx2    x86-64 AVX2+FMA+F16C through target attributes, chosen at run time from cpuid; its 4-bit decode
//           GEMV in integer dot products (vpmaddubsw, vpmaddwd) on x split into 8-bit digits (digits_x_avx2)
//   avx512  the avx2 path with the quantized GEMV (qdot) in 512-bit vectors, where the CPU has AVX-512F
//   avx512vnni  the avx512 path with the 4- and 8-bit decode GEMV in integer dot products (AVX-512 VNNI, BW,
//           VBMI, GFNI) on x split exactly into 8-bit digits (see digits_x)
// Work is split over output rows (N) on a persistent thread pool; the caller thread takes part.
//
// Planted bugs for the mutation tests: compile with -DMLXEDGE_PLANT_<NAME> (see PLANT_NAME below).
#include "core.h"
#include "dtype.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <thread>
#include <vector>

#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>

#include "simd.h"  // MLXE_X86, MLXE_AVX2_FN, hsum8

#if defined(MLXEDGE_PLANT_NIBBLE_SHIFT)
#define PLANT_NAME "nibble_shift"
#elif defined(MLXEDGE_PLANT_GROUP_INDEX)
#define PLANT_NAME "group_index"
#elif defined(MLXEDGE_PLANT_DROPPED_BIAS)
#define PLANT_NAME "dropped_bias"
#elif defined(MLXEDGE_PLANT_OFF_BY_ONE_ROW)
#define PLANT_NAME "off_by_one_row"
#elif defined(MLXEDGE_PLANT_OFF_BY_ONE_COL)
#define PLANT_NAME "off_by_one_col"
#elif defined(MLXEDGE_PLANT_MISSING_REMAINDER)
#define PLANT_NAME "missing_remainder"
#elif defined(MLXEDGE_PLANT_RACE_PARTITION)
#define PLANT_NAME "race_partition"
#elif defined(MLXEDGE_PLANT_PREPARE_RACE)
#define PLANT_NAME "prepare_race"
#else
#define PLANT_NAME ""
#endif

// Which group holds element k of a row (gs is a power of two: a shift, not a division in the hot loops).
#ifdef MLXEDGE_PLANT_GROUP_INDEX
#define GROUP_OF(k, gs) ((k) / 64)  // planted: assumes the default group size
#else
#define GROUP_OF(k, gs) ((k) >> __builtin_ctz(unsigned(gs)))
#endif

// Shift of the i-th 4-bit element inside its 32-bit word (little-endian bitstream).
#ifdef MLXEDGE_PLANT_NIBBLE_SHIFT
#define NIBBLE_SHIFT(i) (4 * (7 - (i)))  // planted: big-endian nibble order
#else
#define NIBBLE_SHIFT(i) (4 * (i))
#endif

#ifdef MLXEDGE_PLANT_DROPPED_BIAS
#define BIAS_ON 0.0f
#else
#define BIAS_ON 1.0f
#endif

#ifdef MLXEDGE_PLANT_OFF_BY_ONE_ROW
#define ROWS_END(M) ((M) > 1 ? (M) - 1 : (M))  // planted: the last activation row is skipped
#else
#define ROWS_END(M) (M)
#endif

#ifdef MLXEDGE_PLANT_OFF_BY_ONE_COL
#define COLS_END(N) ((N) - 1)  // planted: the last output column (weight row) is skipped
#else
#define COLS_END(N) (N)
#endif

#ifdef MLXEDGE_PLANT_MISSING_REMAINDER
#define REMAINDER_ON 0
#else
#define REMAINDER_ON 1
#endif

namespace {

using namespace mlxe;  // dtype conversions (dtype.h)

void to_f32(const void* src, int dt, int64_t n, float* dst) { load_row(src, dt, 0, n, dst); }

// ---------------------------------------------------------------- thread pool

// A job lives on the caller's stack. Workers join it through a hazard-style reference count, so the
// caller waits only for the tasks and for workers already inside the job -- never for a worker the OS
// has not scheduled yet (which on a loaded machine can take milliseconds).
//
// Its tasks are dealt out as contiguous runs, one per thread (slot): a thread takes its own run from the
// front, then steals what is left of the others' from their backs, one task at a time. A thread working
// through its run reads consecutive rows, so a GEMV's prefetch can run on into the next task (fn's
// run_end: the end of the run the task came from, as it stood when taken) instead of starting cold at
// every task; a worker the OS schedules late still leaves nothing undone (its run is stolen). Before,
// tasks went out one at a time in order, so a thread's consecutive tasks were not adjacent and each
// started cold. Zen 4, 2 threads, from DRAM (scripts/gemv_core_timing.cpp, 5 interleaved runs): 576x576
// 4-bit 13.2-20.6 -> 11.2-13.0 us (medians 14.1 -> 12.4), 192x576 7.2-14.2 -> 5.6-10.6; SmolLM2's
// sub-MB GEMVs in scripts/bench_cpu_kernels.py 10-30% faster, the 1B-class and head rows unchanged.
// SmolLM2 decode: faster in two A/Bs (4-bit 81 -> 88 tok/s, 8-bit 68 -> 79), equal in a third that
// also ran each build twice, and the two copies of one build differed by 10% there: within this VM's noise.
constexpr int kMaxSlots = 64;

// Each slot's task span sits on its own cache line, as does the count of tasks done (which each thread adds
// to once, as it leaves the job): a thread taking its own tasks then touches no line another thread writes,
// except when stealing. Before, the spans and the count shared one line, and every task's take and count
// moved it between the cores. Two threads, 4/64, 8 interleaved rounds (scripts/gemv_core_timing.cpp, medians):
// 576x576 9.2 -> 8.5 us in cache, 12.4 -> 11.8 from DRAM; 1536x576 (39 tasks) 22.7 -> 20.6 and 33.3 -> 30.2.
// SmolLM2 4-bit decode 68.7 -> 74.3 tok/s, faster in 8 of 10 paired rounds (scripts/decode_env_ab.py).
struct alignas(64) Span {
  std::atomic<uint64_t> v;  // first << 32 | end
};

// What a job does before its tasks (Pool::run): once the job is posted, the calling thread runs `prepare`
// (e.g. converting the activations the tasks read) while the workers join; each thread first calls `warm`
// for the first task of its run (e.g. asking memory for that task's first weight rows), and no task starts
// until `prepare` has returned (which it must do: it may not throw, as nothing here may across the C ABI).
// Before, a decode GEMV prepared x and only then posted its job: the
// worker's wake-up and its first rows' DRAM latency came after the preparation instead of during it.
// Emerald Rapids, 2 threads (ab_core_builds.cpp SEP=1 COLD=1, interleaved, two rounds): from DRAM 192x576
// 8/32 6.84 -> 6.42 us, 576x576 4/64 9.69 -> 9.22-9.45, 1536x576 4/32 and 8192x2048 4/64 unchanged; from
// L3 (ROTATE_MB=100) 192x576 8/32 5.23-5.34 -> 5.01-5.12, 1536x576 4/32 16.5-16.8 -> 15.8-16.3.
struct Prelude {
  void (*prepare)(void* ctx);
  void (*warm)(void* ctx, int64_t first, int64_t run_end);
};

struct Job {
  void (*fn)(void* ctx, int64_t task, int64_t run_end);
  void* ctx;
  const Prelude* pre = nullptr;
  std::atomic<bool> open{true};  // tasks may start (false while pre->prepare runs)
  int64_t ntasks;
  int nslots;
  std::atomic<int> joined{1};  // the caller is slot 0
  alignas(64) std::atomic<int64_t> done{0};
  Span left[kMaxSlots];  // slot s's tasks not yet taken

  // slot s's tasks [first, end) as one word
  static uint64_t span_of(int64_t first, int64_t end) { return (uint64_t(first) << 32) | uint64_t(end); }

  // take a task left in slot s: the first (its owner, front = true; run_end is then the run's end as it
  // stands) or the last (a thief; run_end = t + 1, as nothing after it is this thread's)
  bool take(int s, bool front, int64_t& t, int64_t& run_end) {
    uint64_t v = left[s].v.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t first = int64_t(v >> 32), end = int64_t(v & 0xFFFFFFFFu);
      if (first >= end) return false;
      const uint64_t rest = front ? span_of(first + 1, end) : span_of(first, end - 1);
      if (left[s].v.compare_exchange_weak(v, rest, std::memory_order_relaxed)) {
        t = front ? first : end - 1;
        run_end = front ? end : t + 1;
        return true;
      }
    }
  }
};

class Pool {
 public:
  using Fn = void (*)(void* ctx, int64_t task, int64_t run_end);

  explicit Pool(int n) : n_(std::max(1, n)) {
    // Idle workers spin (pause loop) briefly before sleeping only where cores are left over: beside the
    // pool, the Python thread (building the next step's graph) and MLX's stream thread are busy during
    // decode, and a pause-spinning worker on a 2-core machine took ~20% of the decode speed from them.
    // Then, everywhere, a worker polls for yield_us_ while yielding its core to any runnable thread:
    // waking a sleeping worker costs 10-30 us on a VM (a halted vCPU), more than a small GEMV, and decode
    // issues its jobs a few tens of us apart. SmolLM2 decode on this 2-core VM: 125-127 -> 139-146
    // tok/s with 100-300 us (interleaved A/B, five rounds each).
    const int cores = int(std::thread::hardware_concurrency());
    spin_limit_ = (cores > 0 && n_ + 2 <= cores) ? 2000 : 0;
    if (const char* e = std::getenv("MLXEDGE_CPU_SPIN")) spin_limit_ = std::max(0, std::atoi(e));
    if (const char* e = std::getenv("MLXEDGE_CPU_YIELD_US")) yield_us_ = std::max(0, std::atoi(e));
    for (int i = 1; i < n_; i++) workers_.emplace_back([this] {
      // Workers take no signals: a Ctrl-C must reach the thread Python waits in (a SIGINT delivered
      // here would leave the main thread blocked in read(), e.g. at the chat prompt).
      sigset_t all;
      sigfillset(&all);
      pthread_sigmask(SIG_BLOCK, &all, nullptr);
      loop();
    });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return n_; }

  // Run fn(ctx, t, run_end) for t in [0, ntasks) (Job: run_end is a hint, t < run_end <= ntasks); the
  // calling thread takes part. With a Prelude, its prepare(ctx) runs first (see Prelude). One job at a time.
  void run(int64_t ntasks, Fn fn, void* ctx, const Prelude* pre = nullptr) {
    if (ntasks <= 0 || n_ == 1 || ntasks == 1 || ntasks > int64_t(0xFFFFFFFF)) {  // (a job's slots hold 32-bit task numbers)
      if (pre) {
        if (ntasks > 0) pre->warm(ctx, 0, ntasks);
        pre->prepare(ctx);
      }
      for (int64_t t = 0; t < ntasks; t++) fn(ctx, t, ntasks);
      return;
    }
    std::lock_guard<std::mutex> job_lock(job_mu_);
    Job job;
    job.fn = fn;
    job.ctx = ctx;
    job.ntasks = ntasks;
    job.pre = pre;
#ifdef MLXEDGE_PLANT_PREPARE_RACE  // workers start tasks while the caller still prepares their input
    job.open.store(true, std::memory_order_relaxed);
#else
    job.open.store(pre == nullptr, std::memory_order_relaxed);
#endif
    job.nslots = int(std::min<int64_t>({int64_t(n_), ntasks, int64_t(kMaxSlots)}));
    for (int s = 0; s < job.nslots; s++)
      job.left[s].v.store(Job::span_of(ntasks * s / job.nslots, ntasks * (s + 1) / job.nslots), std::memory_order_relaxed);
    job_.store(&job, std::memory_order_release);
    {
      std::lock_guard<std::mutex> lk(mu_);
      gen_.fetch_add(1, std::memory_order_release);
      if (sleepers_ > 0) cv_.notify_all();
    }
    if (pre) {
      warm(job, 0);
      pre->prepare(ctx);
      job.open.store(true, std::memory_order_release);
    }
    work(job, 0);
    for (int spin = 0; job.done.load(std::memory_order_acquire) != ntasks; spin++) {
      if (spin > 4000) std::this_thread::yield();
      else cpu_relax();
    }
    job_.store(nullptr, std::memory_order_seq_cst);
    // workers that took a reference before the store above may still be reading job.next
    while (refs_.load(std::memory_order_seq_cst) != 0) std::this_thread::yield();
  }

 private:
  static inline void cpu_relax() {
#ifdef MLXE_X86
    _mm_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }

  // a Prelude's warm for the first task of slot's run (a thread past the job's slots has none)
  static void warm(Job& job, int slot) {
    if (slot >= job.nslots) return;
    const uint64_t v = job.left[slot].v.load(std::memory_order_relaxed);
    const int64_t first = int64_t(v >> 32), end = int64_t(v & 0xFFFFFFFFu);
    if (first < end) job.pre->warm(job.ctx, first, end);
  }

  // k = 0: the slot's own run, from the front; then every slot's leftovers, from the back (steals). A slot
  // past the job's is a thread with no run of its own: it only steals.
  static void work(Job& job, int slot) {
    int64_t t, run_end, ran = 0;
    for (int k = slot < job.nslots ? 0 : 1; k <= job.nslots; k++) {
      const int s = (slot + k) % job.nslots;
      while (job.take(s, k == 0, t, run_end)) {
        job.fn(job.ctx, t, run_end);
        ran++;
      }
    }
    // all of this thread's tasks are done (nothing is left to take): count them at once
    if (ran) job.done.fetch_add(ran, std::memory_order_release);
  }

  void join_current() {
    refs_.fetch_add(1, std::memory_order_seq_cst);
    Job* j = job_.load(std::memory_order_seq_cst);
    if (j) {
      const int slot = j->joined.fetch_add(1, std::memory_order_relaxed);
      if (!j->open.load(std::memory_order_acquire)) {  // the caller is still preparing
        warm(*j, slot);
        while (!j->open.load(std::memory_order_acquire)) cpu_relax();
      }
      work(*j, slot);
    }
    refs_.fetch_sub(1, std::memory_order_seq_cst);
  }

  void loop() {
    uint64_t seen = gen_.load(std::memory_order_acquire);
    for (;;) {
      // spin briefly (decode issues many small jobs back to back), then sleep
      bool woke = false;
      for (int spin = 0; spin < spin_limit_; spin++) {
        if (gen_.load(std::memory_order_acquire) != seen) {
          woke = true;
          break;
        }
        cpu_relax();
      }
      if (!woke && yield_us_ > 0) {
        const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(yield_us_);
        while (!woke && std::chrono::steady_clock::now() < until) {
          if (gen_.load(std::memory_order_acquire) != seen) woke = true;
          else std::this_thread::yield();
        }
      }
      if (!woke) {
        std::unique_lock<std::mutex> lk(mu_);
        sleepers_++;
        cv_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != seen; });
        sleepers_--;
      }
      seen = gen_.load(std::memory_order_acquire);
      if (stop_) return;
      join_current();
    }
  }

  int n_;
  std::vector<std::thread> workers_;
  std::mutex mu_, job_mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<Job*> job_{nullptr};
  std::atomic<int> refs_{0};
  int sleepers_ = 0;
  int spin_limit_ = 0;  // pause-loop iterations an idle worker spins before it sleeps
  int yield_us_ = 300;  // then microseconds it polls, yielding its core to any other runnable thread
  std::atomic<bool> stop_{false};
};

// ---------------------------------------------------------------- global state

int g_isa = MLXE_ISA_SCALAR;
int g_gemv_max_rows = 16;  // measured here: GEMV beats dequantise+GEMM up to ~16 rows
Pool* g_pool = nullptr;
// Held by every kernel call and by mlxe_init: the ISA and the pool never change under a running kernel.
std::mutex g_call_mu;

using sgemm_fn = void (*)(int order, int ta, int tb, int M, int N, int K, float alpha,
                          const float* A, int lda, const float* B, int ldb, float beta, float* C,
                          int ldc);
using setthreads_fn = void (*)(int);
sgemm_fn g_sgemm = nullptr;
bool g_use_blas = false;
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

void init_locked(int isa, int nthreads);

Pool& pool() { return *g_pool; }  // kernels run under g_call_mu after enter_kernel()

std::unique_lock<std::mutex> enter_kernel() {
  std::unique_lock<std::mutex> lk(g_call_mu);
  if (!g_pool) init_locked(MLXE_ISA_AUTO, 0);
  return lk;
}

template <class F>
void parallel_for(int64_t ntasks, F&& f) {
  auto tramp = [](void* ctx, int64_t t, int64_t) { (*static_cast<F*>(ctx))(t); };
  pool().run(ntasks, tramp, &f);
}

// parallel_for whose f also takes the end of the run task t came from (Job): the tasks the same thread
// will probably take next, t + 1 .. run_end - 1, e.g. for prefetching on past t's own rows
template <class F>
void parallel_for_runs(int64_t ntasks, F&& f) {
  auto tramp = [](void* ctx, int64_t t, int64_t run_end) { (*static_cast<F*>(ctx))(t, run_end); };
  pool().run(ntasks, tramp, &f);
}

// parallel_for_runs with a Prelude: prepare() on the calling thread first, warm(first, run_end) on each
// thread for its run's first task meanwhile (see Prelude)
template <class F, class W, class P>
void parallel_for_runs_prepared(int64_t ntasks, F&& f, W&& warm, P&& prepare) {
  struct Ctx {
    std::remove_reference_t<F>* f;
    std::remove_reference_t<W>* warm;
    std::remove_reference_t<P>* prepare;
  } ctx{&f, &warm, &prepare};
  static const Prelude pre{[](void* c) { (*static_cast<Ctx*>(c)->prepare)(); },
                           [](void* c, int64_t t, int64_t run_end) { (*static_cast<Ctx*>(c)->warm)(t, run_end); }};
  auto tramp = [](void* c, int64_t t, int64_t run_end) { (*static_cast<Ctx*>(c)->f)(t, run_end); };
  pool().run(ntasks, tramp, &ctx, &pre);
}

// Per-thread GEMM tile buffer: size it with reserve_tiles(n) on the calling thread before the
// parallel loop, then take it with tile_buffer() inside a task. The planted race hands every
// thread the same buffer.
#ifdef MLXEDGE_PLANT_RACE_PARTITION
std::vector<float> g_shared_tile;
void reserve_tiles(int64_t n) {
  if (g_shared_tile.size() < size_t(n)) g_shared_tile.resize(size_t(n));
}
float* tile_buffer(int64_t) { return g_shared_tile.data(); }
#else
void reserve_tiles(int64_t) {}
float* tile_buffer(int64_t n) {
  thread_local std::vector<float> mine;
  if (mine.size() < size_t(n)) mine.resize(size_t(n));
  return mine.data();
}
#endif
std::vector<float>& row_scratch() {
  thread_local std::vector<float> mine;
  return mine;
}

// ---------------------------------------------------------------- quantized operands

struct QW {
  const uint32_t* w;
  const void* s;
  const void* b;
  int sdt;
  int64_t N, K;
  int bits, gs;
  int64_t words_per_row() const { return K * bits / 32; }
  int64_t groups() const { return K / gs; }
};

// Activations prepared once per call: float copy, per-group sums, and (avx2) a permuted copy
// whose order matches the lanes the packed words unpack into.
struct XPrep {
  std::vector<float> xf, xp, xsum;
  int64_t M, K;
  int64_t G;
  int64_t ldp = 0;  // row stride of xp (K, or K rounded up to whole 512-bit blocks, zero-padded)
  // decode: x as three signed 8-bit digits per element, and each block's power of two, laid out for the
  // ISA's integer GEMV (avx512vnni, 4 and 8 bits: digits_x, 128-element blocks; avx2, 4 bits:
  // digits_x_avx2, 64-element blocks); `digits` says they hold x (else the float GEMV runs)
  std::vector<int8_t> xq;
  std::vector<float> xexp;
  bool digits = false;
};

// The SIMD GEMVs unpack element s of a packed word without a shift where they can: (word & (mask <<
// shift)) is q * 2^shift, exact as an int32 and as a float, and the permuted activations carry the
// matching 2^-shift (a power of two: exact unless x is below ~1e-30). That takes the shift off the
// FP ports' busiest path. Only the element in the top bits is shifted down instead, since as a signed
// int32 it would read negative.
constexpr int sub_shift(int bits, int s) { return bits == 4 ? NIBBLE_SHIFT(s) : 8 * s; }
constexpr bool sub_by_shift(int bits, int s) { return sub_shift(bits, s) == 32 - bits; }
constexpr uint32_t sub_mask(int bits, int s) { return ((1u << bits) - 1u) << sub_shift(bits, s); }
inline float sub_x_scale(int bits, int s) {
  return sub_by_shift(bits, s) ? 1.f : std::ldexp(1.f, -sub_shift(bits, s));
}

// converted biases times BIAS_ON: nothing unless the dropped-bias plant is built in
inline void plant_bias(float* b, int64_t n) {
  if (BIAS_ON != 1.0f)
    for (int64_t g = 0; g < n; g++) b[g] *= BIAS_ON;
}

// scales/biases of one weight row as float
void row_params(const QW& q, int64_t n, float* s, float* b) {
  const int64_t G = q.groups();
  load_row(q.s, q.sdt, n * G, G, s);
  load_row(q.b, q.sdt, n * G, G, b);
  plant_bias(b, G);
}

// Software prefetch for the GEMVs, which stream their weights once from DRAM: the hardware prefetcher
// stops at each 4 KB page and ramps up again, so a single thread got ~40% of the read bandwidth; asking
// for the rows ~8 KB ahead while computing took the 49152x576 8-bit head from 42% to 75-80% of it on
// one thread (Zen 5, scripts/bench_cpu_kernels.py). The lines are asked into L2, not L1 (prefetcht2, not
// t0): each L1 prefetch holds one of L1's few miss buffers until its line arrives, which caps the lines in
// flight — on a Zen 4 host the memory-bound GEMVs read 1.3-1.8x faster from DRAM with t2 (1536x576 8-bit
// 80 -> 47 us, the head 2.2 -> 1.2 ms; compute-bound ones unchanged) and SmolLM2's decode went from 63-64
// to 78-83 tok/s (scripts/decode_env_ab.py, 8 interleaved rounds). 16 KB ahead measured no better.
constexpr int64_t kPrefetchBytes = 8192;

// ask for the cache line holding p, into L2 (see above)
inline __attribute__((always_inline)) void prefetch_line(const void* p) {
#ifdef MLXE_X86
  // GCC emits no prefetch instruction for the generic x86-64 target (no -march): __builtin_prefetch
  // and _mm_prefetch compile to nothing there, so say it directly (SSE, on every x86-64)
  asm volatile("prefetcht2 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 2);  // locality 2: into L2 (PLDL2KEEP on arm64)
#endif
}

void prefetch_bytes(const void* p, int64_t nbytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < nbytes; off += 64) prefetch_line(c + off);
}

// weight rows to run ahead by, for rows of `row_bytes`
int64_t prefetch_rows_ahead(int64_t row_bytes) { return std::max<int64_t>(1, kPrefetchBytes / row_bytes); }

// prefetch the scales and biases of quantized rows [n0, n1) (clipped to the matrix)
void prefetch_qparams(const QW& q, int64_t n0, int64_t n1) {
  n1 = std::min(n1, q.N);
  if (n0 >= n1) return;
  const int64_t G = q.groups(), ssz = q.sdt == MLXE_F32 ? 4 : 2;
  prefetch_bytes(static_cast<const char*>(q.s) + n0 * G * ssz, (n1 - n0) * G * ssz);
  prefetch_bytes(static_cast<const char*>(q.b) + n0 * G * ssz, (n1 - n0) * G * ssz);
}

// prefetch quantized rows [n0, n1) (clipped to the matrix): packed words, scales and biases
void prefetch_qrows(const QW& q, int64_t n0, int64_t n1) {
  n1 = std::min(n1, q.N);
  if (n0 >= n1) return;
  prefetch_bytes(q.w + n0 * q.words_per_row(), (n1 - n0) * q.words_per_row() * 4);
  prefetch_qparams(q, n0, n1);
}

int64_t qrow_bytes(const QW& q) { return q.words_per_row() * 4 + 2 * q.groups() * (q.sdt == MLXE_F32 ? 4 : 2); }

// Prefetch for the four-row decode loops (decode_rows4_*), one step (four rows) at a time. The step runs
// a whole number of steps ahead (`lead` rows, `ahead` rounded up to fours) and asks for one line of each of
// those four rows per block it computes (`line`), so the requests are spread over the step as its reads
// are; scales and biases come in one burst at the step's start (a line or two per row). Before, each step
// asked for its next rows in one burst, `ahead` rows on, and long rows read DRAM at half speed: at K = 4096
// (2 KB of 4-bit words) `ahead` is 2 rows, fewer than a step computes, so the burst asked for rows already
// being read, and a burst of 128 lines runs past the core's miss buffers. From DRAM (Zen 4, one thread,
// scripts/gemv_core_timing.cpp, interleaved): 4096x4096 4-bit 10-11 -> 17-19 GB/s, 2048x8192 4-bit
// 10-11 -> 14-15, 2048x2048 8-bit 11 -> 18, 576x1536 8-bit 92 -> 55 us; the avx2 path (qdotr_avx2_t)
// 4096x4096 4-bit 1.50 -> 0.96 ms. SmolLM2's 576-element 4-bit rows are unchanged within noise, as is its
// decode (decode_env_ab.py, 6 rounds: 71-74 before, 74-77 tok/s after). The line asked for is the one
// that ends the block: asking for the first left the last line of rows that are not a whole number of
// lines (288 bytes) unasked, and 576x576 ran 1.7x slower.
constexpr int64_t kParamsPrefetchMinRowBits = 4096;  // StepPrefetch::step

struct StepPrefetch {
  const QW& q;
  const int64_t nlim, lead;  // rows at and past nlim are not asked for
  const uint32_t* next[4];   // the packed words of rows n + lead .. n + lead + 3 (row n for those past nlim)

  // the caller prefetched rows [n0, n0 + ahead): complete them to the lead
  StepPrefetch(const QW& w, int64_t n0, int64_t row_limit, int64_t ahead)
      : q(w), nlim(row_limit), lead((ahead + 3) / 4 * 4) {
    prefetch_qrows(q, n0 + ahead, std::min(nlim, n0 + lead));
  }

  // at the start of the step computing rows n .. n + 3. Rows of up to 512 bytes of words (4-bit K <= 1024)
  // leave their scales and biases to the hardware prefetcher: four of them take a few dozen bytes of each
  // array, read in order, and asking for them cost more than it saved -- two threads, Zen 3, from DRAM with
  // every array in its own allocation (ab_core_builds.cpp SEP=1 COLD=1, interleaved): 576x576 4/64 13.1-16.1
  // -> 12.6-15.9 us, 1536x576 27.2-28.2 -> 26.7-27.2; 576x1536 (768-byte rows, still asked for) unchanged.
  inline __attribute__((always_inline)) void step(int64_t n) {
    if (q.K * q.bits > kParamsPrefetchMinRowBits) prefetch_qparams(q, n + lead, std::min(nlim, n + lead + 4));
    for (int r = 0; r < 4; r++) next[r] = q.w + (n + lead + r < nlim ? n + lead + r : n) * q.words_per_row();
  }

  // while computing a block of the step's rows: wo is the word offset of the block's last word (its line
  // ends the block; a row that is not a whole number of lines starts in the line that ends the row before)
  inline __attribute__((always_inline)) void line(int64_t wo) const {
    prefetch_line(next[0] + wo);
    prefetch_line(next[1] + wo);
    prefetch_line(next[2] + wo);
    prefetch_line(next[3] + wo);
  }
};

// ---- scalar path

// dot(x, deq(W[n])) for `mr` activation rows at once; res[i] for x row m0+i
void qdot_scalar(const QW& q, int64_t n, const XPrep& xp, int64_t m0, int mr, const float* s,
                 const float* b, float* res) {
  const int64_t K = q.K, G = q.groups();
  const uint32_t* wr = q.w + n * q.words_per_row();
  float deq[32];
  for (int i = 0; i < mr; i++) res[i] = 0.f;
  // walk 32 elements at a time (one 32-element chunk lies inside one group since gs >= 32)
  for (int64_t k0 = 0; k0 < K; k0 += 32) {
    if (q.bits == 4) {
      const uint32_t* wk = wr + k0 / 8;
      for (int j = 0; j < 4; j++)
        for (int i = 0; i < 8; i++) deq[j * 8 + i] = float((wk[j] >> NIBBLE_SHIFT(i)) & 0xFu);
    } else {
      const uint32_t* wk = wr + k0 / 4;
      for (int j = 0; j < 8; j++)
        for (int i = 0; i < 4; i++) deq[j * 4 + i] = float((wk[j] >> (8 * i)) & 0xFFu);
    }
    const int64_t g = GROUP_OF(k0, q.gs);
    for (int i = 0; i < mr; i++) {
      const float* x = xp.xf.data() + (m0 + i) * K + k0;
      float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      for (int k = 0; k < 32; k += 4) {
        a0 += deq[k] * x[k];
        a1 += deq[k + 1] * x[k + 1];
        a2 += deq[k + 2] * x[k + 2];
        a3 += deq[k + 3] * x[k + 3];
      }
      res[i] += s[g] * ((a0 + a1) + (a2 + a3));
    }
  }
  for (int i = 0; i < mr; i++) {
    const float* xs = xp.xsum.data() + (m0 + i) * G;
    float bt = 0;
    for (int64_t g = 0; g < G; g++) bt += b[g] * xs[g];
    res[i] += bt;
  }
}

// dequantize rows [n0, n1) of W into dst (row-major, K floats per row)
void dequant_scalar(const QW& q, int64_t n0, int64_t n1, float* dst) {
  const int64_t K = q.K, G = q.groups(), wpr = q.words_per_row();
  for (int64_t n = n0; n < n1; n++) {
    const uint32_t* wr = q.w + n * wpr;
    float* d = dst + (n - n0) * K;
    for (int64_t k = 0; k < K; k++) {
      uint32_t v;
      if (q.bits == 4) v = (wr[k / 8] >> NIBBLE_SHIFT(k % 8)) & 0xFu;
      else v = (wr[k / 4] >> (8 * (k % 4))) & 0xFFu;
      const int64_t g = GROUP_OF(k, q.gs);
      d[k] = load_as_f32(q.s, q.sdt, n * G + g) * float(v) +
             load_as_f32(q.b, q.sdt, n * G + g) * BIAS_ON;
    }
  }
}

float fdot_scalar(const float* a, const float* b, int64_t K) {
  float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    a0 += a[k] * b[k];
    a1 += a[k + 1] * b[k + 1];
    a2 += a[k + 2] * b[k + 2];
    a3 += a[k + 3] * b[k + 3];
  }
  if (REMAINDER_ON)
    for (; k < K; k++) a0 += a[k] * b[k];
  return (a0 + a1) + (a2 + a3);
}

// C[m, c] = sum_k A[m,k] B[c,k] for m < M, c < NB (A: lda=K, B: ldb=K, C: ldc)
void gemm_nt_scalar(const float* A, const float* B, float* C, int64_t M, int64_t NB, int64_t K,
                    int64_t ldc) {
  for (int64_t m = 0; m < M; m++)
    for (int64_t c = 0; c < NB; c++) C[m * ldc + c] = fdot_scalar(A + m * K, B + c * K, K);
}

// ---- avx2 path
#ifdef MLXE_X86
#define AVX2_FN MLXE_AVX2_FN

// src[0 .. n) of dtype dt as float32 into dst: float16 through F16C, bfloat16 by a 16-bit shift (exact,
// as bf16_to_f32), the last n % 8 by load_row
AVX2_FN void to_f32_avx2(const void* src, int dt, int64_t n, float* dst) {
  if (dt == MLXE_F32) return to_f32(src, dt, n, dst);
  const uint16_t* p = static_cast<const uint16_t*>(src);
  int64_t i = 0;
  if (dt == MLXE_F16) {
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + i))));
  } else {
    for (; i + 8 <= n; i += 8) {
      const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(p + i)));
      _mm256_storeu_si256((__m256i*)(dst + i), _mm256_slli_epi32(h, 16));
    }
  }
  load_row(src, dt, i, n - i, dst + i);
}

// float32 src[0 .. n) into dst of dtype dt, rounded to nearest even as f32_to_f16/f32_to_bf16 (a NaN stays
// a NaN; float16's through F16C keeps its payload's top bits), the last n % 8 by store_row
AVX2_FN void from_f32_avx2(const float* src, int dt, int64_t n, void* dst) {
  if (dt == MLXE_F32) return store_row(dst, dt, 0, n, src);
  uint16_t* p = static_cast<uint16_t*>(dst);
  int64_t i = 0;
  if (dt == MLXE_F16) {
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128((__m128i*)(p + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  } else {
    const __m256i one = _mm256_set1_epi32(1), half = _mm256_set1_epi32(0x7fff);
    const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    for (; i + 8 <= n; i += 8) {
      const __m256i u = _mm256_loadu_si256((const __m256i*)(src + i));
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
      const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(half, odd)), 16);
      const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
      const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, abs_mask), inf);
      const __m256i h = _mm256_blendv_epi8(rounded, quiet, nan);  // each 0 .. 0xffff: packus keeps it
      _mm_storeu_si128((__m128i*)(p + i),
                       _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
    }
  }
  store_row(dst, dt, i, n - i, src + i);
}

// scales and biases [g0, g0 + count) of the flattened [N, groups] arrays as float32 into s and b
AVX2_FN void params_avx2(const QW& q, int64_t g0, int64_t count, float* s, float* b) {
  const size_t offset = size_t(g0) * (q.sdt == MLXE_F32 ? 4 : 2);
  to_f32_avx2(static_cast<const char*>(q.s) + offset, q.sdt, count, s);
  to_f32_avx2(static_cast<const char*>(q.b) + offset, q.sdt, count, b);
  plant_bias(b, count);
}

// row n's scales and biases as float32 into s and b
AVX2_FN void row_params_avx2(const QW& q, int64_t n, float* s, float* b) {
  params_avx2(q, n * q.groups(), q.groups(), s, b);
}

// Permuted activations for the SIMD GEMVs: within each block of L words (L = 8 lanes for avx2, 16
// for avx512), lane j of the vector for sub-element s holds the x matching element s of word j, times
// sub_x_scale(bits, s). With E = 32/bits elements per word and blocks of L*E elements:
//   xp[blk*L*E + s*L + j] = x[blk*L*E + E*j + s] * sub_x_scale(bits, s)
// avx2 (L = 8): a trailing 32-element 4-bit block (K % 64 == 32) is kept in natural order, unscaled,
// for the remainder loop. avx512 (L = 16): a trailing partial block is zero-padded to a whole one (ldp).
// The avx2 path runs the same layout in vectors (permute_x_avx2); this loop is avx512's and its reference.
void permute_x(XPrep& p, int bits, int lanes) {
  const int64_t M = p.M, K = p.K, E = 32 / bits, BE = lanes * E;
  p.ldp = lanes == 16 ? (K + BE - 1) / BE * BE : K;
  p.xp.assign(size_t(M * p.ldp), 0.f);
  float scale[8];
  for (int e = 0; e < E; e++) scale[e] = sub_x_scale(bits, e);
  for (int64_t m = 0; m < M; m++) {
    const float* x = p.xf.data() + m * K;
    float* y = p.xp.data() + m * p.ldp;
    int64_t k0 = 0;
    for (; k0 < K; k0 += BE) {
      const int64_t words = std::min<int64_t>(lanes, (K - k0) / E);
      if (words < lanes && lanes == 8) break;  // avx2's natural-order tail
      for (int e = 0; e < E; e++)
        for (int64_t j = 0; j < words; j++) y[k0 + e * lanes + j] = x[k0 + E * j + e] * scale[e];
    }
    for (; k0 < K; k0++) y[k0] = x[k0];
  }
}

// r[c] lane i = r[i] lane c before: eight vectors of eight 32-bit lanes, transposed in place
AVX2_FN inline void transpose8x8_avx2(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; i++) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);      // a0 b0 a1 b1 | a4 b4 a5 b5
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);  // a2 b2 a3 b3 | a6 b6 a7 b7
  }
  for (int i = 0; i < 2; i++)
    for (int h = 0; h < 2; h++) {
      const __m256 lo = t[4 * i + h], hi = t[4 * i + 2 + h];
      u[4 * i + 2 * h] = _mm256_shuffle_ps(lo, hi, 0x44);      // rows 4i..4i+3, columns 2h (and 2h + 4)
      u[4 * i + 2 * h + 1] = _mm256_shuffle_ps(lo, hi, 0xEE);  // columns 2h + 1 (and 2h + 5)
    }
  for (int c = 0; c < 4; c++) {
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[c + 4] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}

// permute_x for 8 lanes (the avx2 GEMVs) in vectors: a 64-element 4-bit block is an 8x8 transpose (word j's
// elements in lane j), a 32-element 8-bit block two 4x4 ones (words 0-3 and 4-7); each sub-element's
// vector then takes its sub_x_scale. The scalar loop's strided reads cost ~0.7 us per call at K = 576.
AVX2_FN void permute_x_avx2(XPrep& p, int bits) {
  const int64_t M = p.M, K = p.K, E = 32 / bits, BE = 8 * E;
  p.ldp = K;
  p.xp.resize(size_t(M * K));
  __m256 scale[8];
  for (int e = 0; e < E; e++) scale[e] = _mm256_set1_ps(sub_x_scale(bits, e));
  for (int64_t m = 0; m < M; m++) {
    const float* x = p.xf.data() + m * K;
    float* y = p.xp.data() + m * K;
    int64_t k0 = 0;
    for (; k0 + BE <= K; k0 += BE) {
      __m256 v[8];
      if (bits == 4) {
        for (int j = 0; j < 8; j++) v[j] = _mm256_loadu_ps(x + k0 + 8 * j);
        transpose8x8_avx2(v);
      } else {
        __m128 lo[4], hi[4];
        for (int j = 0; j < 4; j++) {
          lo[j] = _mm_loadu_ps(x + k0 + 4 * j);
          hi[j] = _mm_loadu_ps(x + k0 + 16 + 4 * j);
        }
        _MM_TRANSPOSE4_PS(lo[0], lo[1], lo[2], lo[3]);
        _MM_TRANSPOSE4_PS(hi[0], hi[1], hi[2], hi[3]);
        for (int e = 0; e < 4; e++) v[e] = _mm256_insertf128_ps(_mm256_castps128_ps256(lo[e]), hi[e], 1);
      }
      for (int e = 0; e < E; e++) _mm256_storeu_ps(y + k0 + 8 * e, _mm256_mul_ps(v[e], scale[e]));
    }
    for (; k0 < K; k0++) y[k0] = x[k0];  // a trailing 32-element 4-bit chunk stays in natural order, unscaled
  }
}

template <int MR, int NACC = (MR <= 2 ? 4 : 2)>
AVX2_FN void qdot_avx2_t(const QW& q, int64_t n, const XPrep& xp, int64_t m0, const float* s,
                         const float* b, float* res) {
  const int64_t K = q.K, G = q.groups();
  const uint32_t* wr = q.w + n * q.words_per_row();
  const float* xb[MR];
  __m256 tot[MR];
  for (int i = 0; i < MR; i++) {
    xb[i] = xp.xp.data() + (m0 + i) * xp.ldp;
    tot[i] = _mm256_setzero_ps();
  }
  float tail[MR];
  for (int i = 0; i < MR; i++) tail[i] = 0.f;
  if (q.bits == 4) {
    int64_t k0 = 0;
    for (; k0 + 64 <= K; k0 += 64) {
      const __m256i wv = _mm256_loadu_si256((const __m256i*)(wr + k0 / 8));
      // NACC independent accumulator chains per row: the FMA latency (4 cycles), not the ports, bounds
      // a chain, so one or two rows need four chains to keep the FMA units busy
      __m256 acc[NACC][MR];
      for (int a = 0; a < NACC; a++)
        for (int i = 0; i < MR; i++) acc[a][i] = _mm256_setzero_ps();
#define MLXE_Q4_STEP(S)                                                                         \
  {                                                                                            \
    const __m256 qf = _mm256_cvtepi32_ps(sub_by_shift(4, S) ? _mm256_srli_epi32(wv, 28)             \
                                         : _mm256_and_si256(wv, _mm256_set1_epi32(int(sub_mask(4, S))))); \
    for (int i = 0; i < MR; i++)                                                               \
      acc[(S) % NACC][i] = _mm256_fmadd_ps(qf, _mm256_loadu_ps(xb[i] + k0 + (S) * 8), acc[(S) % NACC][i]); \
  }
      MLXE_Q4_STEP(0) MLXE_Q4_STEP(1) MLXE_Q4_STEP(2) MLXE_Q4_STEP(3)
      MLXE_Q4_STEP(4) MLXE_Q4_STEP(5) MLXE_Q4_STEP(6) MLXE_Q4_STEP(7)
#undef MLXE_Q4_STEP
      // words 0-3 belong to the group of element k0, words 4-7 to that of element k0+32
      const __m256 sc = _mm256_insertf128_ps(
          _mm256_castps128_ps256(_mm_set1_ps(s[GROUP_OF(k0, q.gs)])),
          _mm_set1_ps(s[GROUP_OF(k0 + 32, q.gs)]), 1);
      for (int i = 0; i < MR; i++) {
        __m256 sum = _mm256_add_ps(acc[0][i], acc[1][i]);
        if (NACC == 4) sum = _mm256_add_ps(sum, _mm256_add_ps(acc[2 % NACC][i], acc[3 % NACC][i]));
        tot[i] = _mm256_fmadd_ps(sum, sc, tot[i]);
      }
    }
    if (REMAINDER_ON && k0 < K) {  // one trailing 32-element chunk (K is a multiple of 32)
      const uint32_t* wk = wr + k0 / 8;
      const float sg = s[GROUP_OF(k0, q.gs)];
      for (int i = 0; i < MR; i++) {
        float a = 0;
        for (int j = 0; j < 4; j++)
          for (int e = 0; e < 8; e++)
            a += float((wk[j] >> NIBBLE_SHIFT(e)) & 0xFu) * xb[i][k0 + 8 * j + e];
        tail[i] = sg * a;
      }
    }
  } else {
    __m256 tot2[MR];  // a second chain for alternate blocks: one block's four FMAs are short
    for (int i = 0; i < MR; i++) tot2[i] = _mm256_setzero_ps();
    int64_t blk = 0;
    for (int64_t k0 = 0; k0 < K; k0 += 32, blk++) {
      const __m256i wv = _mm256_loadu_si256((const __m256i*)(wr + k0 / 4));
      __m256 acc[NACC][MR];
      for (int a = 0; a < NACC; a++)
        for (int i = 0; i < MR; i++) acc[a][i] = _mm256_setzero_ps();
#define MLXE_Q8_STEP(S)                                                                         \
  {                                                                                            \
    const __m256 qf = _mm256_cvtepi32_ps(sub_by_shift(8, S) ? _mm256_srli_epi32(wv, 24)             \
                                         : _mm256_and_si256(wv, _mm256_set1_epi32(int(sub_mask(8, S))))); \
    for (int i = 0; i < MR; i++)                                                               \
      acc[(S) % NACC][i] = _mm256_fmadd_ps(qf, _mm256_loadu_ps(xb[i] + k0 + (S) * 8), acc[(S) % NACC][i]); \
  }
      MLXE_Q8_STEP(0) MLXE_Q8_STEP(1) MLXE_Q8_STEP(2) MLXE_Q8_STEP(3)
#undef MLXE_Q8_STEP
      const __m256 sc = _mm256_set1_ps(s[GROUP_OF(k0, q.gs)]);
      for (int i = 0; i < MR; i++) {
        __m256 sum = _mm256_add_ps(acc[0][i], acc[1][i]);
        if (NACC == 4) sum = _mm256_add_ps(sum, _mm256_add_ps(acc[2 % NACC][i], acc[3 % NACC][i]));
        if (blk & 1) tot2[i] = _mm256_fmadd_ps(sum, sc, tot2[i]);
        else tot[i] = _mm256_fmadd_ps(sum, sc, tot[i]);
      }
    }
    for (int i = 0; i < MR; i++) tot[i] = _mm256_add_ps(tot[i], tot2[i]);
  }
  for (int i = 0; i < MR; i++) {
    const float* xs = xp.xsum.data() + (m0 + i) * G;
    __m256 bt = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) bt = _mm256_fmadd_ps(_mm256_loadu_ps(b + g), _mm256_loadu_ps(xs + g), bt);
    float r = hsum8(tot[i]) + hsum8(bt) + tail[i];
    for (; g < G; g++) r += b[g] * xs[g];
    res[i] = r;
  }
}

AVX2_FN void qdot_avx2(const QW& q, int64_t n, const XPrep& xp, int64_t m0, int mr,
                       const float* s, const float* b, float* res) {
  switch (mr) {
    case 1: return qdot_avx2_t<1>(q, n, xp, m0, s, b, res);
    case 2: return qdot_avx2_t<2>(q, n, xp, m0, s, b, res);
    case 3: return qdot_avx2_t<3>(q, n, xp, m0, s, b, res);
    default: return qdot_avx2_t<4>(q, n, xp, m0, s, b, res);
  }
}

// The end of a four-row decode step on the avx2 path: out[r] = the lane sum of total r, plus tail[r], plus
// its row's bias terms sum_g b[r][g] * xs[g], for r < rows. The four rows' bias terms go into their totals
// eight groups at a time (the last G % 8 into one vector of the four rows) and the four lane sums share
// three horizontal adds: per row, the step's end had cost about as much as two blocks of its dot product.
AVX2_FN inline __attribute__((always_inline)) void finish_rows4_avx2(const float* const* b, const float* xs, int64_t G,
                                                                     __m256 t0, __m256 t1, __m256 t2, __m256 t3,
                                                                     __m128 tail, int rows, float* out) {
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) {
    const __m256 x = _mm256_loadu_ps(xs + g);
    t0 = _mm256_fmadd_ps(_mm256_loadu_ps(b[0] + g), x, t0);
    t1 = _mm256_fmadd_ps(_mm256_loadu_ps(b[1] + g), x, t1);
    t2 = _mm256_fmadd_ps(_mm256_loadu_ps(b[2] + g), x, t2);
    t3 = _mm256_fmadd_ps(_mm256_loadu_ps(b[3] + g), x, t3);
  }
  for (; g < G; g++) tail = _mm_fmadd_ps(_mm_setr_ps(b[0][g], b[1][g], b[2][g], b[3][g]), _mm_set1_ps(xs[g]), tail);
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(t0, t1), _mm256_hadd_ps(t2, t3));  // row r's half sums: lanes r, r+4
  const __m128 y = _mm_add_ps(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)), tail);
  if (rows == 4) return _mm_storeu_ps(out, y);
  alignas(16) float v[4];
  _mm_store_ps(v, y);
  std::copy(v, v + rows, out);
}

// Decode (one activation row), several weight rows at once, as decode_rows4_avx512_t does on the avx512 path:
// each x vector is loaded once for the R rows and the per-row costs are paid once per R rows. Blocks of
// 8 words (64 elements at 4 bits, 32 at 8); a trailing 32-element 4-bit chunk takes the scalar loop on
// the natural-order tail of xp (see permute_x). 16 ymm registers hold R accumulators, R totals and the
// R packed words of a block for R = 4. `pf` asks for the rows a step ahead as the blocks go (StepPrefetch).
// At 4 bits it runs only where x cannot be held as digits (decode_rows4_digits_avx2: non-finite or tiny x).
template <int BITS, int R>
AVX2_FN void qdotr_avx2_t(const QW& q, int64_t n, const XPrep& xp, const float* const* s, const float* const* b,
                          const StepPrefetch& pf, float* res) {
  constexpr int E = 32 / BITS, BE = 8 * E;
  const int64_t K = q.K, G = q.groups(), wpr = q.words_per_row();
  const uint32_t* wr = q.w + n * wpr;
  const float* x = xp.xp.data();
  __m256 tot[R];
  for (int r = 0; r < R; r++) tot[r] = _mm256_setzero_ps();
  int64_t k0 = 0;
  for (; k0 + BE <= K; k0 += BE) {
    pf.line(k0 / E + 7);  // a 32-byte block: every line is asked for once or twice
    __m256i wv[R];
    __m256 acc[R];
    for (int r = 0; r < R; r++) {
      wv[r] = _mm256_loadu_si256((const __m256i*)(wr + r * wpr + k0 / E));
      acc[r] = _mm256_setzero_ps();
    }
#pragma GCC unroll 8
    for (int e = 0; e < E; e++) {
      const __m256 xv = _mm256_loadu_ps(x + k0 + e * 8);
      for (int r = 0; r < R; r++) {
        const __m256i el = sub_by_shift(BITS, e) ? _mm256_srli_epi32(wv[r], 32 - BITS)
                                                 : _mm256_and_si256(wv[r], _mm256_set1_epi32(int(sub_mask(BITS, e))));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(el), xv, acc[r]);
      }
    }
    // 4 bits: words 0-3 hold elements k0..k0+31, words 4-7 the next 32 (groups of 32 may differ);
    // 8 bits: the block's 32 elements lie in one group
    const int64_t g0 = GROUP_OF(k0, q.gs), g1 = GROUP_OF(k0 + BE / 2, q.gs);
    for (int r = 0; r < R; r++) {
      const __m256 sc = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(s[r][g0])), _mm_set1_ps(s[r][g1]), 1);
      tot[r] = _mm256_fmadd_ps(acc[r], sc, tot[r]);
    }
  }
  float tail[R];
  for (int r = 0; r < R; r++) tail[r] = 0.f;
  if (REMAINDER_ON && k0 < K) {  // 4 bits only: one trailing 32-element chunk, x in natural order
    pf.line(wpr - 1);
    for (int r = 0; r < R; r++) {
      const uint32_t* wk = wr + r * wpr + k0 / 8;
      float a = 0;
      for (int j = 0; j < 4; j++)
        for (int e = 0; e < 8; e++) a += float((wk[j] >> NIBBLE_SHIFT(e)) & 0xFu) * x[k0 + 8 * j + e];
      tail[r] = s[r][GROUP_OF(k0, q.gs)] * a;
    }
  }
  static_assert(R == 4, "finish_rows4_avx2 takes four rows");
  finish_rows4_avx2(b, xp.xsum.data(), G, tot[0], tot[1], tot[2], tot[3], _mm_loadu_ps(tail), 4, res);
}

AVX2_FN void qdot4_avx2(const QW& q, int64_t n, const XPrep& xp, const float* const* s, const float* const* b,
                        const StepPrefetch& pf, float* res) {
  if (q.bits == 4) return qdotr_avx2_t<4, 4>(q, n, xp, s, b, pf, res);
  qdotr_avx2_t<8, 4>(q, n, xp, s, b, pf, res);
}

// ---- avx512 path: the quantized GEMV only

#define AVX512_FN MLXE_AVX512_FN
// GCC 12's own headers: _mm512_undefined_* (permutexvar, reduce_add) read as uninitialised under -Wall
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

// Lane j of a 512-bit block covers elements E*j .. E*j+E-1 of it (E elements per word): its group within
// the block is (E*j) >> log2(gs) — all 0 when one group spans the block.
template <int E>
AVX512_FN __m512i lane_groups_avx512(int gshift) {
  return _mm512_srl_epi32(_mm512_setr_epi32(0, E, 2 * E, 3 * E, 4 * E, 5 * E, 6 * E, 7 * E, 8 * E, 9 * E, 10 * E,
                                            11 * E, 12 * E, 13 * E, 14 * E, 15 * E),
                          _mm_cvtsi32_si128(gshift));
}

// The scales of a block's ng (1 to 4) groups, spread over its lanes by gidx (lane_groups_avx512). Plain
// loads of exactly ng floats: masked 512-bit loads are slow on AMD's Zen 5 when they miss L1.
AVX512_FN inline __m512 block_scales_avx512(const float* s, int ng, __m512i gidx) {
  if (ng == 1) return _mm512_set1_ps(*s);
  const __m128 v = ng == 2   ? _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s)))  // unaligned
                   : ng == 3 ? _mm_setr_ps(s[0], s[1], s[2], 0.f)  // a partial last block
                             : _mm_loadu_ps(s);
  return _mm512_permutexvar_ps(gidx, _mm512_castps128_ps512(v));
}

// acc + b[g] * xs[g] for every group g < G, spread over the lanes (a masked load for the last < 16)
AVX512_FN __m512 add_bias_terms_avx512(__m512 acc, const float* b, const float* xs, int64_t G) {
  int64_t g = 0;
  for (; g + 16 <= G; g += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(b + g), _mm512_loadu_ps(xs + g), acc);
  if (g < G) {
    const __mmask16 m = __mmask16((1u << (G - g)) - 1u);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, b + g), _mm512_maskz_loadu_ps(m, xs + g), acc);
  }
  return acc;
}

// One 512-bit block is 16 packed words (128 elements at 4 bits, 64 at 8): lane j of the vector for
// sub-element e holds element e of word j (the permuted x matches, permute_x with 16 lanes). A trailing
// partial block loads only its words (a masked load) against zero-padded x, so there is no scalar tail.
// Lane j's group: (k0 + E*j) / gs, i.e. a per-lane index into the block's scales.
template <int MR, int BITS, int NACC = (MR <= 2 ? 4 : 2)>
AVX512_FN void qdot_avx512_t(const QW& q, int64_t n, const XPrep& xp, int64_t m0, const float* s,
                             const float* b, float* res) {
  constexpr int E = 32 / BITS, BE = 16 * E;
  const int64_t K = q.K, G = q.groups(), wpr = q.words_per_row();
  const uint32_t* wr = q.w + n * wpr;
  const float* xb[MR];
  __m512 tot[MR];
  for (int i = 0; i < MR; i++) {
    xb[i] = xp.xp.data() + (m0 + i) * xp.ldp;
    tot[i] = _mm512_setzero_ps();
  }
  const int gshift = __builtin_ctz(unsigned(q.gs));
  const int per_block = std::max(1, BE >> gshift);  // groups a block spans
  const __m512i gidx = lane_groups_avx512<E>(gshift);
  for (int64_t k0 = 0; k0 < K; k0 += BE) {
    const int64_t w0 = k0 / E, words = std::min<int64_t>(16, wpr - w0);
    if (!REMAINDER_ON && words < 16) break;
    const __m512i wv = words == 16 ? _mm512_loadu_si512(wr + w0)
                                   : _mm512_maskz_loadu_epi32(__mmask16((1u << words) - 1u), wr + w0);
    const int64_t g0 = GROUP_OF(k0, q.gs);
    const int ng = int(std::min<int64_t>(per_block, G - g0));
    const __m512 sc = _mm512_permutexvar_ps(gidx, _mm512_maskz_loadu_ps(__mmask16((1u << ng) - 1u), s + g0));
    __m512 acc[NACC][MR];
    for (int a = 0; a < NACC; a++)
      for (int i = 0; i < MR; i++) acc[a][i] = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int e = 0; e < E; e++) {  // fully unrolled: acc[e % NACC] must stay in registers
      const __m512i el = sub_by_shift(BITS, e) ? _mm512_srli_epi32(wv, 32 - BITS)
                                               : _mm512_and_si512(wv, _mm512_set1_epi32(int(sub_mask(BITS, e))));
      const __m512 qf = _mm512_cvtepi32_ps(el);
      for (int i = 0; i < MR; i++)
        acc[e % NACC][i] = _mm512_fmadd_ps(qf, _mm512_loadu_ps(xb[i] + k0 + e * 16), acc[e % NACC][i]);
    }
    for (int i = 0; i < MR; i++) {
      __m512 sum = acc[0][i];
      for (int a = 1; a < NACC && a < E; a++) sum = _mm512_add_ps(sum, acc[a][i]);
      tot[i] = _mm512_fmadd_ps(sum, sc, tot[i]);
    }
  }
  for (int i = 0; i < MR; i++) {
    const __m512 bt = add_bias_terms_avx512(_mm512_setzero_ps(), b, xp.xsum.data() + (m0 + i) * G, G);
    res[i] = _mm512_reduce_add_ps(tot[i]) + _mm512_reduce_add_ps(bt);
  }
}

inline void row_params_at(const QW& q, int64_t n, float* s, float* b, const float** sp, const float** bp);

// {sum of a's lanes, b's, c's, d's}
AVX512_FN __m128 hsum4_avx512(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  const __m512 abcd = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  // 128-bit quarters of abcd: a, b, c, d, each four partial sums
  const __m256 lo = _mm512_castps512_ps256(abcd);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1));
  const __m256 h1 = _mm256_hadd_ps(lo, hi);  // a01 a23 c01 c23 | b01 b23 d01 d23
  const __m256 h2 = _mm256_hadd_ps(h1, h1);  // a c a c | b d b d
  return _mm_unpacklo_ps(_mm256_castps256_ps128(h2), _mm256_extractf128_ps(h2, 1));
}

// The four weight rows a decode step takes at once, from row n: their packed words, scales and biases
// (scales/biases converted into `scratch`, 8 * groups floats, where not float32). Past the last row
// (n1) the last one repeats, so a kernel always runs four rows; `rows` says how many results count.
struct Rows4 {
  const uint32_t* w[4];
  const float *s[4], *b[4];
  int rows;
};

// Rows n .. n + 3 whose half-precision scales and biases were converted together (four rows' groups lie
// one after another in memory): scales at scratch[0, 4G), biases at scratch[4G, 8G)
inline __attribute__((always_inline)) Rows4 rows4_converted(const QW& q, int64_t n, const float* scratch) {
  Rows4 r4;
  r4.rows = 4;
  const int64_t G = q.groups();
  for (int r = 0; r < 4; r++) {
    r4.s[r] = scratch + r * G;
    r4.b[r] = scratch + (4 + r) * G;
    r4.w[r] = q.w + (n + r) * q.words_per_row();
  }
  return r4;
}

// Rows n .. n + 3 (the last one repeated past n1) one by one: float32 scales and biases in place, others
// converted into scratch (rows r's at 2rG and (2r + 1)G)
inline __attribute__((always_inline)) Rows4 rows4_each(const QW& q, int64_t n, int64_t n1, float* scratch) {
  Rows4 r4;
  r4.rows = int(std::min<int64_t>(4, n1 - n));
  const int64_t G = q.groups();
  for (int r = 0; r < 4; r++) {
    const int64_t row = n + std::min(r, r4.rows - 1);
    row_params_at(q, row, scratch + 2 * r * G, scratch + (2 * r + 1) * G, &r4.s[r], &r4.b[r]);
    r4.w[r] = q.w + row * q.words_per_row();
  }
  return r4;
}

inline __attribute__((always_inline)) Rows4 rows4_at(const QW& q, int64_t n, int64_t n1, float* scratch) {
#ifdef MLXE_X86
  if (q.sdt != MLXE_F32 && n + 4 <= n1) {
    params_avx2(q, n * q.groups(), 4 * q.groups(), scratch, scratch + 4 * q.groups());
    return rows4_converted(q, n, scratch);
  }
#endif
  return rows4_each(q, n, n1, scratch);
}

// count (even) half-precision values (dt: float16 or bfloat16) from src as float32 into dst, 32 at a time in
// masked loads and stores: inline in the avx512 decode kernels instead of params_avx2's two calls and
// scalar tails per four-row step (576x576 4/64 bfloat16, 2 threads, ab_core_builds BF16=1, interleaved,
// 2 runs: hot 8.23-8.31 -> 8.14-8.18 us, from DRAM 9.57-9.61 -> 9.37-9.41)
AVX512_FN inline __attribute__((always_inline)) void halves_to_f32_avx512(const uint16_t* src, int dt, int64_t count,
                                                                          float* dst) {
  for (int64_t i = 0; i < count; i += 32) {
    const int64_t left = std::min<int64_t>(32, count - i);
    const __mmask16 words = __mmask16((1u << ((left + 1) / 2)) - 1u);  // 32-bit units: two halves each
    const __mmask16 lo = __mmask16((1u << std::min<int64_t>(16, left)) - 1u);
    const __mmask16 hi = __mmask16((1u << std::max<int64_t>(0, left - 16)) - 1u);
    const __m512i v = _mm512_maskz_loadu_epi32(words, src + i);
    const __m256i h0 = _mm512_castsi512_si256(v), h1 = _mm512_extracti64x4_epi64(v, 1);
    __m512 f0, f1;
    if (dt == MLXE_F16) {
      f0 = _mm512_cvtph_ps(h0), f1 = _mm512_cvtph_ps(h1);
    } else {
      f0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h0), 16));
      f1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h1), 16));
    }
    _mm512_mask_storeu_ps(dst + i, lo, f0);
    _mm512_mask_storeu_ps(dst + i + 16, hi, f1);
  }
}

// rows4_at for the avx512 kernels: four rows' half-precision scales and biases converted inline
AVX512_FN inline __attribute__((always_inline)) Rows4 rows4_at_avx512(const QW& q, int64_t n, int64_t n1,
                                                                      float* scratch) {
  if (q.sdt == MLXE_F32 || n + 4 > n1) return rows4_each(q, n, n1, scratch);
  const int64_t G = q.groups();
  halves_to_f32_avx512(static_cast<const uint16_t*>(q.s) + n * G, q.sdt, 4 * G, scratch);
  halves_to_f32_avx512(static_cast<const uint16_t*>(q.b) + n * G, q.sdt, 4 * G, scratch + 4 * G);
  plant_bias(scratch + 4 * G, 4 * G);
  return rows4_converted(q, n, scratch);
}

// The four-row steps of a decode kernel over rows [n0, n1): step(n) asks for the rows ahead (StepPrefetch,
// from the caller's `ahead`, up to row nlim; its line() is for the kernel's blocks) and gives rows n .. n + 3
// (rows4_at, their scales and biases converted into row_scratch where not float32); step_avx512 is the
// same for the avx512 kernels.
struct Rows4Steps {
  const QW& q;
  const int64_t n1;
  float* const scratch;  // 8 * groups floats: four rows' scales and biases
  StepPrefetch pf;

  Rows4Steps(const QW& w, int64_t n0, int64_t row_end, int64_t nlim, int64_t ahead)
      : q(w), n1(row_end), scratch(scratch_of(w.groups())), pf(w, n0, nlim, ahead) {}

  inline __attribute__((always_inline)) Rows4 step(int64_t n) {
    pf.step(n);
    return rows4_at(q, n, n1, scratch);
  }

  AVX512_FN inline __attribute__((always_inline)) Rows4 step_avx512(int64_t n) {
    pf.step(n);
    return rows4_at_avx512(q, n, n1, scratch);
  }

  static float* scratch_of(int64_t G) {
    auto& rs = row_scratch();
    if (rs.size() < size_t(8 * G)) rs.resize(size_t(8 * G));
    return rs.data();
  }
};

// out[0 .. rows) = the four totals' lane sums plus their rows' bias terms, sum_g b[g] * sum(x in g)
AVX512_FN inline __attribute__((always_inline)) void finish_rows4_avx512(const Rows4& r4, const float* xs, int64_t G, __m512 t0, __m512 t1, __m512 t2,
                                          __m512 t3, float* out) {
  t0 = add_bias_terms_avx512(t0, r4.b[0], xs, G);
  t1 = add_bias_terms_avx512(t1, r4.b[1], xs, G);
  t2 = add_bias_terms_avx512(t2, r4.b[2], xs, G);
  t3 = add_bias_terms_avx512(t3, r4.b[3], xs, G);
  const __m128 y4 = hsum4_avx512(t0, t1, t2, t3);
  if (r4.rows == 4) return _mm_storeu_ps(out, y4);
  alignas(16) float y[4];
  _mm_store_ps(y, y4);
  std::copy(y, y + r4.rows, out);
}

// One 512-bit block (16 packed words: 128 elements at 4 bits, 64 at 8) of four rows (w: their packed
// words, s: their scales, ng groups in the block) against the permuted x (permute_x, 16 lanes) into their
// totals. Each x vector is loaded once for the four rows; lane j of the vector for sub-element e holds
// element e of word j, so its group is gidx's (lane_groups_avx512). A partial last block loads its words
// masked against zero-padded x.
template <int BITS, bool PARTIAL>
AVX512_FN inline __attribute__((always_inline)) void float_block4(const float* xb, const uint32_t* const* w, int64_t wo,
                                                                  const float* const* s, int64_t g0, int ng, __m512i gidx,
                                                                  __mmask16 tail_mask, __m512& t0, __m512& t1,
                                                                  __m512& t2, __m512& t3) {
  constexpr int E = 32 / BITS;
  __m512i wv[4];
#pragma GCC unroll 4
  for (int r = 0; r < 4; r++)  // a masked load only for a partial block (one that misses L1 is slow)
    wv[r] = PARTIAL ? _mm512_maskz_loadu_epi32(tail_mask, w[r] + wo) : _mm512_loadu_si512(w[r] + wo);
  __m512 a[4][2];  // two accumulators per row: eight independent FMA chains
#pragma GCC unroll 4
  for (int r = 0; r < 4; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int e = 0; e < E; e++) {
    const __m512 xv = _mm512_loadu_ps(xb + e * 16);
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++) {
      const __m512i el = sub_by_shift(BITS, e) ? _mm512_srli_epi32(wv[r], 32 - BITS)
                                               : _mm512_and_si512(wv[r], _mm512_set1_epi32(int(sub_mask(BITS, e))));
      a[r][e & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(el), xv, a[r][e & 1]);
    }
  }
  t0 = _mm512_fmadd_ps(_mm512_add_ps(a[0][0], a[0][1]), block_scales_avx512(s[0] + g0, ng, gidx), t0);
  t1 = _mm512_fmadd_ps(_mm512_add_ps(a[1][0], a[1][1]), block_scales_avx512(s[1] + g0, ng, gidx), t1);
  t2 = _mm512_fmadd_ps(_mm512_add_ps(a[2][0], a[2][1]), block_scales_avx512(s[2] + g0, ng, gidx), t2);
  t3 = _mm512_fmadd_ps(_mm512_add_ps(a[3][0], a[3][1]), block_scales_avx512(s[3] + g0, ng, gidx), t3);
}

// Decode (one activation row) on the avx512 path: rows [n0, n1) in fours, out[n - n0]; returns n1 (the
// last one to three rows are computed four times over, the copies dropped). Four rows at once so each x
// vector is loaded once for them and the per-row costs (set-up, prefetch, horizontal sums) are paid once
// per four rows: with a 576-element row they took more time than the dot product itself. The whole row
// loop is one function with the totals in named registers: GCC had kept an array of them in memory.
template <int BITS>
AVX512_FN int64_t decode_rows4_avx512_t(const QW& q, const XPrep& xp, int64_t n0, int64_t n1, int64_t nlim,
                                        int64_t ahead, float* out) {
  constexpr int E = 32 / BITS, BE = 16 * E;
  const int64_t K = q.K, G = q.groups(), kfull = K / BE * BE;
  const int gs = q.gs;
  const int per_block = std::max(1, BE / gs);  // groups a block spans
  const __m512i gidx = lane_groups_avx512<E>(__builtin_ctz(unsigned(gs)));
  const __mmask16 tail_mask = __mmask16((1u << ((K - kfull) / E)) - 1u);
  const int tail_groups = int(std::min<int64_t>(per_block, G - GROUP_OF(kfull, gs)));
  const float* x = xp.xp.data();
  const float* xs = xp.xsum.data();
  Rows4Steps steps(q, n0, n1, nlim, ahead);
  for (int64_t n = n0; n < n1; n += 4) {
    const Rows4 r4 = steps.step_avx512(n);
    const float* const* s = r4.s;
    const uint32_t* const* w = r4.w;
    __m512 t0 = _mm512_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;
    int64_t k0 = 0;
    for (; k0 < kfull; k0 += BE) {
      steps.pf.line(k0 / E + 15);
      float_block4<BITS, false>(x + k0, w, k0 / E, s, GROUP_OF(k0, gs), per_block, gidx, 0, t0, t1, t2, t3);
    }
    if (REMAINDER_ON && k0 < K) {
      steps.pf.line(q.words_per_row() - 1);
      float_block4<BITS, true>(x + k0, w, k0 / E, s, GROUP_OF(k0, gs), tail_groups, gidx, tail_mask, t0, t1, t2, t3);
    }
    finish_rows4_avx512(r4, xs, G, t0, t1, t2, t3, out + (n - n0));
  }
  return n1;
}

AVX512_FN int64_t decode_rows4_avx512(const QW& q, const XPrep& xp, int64_t n0, int64_t n1, int64_t nlim,
                                      int64_t ahead, float* out) {
  if (q.bits == 4) return decode_rows4_avx512_t<4>(q, xp, n0, n1, nlim, ahead, out);
  return decode_rows4_avx512_t<8>(q, xp, n0, n1, nlim, ahead, out);
}

// ---- avx512vnni path: the 4- and 8-bit decode GEMV in integer dot products


#define VNNI_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni,avx2,fma,f16c")))

// x for the VNNI GEMV (one activation row), per block of 128 elements: a power of two 2^E with
// max|x| < 2^(E+22), m = round(x / 2^E) (|m| <= 2^22: x to within 2^-23 of the block's largest element,
// where float32 holds 2^-24), and m = d2*2^16 + d1*2^8 + d0 with d0, d1 in [-128, 127] and |d2| <= 65 -
// three signed bytes whose products with the weights the VNNI dot products sum exactly in int32. Layout
// per block: [half][digit][64 bytes].
// - 4 bits (16 packed words a block): byte 4i+j of (half, digit) holds the digit of the element in word
//   i's byte j, low nibble (half 0) or high nibble (half 1).
// - 8 bits (32 words a block): half h holds elements 64h .. 64h + 63 in order, as words 16h .. 16h + 15
//   hold their bytes. A lane's sum takes four bytes up to 255 (not eight nibbles up to 15), so 2^E is one
//   step larger, max|x| < 2^(E+21): |m| <= 2^21 and |sum of 4 q*m| <= 4*255*2^21 < 2^31 (x to within
//   2^-22 of the block's largest element).
// Returns false (the float GEMV runs) when x holds a non-finite value or a block's largest element is
// below 2^-100.
constexpr int64_t kDigitBlock = 128, kDigitBlockBytes = 2 * 3 * 64;

// 2^e for -126 <= e <= 127, from its bits
inline float pow2f(int e) {
  const uint32_t bits = uint32_t(e + 127) << 23;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

VNNI_FN bool digits_x(XPrep& p, int bits) {
  const int64_t K = p.K, nblk = (K + kDigitBlock - 1) / kDigitBlock;
  const int headroom = bits == 4 ? 21 : 20;  // 2^E = 2^(ilogb(max|x|) - headroom): |m| < 2^(headroom + 1)
  p.xq.resize(size_t(nblk * kDigitBlockBytes));
  p.xexp.resize(size_t(nblk));
  // byte b of half h takes the block's element 8*(b/4) + e, e the element at bits 8*(b%4) + 4*h of a word
  alignas(64) uint8_t perm[2][64];
  for (int e = 0; e < 8; e++)
    for (int i = 0; i < 16; i++) {
      const int h = (NIBBLE_SHIFT(e) % 8) / 4, j = NIBBLE_SHIFT(e) / 8;
      perm[h][4 * i + j] = uint8_t(8 * i + e);
    }
  const __m512i pick[2] = {_mm512_load_si512(perm[0]), _mm512_load_si512(perm[1])};
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512 fmax = _mm512_set1_ps(std::numeric_limits<float>::max());
  alignas(64) int8_t dig[3][kDigitBlock];
  for (int64_t blk = 0; blk < nblk; blk++) {
    const int64_t k0 = blk * kDigitBlock, n = std::min(kDigitBlock, K - k0);
    __m512 v[8];
    __m512 big = _mm512_setzero_ps();
    for (int c = 0; c < 8; c++) {
      const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, n - 16 * c));
      v[c] = _mm512_maskz_loadu_ps(__mmask16((1u << left) - 1u), p.xf.data() + k0 + 16 * c);
      const __m512 a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v[c]), magnitude));
      if (_mm512_cmp_ps_mask(a, fmax, _CMP_NLE_UQ)) return false;  // inf or NaN
      big = _mm512_max_ps(big, a);
    }
    int8_t* out = p.xq.data() + blk * kDigitBlockBytes;
    const float top = _mm512_reduce_max_ps(big);
    if (top == 0.f) {
      p.xexp[size_t(blk)] = 1.f;
      std::memset(out, 0, size_t(kDigitBlockBytes));
      continue;
    }
    if (top < 0x1p-100f) return false;  // 2^E below the normal floats (and no subnormal top to take apart)
    uint32_t top_bits;
    std::memcpy(&top_bits, &top, 4);
    const int E = int(top_bits >> 23) - 127 - headroom;  // ilogb(top) - headroom, top being normal
    p.xexp[size_t(blk)] = pow2f(E);
    const __m512 inv = _mm512_set1_ps(pow2f(-E));
    for (int c = 0; c < 8; c++) {
      const __m512i m = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v[c], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512i d0 = _mm512_srai_epi32(_mm512_slli_epi32(m, 24), 24);
      const __m512i m1 = _mm512_srai_epi32(_mm512_sub_epi32(m, d0), 8);
      const __m512i d1 = _mm512_srai_epi32(_mm512_slli_epi32(m1, 24), 24);
      const __m512i d2 = _mm512_srai_epi32(_mm512_sub_epi32(m1, d1), 8);
      _mm_store_si128(reinterpret_cast<__m128i*>(dig[0] + 16 * c), _mm512_cvtepi32_epi8(d0));
      _mm_store_si128(reinterpret_cast<__m128i*>(dig[1] + 16 * c), _mm512_cvtepi32_epi8(d1));
      _mm_store_si128(reinterpret_cast<__m128i*>(dig[2] + 16 * c), _mm512_cvtepi32_epi8(d2));
    }
    for (int d = 0; d < 3; d++) {
      const __m512i lo = _mm512_load_si512(dig[d]), hi = _mm512_load_si512(dig[d] + 64);
      if (bits == 8) {  // elements in order
        _mm512_storeu_si512(out + d * 64, lo);
        _mm512_storeu_si512(out + 192 + d * 64, hi);
        continue;
      }
      for (int h = 0; h < 2; h++) _mm512_storeu_si512(out + h * 192 + d * 64, _mm512_permutex2var_epi8(lo, pick[h], hi));
    }
  }
  return true;
}


// Each byte's high nibble as a byte of its own, in one GF(2) affine transform (vgf2p8affineqb): output bit i
// (< 4) is input bit i + 4, the matrix's byte 7 - i. Where a shift and a mask took two instructions on the
// two ports that run 512-bit integer work (one thread, in cache, Intel Emerald Rapids, ab_core interleaved,
// three runs: 576x576 4/64 12.8-14.4 -> 12.3-13.8 us, 1536x576 32.9-33.6 -> 30.5-31.0, 8192x2048
// 550-573 -> 525-542; the same outputs).
constexpr long long kHighNibbleBits = 0x1020408000000000LL;
VNNI_FN inline __m512i high_nibble_bits512() { return _mm512_set1_epi64(kHighNibbleBits); }
VNNI_FN inline __m256i high_nibble_bits256() { return _mm256_set1_epi64x(kHighNibbleBits); }

// tot + (the block's dot product of one row, as an integer) * sc: the packed words' low and high nibbles
// against x's digits d0, d1, d2 (l* for the low nibbles, h* for the high ones), combined exactly in int32
// Horner-style in one accumulator ((S2 << 8) + S1) << 8 + S0, the dot products adding into it, so no adds
// (576x576 4-bit, one thread, in cache: 11.7 -> 11.3 us; scripts/gemv_core_timing.cpp, 3 interleaved runs)
VNNI_FN inline __attribute__((always_inline)) __m512 vnni_block_row(__m512i wv, __m512i l0, __m512i l1, __m512i l2,
                                                                     __m512i h0, __m512i h1, __m512i h2, __m512 sc,
                                                                     __m512 tot) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i lo = _mm512_and_si512(wv, low4), hi = _mm512_gf2p8affine_epi64_epi8(wv, high_nibble_bits512(), 0);
  __m512i m = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, l2), hi, h2);
  m = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(m, 8), lo, l1), hi, h1);
  m = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(m, 8), lo, l0), hi, h0);
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(m), sc, tot);
}

// Decode rows [n0, n1) in fours against x's digits (digits_x): out[n - n0]; returns n1. Per 128-element block and row: the 64 bytes of packed words split
// into low and high nibbles (unsigned bytes), each multiplied with x's three digit vectors by vpdpbusd,
// which sums four byte products into each int32 lane. Lane i then holds word i's eight elements (as the
// float path's lanes do, so lane_groups_avx512<8> gives its group). The digit sums combine exactly in
// int32 (|sum d2*q| <= 8*65*15, so (sum d2*q) << 16 < 2^30), convert once to float, and take the group's
// scale times the block's 2^E. Three instructions cover 64 weights where the float path needs twelve
// (mask, convert, multiply-add per 16, the last two sharing two ports). The whole row loop is one
// function so the per-row costs (set-up, prefetch, horizontal sums: a call's worth per four rows) stay
// small beside 576-element rows.
// One 128-element block of four rows (w: their packed words, s: their scales) into their totals
template <bool PARTIAL>
VNNI_FN inline __attribute__((always_inline)) void vnni_block4(const XPrep& xp, int64_t k0, int64_t blk,
                                                               const uint32_t* const* w, const float* const* s, int gs,
                                                               int ng, __m512i gidx, __mmask16 tail_mask, __m512& t0,
                                                               __m512& t1, __m512& t2, __m512& t3) {
  const int8_t* xb = xp.xq.data() + blk * kDigitBlockBytes;
  const __m512i l0 = _mm512_loadu_si512(xb), l1 = _mm512_loadu_si512(xb + 64), l2 = _mm512_loadu_si512(xb + 128);
  const __m512i h0 = _mm512_loadu_si512(xb + 192), h1 = _mm512_loadu_si512(xb + 256), h2 = _mm512_loadu_si512(xb + 320);
  const __m512 xe = _mm512_set1_ps(xp.xexp[size_t(blk)]);
  const int64_t wo = k0 / 8, g0 = GROUP_OF(k0, gs);
  __m512i wv[4];
  for (int r = 0; r < 4; r++)  // a masked load only for a partial block (one that misses L1 is slow)
    wv[r] = PARTIAL ? _mm512_maskz_loadu_epi32(tail_mask, w[r] + wo) : _mm512_loadu_si512(w[r] + wo);
  t0 = vnni_block_row(wv[0], l0, l1, l2, h0, h1, h2, _mm512_mul_ps(block_scales_avx512(s[0] + g0, ng, gidx), xe), t0);
  t1 = vnni_block_row(wv[1], l0, l1, l2, h0, h1, h2, _mm512_mul_ps(block_scales_avx512(s[1] + g0, ng, gidx), xe), t1);
  t2 = vnni_block_row(wv[2], l0, l1, l2, h0, h1, h2, _mm512_mul_ps(block_scales_avx512(s[2] + g0, ng, gidx), xe), t2);
  t3 = vnni_block_row(wv[3], l0, l1, l2, h0, h1, h2, _mm512_mul_ps(block_scales_avx512(s[3] + g0, ng, gidx), xe), t3);
}

// vnni_block_row on a half block (8 packed words, 64 elements), in 256-bit vectors: the int32 sums of lanes
// 0-7, as floats times their scales sc, into the low half of tot (the upper lanes take 0 * 0)
VNNI_FN inline __attribute__((always_inline)) __m512 vnni_half_row(__m256i wv, __m256i l0, __m256i l1, __m256i l2,
                                                                    __m256i h0, __m256i h1, __m256i h2, __m256 sc,
                                                                    __m512 tot) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(wv, low4), hi = _mm256_gf2p8affine_epi64_epi8(wv, high_nibble_bits256(), 0);
  __m256i m = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, l2), hi, h2);
  m = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_slli_epi32(m, 8), lo, l1), hi, h1);
  m = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_slli_epi32(m, 8), lo, l0), hi, h0);
  return _mm512_fmadd_ps(_mm512_zextps256_ps512(_mm256_cvtepi32_ps(m)), _mm512_zextps256_ps512(sc), tot);
}

// vnni_block4 for a trailing block of at most 8 words (K % 128 == 32 or 64), in 256-bit vectors: half the
// work of running it through vnni_block4 on zero-padded lanes. x's digits for words 0-7 are the first 32
// bytes of each 64-byte digit vector. SmolLM2's K = 576 is 4.5 blocks: 576x576 4/64 on one thread
// 11.3 -> 10.6 us in cache, 14.2-14.8 -> 13.1-13.5 from DRAM (gemv_core_timing, 3 runs)
VNNI_FN inline void vnni_half4(const XPrep& xp, int64_t k0, int64_t blk, const uint32_t* const* w,
                               const float* const* s, int gs, int ng, __m512i gidx, int words, __m512& t0,
                               __m512& t1, __m512& t2, __m512& t3) {
  const __m256i* xb = reinterpret_cast<const __m256i*>(xp.xq.data() + blk * kDigitBlockBytes);
  const __m256i l0 = _mm256_loadu_si256(xb), l1 = _mm256_loadu_si256(xb + 2), l2 = _mm256_loadu_si256(xb + 4);
  const __m256i h0 = _mm256_loadu_si256(xb + 6), h1 = _mm256_loadu_si256(xb + 8), h2 = _mm256_loadu_si256(xb + 10);
  const __m256 xe = _mm256_set1_ps(xp.xexp[size_t(blk)]);
  const int64_t wo = k0 / 8, g0 = GROUP_OF(k0, gs);
  const __mmask8 mask = __mmask8((1u << words) - 1u);
  __m256i wv[4];
  for (int r = 0; r < 4; r++)
    wv[r] = words == 8 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + wo))
                       : _mm256_maskz_loadu_epi32(mask, w[r] + wo);
  __m256 sc[4];
  for (int r = 0; r < 4; r++) sc[r] = _mm256_mul_ps(_mm512_castps512_ps256(block_scales_avx512(s[r] + g0, ng, gidx)), xe);
  t0 = vnni_half_row(wv[0], l0, l1, l2, h0, h1, h2, sc[0], t0);
  t1 = vnni_half_row(wv[1], l0, l1, l2, h0, h1, h2, sc[1], t1);
  t2 = vnni_half_row(wv[2], l0, l1, l2, h0, h1, h2, sc[2], t2);
  t3 = vnni_half_row(wv[3], l0, l1, l2, h0, h1, h2, sc[3], t3);
}

template <int NG>  // groups per 128-element block: 1, 2 or 4 (group size 128, 64, 32)
VNNI_FN int64_t decode_rows4_vnni_t(const QW& q, const XPrep& xp, int64_t n0, int64_t n1, int64_t nlim, int64_t ahead,
                                    float* out) {
  const int64_t K = q.K, G = q.groups(), kfull = K / kDigitBlock * kDigitBlock;
  const int gs = q.gs;
  const __m512i gidx = lane_groups_avx512<8>(__builtin_ctz(unsigned(gs)));
  const int64_t tail_words = (K - kfull) / 8;  // a partial last block: its words load masked, x's digits are 0
  const __mmask16 tail_mask = __mmask16((1u << tail_words) - 1u);
  const int tail_groups = int(std::min<int64_t>(NG, G - GROUP_OF(kfull, gs)));
  const float* xs = xp.xsum.data();
  Rows4Steps steps(q, n0, n1, nlim, ahead);
  for (int64_t n = n0; n < n1; n += 4) {  // the last one to three rows: computed four times over, the copies dropped
    const Rows4 r4 = steps.step_avx512(n);
    const float* const* s = r4.s;
    const uint32_t* const* w = r4.w;
    __m512 t0 = _mm512_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;  // four rows' totals, kept in registers
    int64_t k0 = 0, blk = 0;
    for (; k0 < kfull; k0 += kDigitBlock, blk++) {
      steps.pf.line(k0 / 8 + 15);
      vnni_block4<false>(xp, k0, blk, w, s, gs, NG, gidx, 0, t0, t1, t2, t3);
    }
    if (REMAINDER_ON && k0 < K) {
      steps.pf.line(q.words_per_row() - 1);
      if (tail_words <= 8) vnni_half4(xp, k0, blk, w, s, gs, tail_groups, gidx, int(tail_words), t0, t1, t2, t3);
      else vnni_block4<true>(xp, k0, blk, w, s, gs, tail_groups, gidx, tail_mask, t0, t1, t2, t3);
    }
    finish_rows4_avx512(r4, xs, G, t0, t1, t2, t3, out + (n - n0));
  }
  return n1;
}

VNNI_FN int64_t decode_rows4_vnni(const QW& q, const XPrep& xp, int64_t n0, int64_t n1, int64_t nlim, int64_t ahead,
                                  float* out) {
  switch (kDigitBlock / q.gs) {
    case 1: return decode_rows4_vnni_t<1>(q, xp, n0, n1, nlim, ahead, out);
    case 2: return decode_rows4_vnni_t<2>(q, xp, n0, n1, nlim, ahead, out);
    default: return decode_rows4_vnni_t<4>(q, xp, n0, n1, nlim, ahead, out);
  }
}

// 8 bits: tot + (64 elements of one row, 16 packed words wv, against x's digits l0, l1, l2 of the same
// elements) * sc. vpdpbusd takes the weight bytes as they are stored (unsigned, one element each), so
// there are no nibbles to split: three dot products, combined Horner-style as in vnni_block_row, where the
// float path spends a mask or shift, a convert and a multiply-add per 16 elements.
VNNI_FN inline __attribute__((always_inline)) __m512 vnni8_half_row(__m512i wv, __m512i l0, __m512i l1, __m512i l2,
                                                                     __m512 sc, __m512 tot) {
  __m512i m = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, l2);
  m = _mm512_dpbusd_epi32(_mm512_slli_epi32(m, 8), wv, l1);
  m = _mm512_dpbusd_epi32(_mm512_slli_epi32(m, 8), wv, l0);
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(m), sc, tot);
}

// One half (64 elements: words wo .. wo + 15) of a 128-element block of four 8-bit rows into their totals,
// against x's digits xh of those elements (2^E: xe), with NG groups from g0 spread over the lanes by gidx.
// A partial half (PARTIAL: K % 64 == 32, 8 words) loads its words masked, against x's zero digits.
template <int NG, bool PARTIAL>
VNNI_FN inline __attribute__((always_inline)) void vnni8_half4(const int8_t* xh, __m512 xe, const uint32_t* const* w,
                                                               int64_t wo, const float* const* s, int64_t g0,
                                                               __m512i gidx, __m512& t0, __m512& t1, __m512& t2,
                                                               __m512& t3) {
  const __m512i l0 = _mm512_loadu_si512(xh), l1 = _mm512_loadu_si512(xh + 64), l2 = _mm512_loadu_si512(xh + 128);
  __m512i wv[4];
  for (int r = 0; r < 4; r++)  // a masked load only for a partial half (one that misses L1 is slow)
    wv[r] = PARTIAL ? _mm512_maskz_loadu_epi32(0xFF, w[r] + wo) : _mm512_loadu_si512(w[r] + wo);
  t0 = vnni8_half_row(wv[0], l0, l1, l2, _mm512_mul_ps(block_scales_avx512(s[0] + g0, NG, gidx), xe), t0);
  t1 = vnni8_half_row(wv[1], l0, l1, l2, _mm512_mul_ps(block_scales_avx512(s[1] + g0, NG, gidx), xe), t1);
  t2 = vnni8_half_row(wv[2], l0, l1, l2, _mm512_mul_ps(block_scales_avx512(s[2] + g0, NG, gidx), xe), t2);
  t3 = vnni8_half_row(wv[3], l0, l1, l2, _mm512_mul_ps(block_scales_avx512(s[3] + g0, NG, gidx), xe), t3);
}

// Decode rows [n0, n1) of an 8-bit W in fours against x's digits (digits_x(p, 8)): out[n - n0]; returns n1
// (the last one to three rows computed four times over, the copies dropped, as decode_rows4_vnni does).
// Per 64 elements (half a digit block: 16 words, NG groups): vnni8_half4. K % 64 == 32 leaves a
// trailing 32 elements, one group, in a partial half.
template <int NG>  // groups in 64 elements: 2 (group size 32) or 1
VNNI_FN int64_t decode_rows4_vnni8_t(const QW& q, const XPrep& xp, int64_t n0, int64_t n1, int64_t nlim,
                                     int64_t ahead, float* out) {
  const int64_t K = q.K, G = q.groups(), halves = K / 64;
  const int gs = q.gs;
  const __m512i gidx = lane_groups_avx512<4>(__builtin_ctz(unsigned(gs)));
  const float* xs = xp.xsum.data();
  const int8_t* xq = xp.xq.data();  // half h's digits at xq + 192 h (kDigitBlockBytes per two halves)
  Rows4Steps steps(q, n0, n1, nlim, ahead);
  for (int64_t n = n0; n < n1; n += 4) {
    const Rows4 r4 = steps.step_avx512(n);
    __m512 t0 = _mm512_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;  // four rows' totals, kept in registers
    int64_t h = 0;
    for (; h < halves; h++) {
      steps.pf.line(16 * h + 15);
      vnni8_half4<NG, false>(xq + 192 * h, _mm512_set1_ps(xp.xexp[size_t(h / 2)]), r4.w, 16 * h, r4.s,
                             GROUP_OF(64 * h, gs), gidx, t0, t1, t2, t3);
    }
    if (REMAINDER_ON && 64 * h < K) {
      steps.pf.line(q.words_per_row() - 1);
      vnni8_half4<1, true>(xq + 192 * h, _mm512_set1_ps(xp.xexp[size_t(h / 2)]), r4.w, 16 * h, r4.s,
                           GROUP_OF(64 * h, gs), gidx, t0, t1, t2, t3);
    }
    finish_rows4_avx512(r4, xs, G, t0, t1, t2, t3, out + (n - n0));
  }
  return n1;
}

VNNI_FN int64_t decode_rows4_vnni8(const QW& q, const XPrep& xp, int64_t n0, int64_t n1, int64_t nlim, int64_t ahead,
                                   float* out) {
  if (q.gs == 32) return decode_rows4_vnni8_t<2>(q, xp, n0, n1, nlim, ahead, out);
  return decode_rows4_vnni8_t<1>(q, xp, n0, n1, nlim, ahead, out);
}

// ---- avx2 path, 4-bit decode: the GEMV in integer dot products, as on avx512vnni

// x for the avx2 integer GEMV (4 bits, one activation row), per block of 64 elements (8 packed words, one
// 256-bit vector): a power of two 2^E with max|x| < 2^(E+22), m = round(x / 2^E) = d2*2^16 + d1*2^8 + d0,
// d0, d1 in [-128, 127] and |d2| <= 65 (digits_x's split, on half its block). AVX2 has no vpdpbusd: its
// vpmaddubsw multiplies unsigned nibbles by signed digits and sums adjacent pairs into 16-bit lanes, and
// vpmaddwd widens two adjacent 16-bit lanes into one 32-bit lane, each with its own weight. So each digit
// vector puts digits of one scale in a pair, and two scales side by side, and one vpmaddwd combines them:
//   byte 4i+b of vector (c, h) holds, for the element at bits 8b + 4h of word i (h = 0: the byte's low
//   nibble, 1: its high one), c = A: d0 for b < 2, d1 for b >= 2; B: d1 for b < 2, d0 for b >= 2; C: d2.
// Block layout: [A, h=0][A, h=1][B, 0][B, 1][C, 0][C, 1], 32 bytes each. A trailing 32 elements (K % 64
// == 32) stay float: the kernel reads them from xf. Returns false (the float GEMV runs) when x holds a
// non-finite value or a block's largest element is below 2^-100, as digits_x does.
constexpr int64_t kDigitBlock2 = 64, kDigitBlock2Bytes = 6 * 32;

// Per block: word i's eight elements (vector i, lane e) scale to m and split into digits in place: m +
// 0x8080 has bytes c0, c1 and then d2 (|d2| <= 65 fits a byte), and m = d2*2^16 + (c1-128)*2^8 + (c0-128),
// so flipping the top bit of c0 and c1 leaves d0 and d1 as signed bytes: a lane holds [d0 d1 d2 sign].
// A lane permute brings the elements of the low nibbles (h = 0) to the low half and the high ones to the
// high half, in byte order b; a byte shuffle then gathers, in each half, vector A's four bytes for the
// word into dword 0, B's into dword 1 and C's into dword 2. An 8x8 transpose turns the eight words' dwords
// into the layout's vectors (dword c + 4h of word i -> lane i of vector (c, h)).
AVX2_FN bool digits_x_avx2(XPrep& p) {
  const int64_t nblk = p.K / kDigitBlock2;
  p.xq.resize(size_t(nblk * kDigitBlock2Bytes));
  p.xexp.resize(size_t(nblk));
  int elem[4][2];  // the element of a word at bits 8b + 4h
  for (int e = 0; e < 8; e++) elem[NIBBLE_SHIFT(e) / 8][(NIBBLE_SHIFT(e) % 8) / 4] = e;
  static constexpr int kDigitOf[3][4] = {{0, 0, 1, 1}, {1, 1, 0, 0}, {2, 2, 2, 2}};  // A, B, C by byte b
  alignas(32) int32_t halves[8];
  alignas(32) int8_t gather[32];
  for (int q = 0; q < 8; q++) halves[q] = elem[q % 4][q / 4];  // lane 4h + b takes element elem[b][h]
  for (int h = 0; h < 2; h++)
    for (int c = 0; c < 4; c++)
      for (int b = 0; b < 4; b++) gather[16 * h + 4 * c + b] = c < 3 ? int8_t(4 * b + kDigitOf[c][b]) : int8_t(-128);
  const __m256i to_halves = _mm256_load_si256(reinterpret_cast<const __m256i*>(halves));
  const __m256i pick = _mm256_load_si256(reinterpret_cast<const __m256i*>(gather));
  const __m256i bias = _mm256_set1_epi32(0x8080);
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 fmax = _mm256_set1_ps(std::numeric_limits<float>::max());
  for (int64_t blk = 0; blk < nblk; blk++) {
    const float* x = p.xf.data() + blk * kDigitBlock2;
    __m256 v[8];  // vector i, lane e: element e of word i
    __m256 big = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int i = 0; i < 8; i++) {
      v[i] = _mm256_loadu_ps(x + 8 * i);
      const __m256 a = _mm256_and_ps(v[i], magnitude);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, fmax, _CMP_NLE_UQ));  // inf or NaN
      big = _mm256_max_ps(big, a);
    }
    if (_mm256_movemask_ps(bad)) return false;
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(big), _mm256_extractf128_ps(big, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float top = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    int8_t* out = p.xq.data() + blk * kDigitBlock2Bytes;
    if (top == 0.f) {
      p.xexp[size_t(blk)] = 1.f;
      std::memset(out, 0, size_t(kDigitBlock2Bytes));
      continue;
    }
    if (top < 0x1p-100f) return false;  // 2^E below the normal floats
    uint32_t bits;
    std::memcpy(&bits, &top, 4);
    const int E = int(bits >> 23) - 127 - 21;  // ilogb(top) - 21, top being normal
    p.xexp[size_t(blk)] = pow2f(E);
    const __m256 inv = _mm256_set1_ps(pow2f(-E));
    for (int i = 0; i < 8; i++) {
      // exact scaling, then round to nearest whatever MXCSR says (as digits_x's embedded rounding does)
      const __m256i m = _mm256_cvttps_epi32(
          _mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      const __m256i d = _mm256_xor_si256(_mm256_add_epi32(m, bias), bias);
      v[i] = _mm256_castsi256_ps(_mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(d, to_halves), pick));
    }
    transpose8x8_avx2(v);
    for (int c = 0; c < 3; c++)
      for (int h = 0; h < 2; h++) _mm256_storeu_ps(reinterpret_cast<float*>(out + (2 * c + h) * 32), v[c + 4 * h]);
  }
  return true;
}

// tot + (one row's 64-element block against x's digits X, as an integer per word) * sc. The packed words
// split into low and high nibbles (unsigned bytes); each takes X's three vectors through vpmaddubsw, the
// low and high products of a vector adding in 16 bits (four products, |sum| <= 4 * 15 * 128). vpmaddwd
// widens A's 16-bit pairs with weights (1, 256), B's with (256, 1) and C's with (1, 1), C's then shifted
// by 16: the word's dot product with m, exact in int32 (|C's| <= 8 * 15 * 65, times 2^16 < 2^30), converted
// once to float. 20 instructions per 64 weights where the float path spends 25 (mask, convert,
// multiply-add per 8, and the scales), nine of them on the two ports that multiply integers.
AVX2_FN inline __attribute__((always_inline)) __m256 digits_block_row(__m256i wv, const __m256i* X, __m256 sc,
                                                                      __m256 tot) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(wv, low4), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low4);
  const __m256i a = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(X)),
                                     _mm256_maddubs_epi16(hi, _mm256_loadu_si256(X + 1)));
  const __m256i b = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(X + 2)),
                                     _mm256_maddubs_epi16(hi, _mm256_loadu_si256(X + 3)));
  const __m256i c = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(X + 4)),
                                     _mm256_maddubs_epi16(hi, _mm256_loadu_si256(X + 5)));
  const __m256i m = _mm256_add_epi32(_mm256_slli_epi32(_mm256_madd_epi16(c, _mm256_set1_epi16(1)), 16),
                                     _mm256_add_epi32(_mm256_madd_epi16(a, _mm256_set1_epi32(256 << 16 | 1)),
                                                      _mm256_madd_epi16(b, _mm256_set1_epi32(1 << 16 | 256))));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(m), sc, tot);
}

// a block's scales (groups g0 for words 0-3, g1 for 4-7) times its 2^E, over the lanes
template <bool TWO_GROUPS>
AVX2_FN inline __attribute__((always_inline)) __m256 digits_block_scales(const float* s, int64_t g0, int64_t g1,
                                                                         __m256 xe) {
  if (!TWO_GROUPS) return _mm256_mul_ps(_mm256_set1_ps(s[g0]), xe);
  return _mm256_mul_ps(_mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(s[g0])), _mm_set1_ps(s[g1]), 1), xe);
}

AVX2_FN inline __attribute__((always_inline)) __m256i block_words_avx2(const uint32_t* w) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
}

// Decode rows [n0, n1) in fours against x's digits (digits_x_avx2): out[n - n0]; returns n1 (the last one to
// three rows computed four times over, the copies dropped, as the VNNI path does: the caller's qdot has no
// permuted float x). Per block and row: digits_block_row, with the block's scales times its 2^E; words 0-3
// and 4-7 of a block lie in different groups at group size 32 (TWO_GROUPS). A trailing 32 elements run in
// float against x itself.
template <bool TWO_GROUPS>
AVX2_FN int64_t decode_rows4_digits_avx2_t(const QW& q, const XPrep& xp, int64_t n0, int64_t n1, int64_t nlim,
                                           int64_t ahead, float* out) {
  const int64_t K = q.K, G = q.groups(), kfull = K / kDigitBlock2 * kDigitBlock2;
  const int gs = q.gs;
  const float* xs = xp.xsum.data();
  const float* xf = xp.xf.data();
  Rows4Steps steps(q, n0, n1, nlim, ahead);
  for (int64_t n = n0; n < n1; n += 4) {
    const Rows4 r4 = steps.step(n);
    __m256 t0 = _mm256_setzero_ps(), t1 = t0, t2 = t0, t3 = t0;  // four rows' totals, kept in registers
    int64_t k0 = 0, blk = 0;
    for (; k0 < kfull; k0 += kDigitBlock2, blk++) {
      steps.pf.line(k0 / 8 + 7);
      const __m256i* X = reinterpret_cast<const __m256i*>(xp.xq.data() + blk * kDigitBlock2Bytes);
      const __m256 xe = _mm256_set1_ps(xp.xexp[size_t(blk)]);
      const int64_t g0 = GROUP_OF(k0, gs), g1 = GROUP_OF(k0 + 32, gs), wo = k0 / 8;
      t0 = digits_block_row(block_words_avx2(r4.w[0] + wo), X, digits_block_scales<TWO_GROUPS>(r4.s[0], g0, g1, xe), t0);
      t1 = digits_block_row(block_words_avx2(r4.w[1] + wo), X, digits_block_scales<TWO_GROUPS>(r4.s[1], g0, g1, xe), t1);
      t2 = digits_block_row(block_words_avx2(r4.w[2] + wo), X, digits_block_scales<TWO_GROUPS>(r4.s[2], g0, g1, xe), t2);
      t3 = digits_block_row(block_words_avx2(r4.w[3] + wo), X, digits_block_scales<TWO_GROUPS>(r4.s[3], g0, g1, xe), t3);
    }
    alignas(16) float tail[4] = {0.f, 0.f, 0.f, 0.f};
    if (REMAINDER_ON && k0 < K) {  // one trailing 32-element chunk
      steps.pf.line(q.words_per_row() - 1);
      for (int r = 0; r < 4; r++) {
        const uint32_t* wk = r4.w[r] + k0 / 8;
        float a = 0;
        for (int j = 0; j < 4; j++)
          for (int e = 0; e < 8; e++) a += float((wk[j] >> NIBBLE_SHIFT(e)) & 0xFu) * xf[k0 + 8 * j + e];
        tail[r] = r4.s[r][GROUP_OF(k0, gs)] * a;
      }
    }
    finish_rows4_avx2(r4.b, xs, G, t0, t1, t2, t3, _mm_load_ps(tail), r4.rows, out + (n - n0));
  }
  return n1;
}

AVX2_FN int64_t decode_rows4_digits_avx2(const QW& q, const XPrep& xp, int64_t n0, int64_t n1, int64_t nlim,
                                         int64_t ahead, float* out) {
  if (q.gs == 32) return decode_rows4_digits_avx2_t<true>(q, xp, n0, n1, nlim, ahead, out);
  return decode_rows4_digits_avx2_t<false>(q, xp, n0, n1, nlim, ahead, out);
}

template <int BITS>
AVX512_FN void qdot_avx512_bits(const QW& q, int64_t n, const XPrep& xp, int64_t m0, int mr,
                                const float* s, const float* b, float* res) {
  switch (mr) {
    case 1: return qdot_avx512_t<1, BITS>(q, n, xp, m0, s, b, res);
    case 2: return qdot_avx512_t<2, BITS>(q, n, xp, m0, s, b, res);
    case 3: return qdot_avx512_t<3, BITS>(q, n, xp, m0, s, b, res);
    default: return qdot_avx512_t<4, BITS>(q, n, xp, m0, s, b, res);
  }
}

AVX512_FN void qdot_avx512(const QW& q, int64_t n, const XPrep& xp, int64_t m0, int mr, const float* s,
                           const float* b, float* res) {
  if (q.bits == 4) return qdot_avx512_bits<4>(q, n, xp, m0, mr, s, b, res);
  qdot_avx512_bits<8>(q, n, xp, m0, mr, s, b, res);
}

AVX2_FN void dequant_avx2(const QW& q, int64_t n0, int64_t n1, float* dst) {
  const int64_t K = q.K, wpr = q.words_per_row(), G = q.groups();
  float* s = row_scratch().data();
  float* b = s + G;
  const __m256i sh4 = _mm256_setr_epi32(NIBBLE_SHIFT(0), NIBBLE_SHIFT(1), NIBBLE_SHIFT(2), NIBBLE_SHIFT(3),
                                        NIBBLE_SHIFT(4), NIBBLE_SHIFT(5), NIBBLE_SHIFT(6), NIBBLE_SHIFT(7));
  const __m256i sh8 = _mm256_setr_epi32(0, 8, 16, 24, 0, 8, 16, 24);
  const __m256i dup = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  for (int64_t n = n0; n < n1; n++) {
    row_params_avx2(q, n, s, b);
    const uint32_t* wr = q.w + n * wpr;
    float* d = dst + (n - n0) * K;
    if (q.bits == 4) {
      const __m256i mask = _mm256_set1_epi32(0xF);
      for (int64_t k = 0; k < K; k += 8) {
        const int64_t g = GROUP_OF(k, q.gs);
        __m256i v = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(wr[k / 8])), sh4), mask);
        _mm256_storeu_ps(d + k, _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(s[g]), _mm256_set1_ps(b[g])));
      }
    } else {
      const __m256i mask = _mm256_set1_epi32(0xFF);
      for (int64_t k = 0; k < K; k += 8) {
        const int64_t g = GROUP_OF(k, q.gs);
        __m256i w2 = _mm256_castsi128_si256(_mm_loadl_epi64((const __m128i*)(wr + k / 4)));
        __m256i v = _mm256_and_si256(_mm256_srlv_epi32(_mm256_permutevar8x32_epi32(w2, dup), sh8), mask);
        _mm256_storeu_ps(d + k, _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(s[g]), _mm256_set1_ps(b[g])));
      }
    }
  }
}

AVX2_FN float fdot_avx2(const float* a, const float* b, int64_t K) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), a1);
  }
  float r = 0;
  if (REMAINDER_ON) {
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), a0);
    for (; k < K; k++) r += a[k] * b[k];
  }
  return hsum8(_mm256_add_ps(a0, a1)) + r;
}

// 4x4 register-blocked C = A * B^T micro-kernel over K (vectorised along K).
AVX2_FN void gemm_nt_avx2(const float* A, const float* B, float* C, int64_t M, int64_t NB,
                          int64_t K, int64_t ldc) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {
    int64_t c = 0;
    for (; c + 4 <= NB; c += 4) {
      __m256 acc[4][4];
      for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) {
        __m256 bv[4];
        for (int j = 0; j < 4; j++) bv[j] = _mm256_loadu_ps(B + (c + j) * K + k);
        for (int i = 0; i < 4; i++) {
          __m256 av = _mm256_loadu_ps(A + (m + i) * K + k);
          for (int j = 0; j < 4; j++) acc[i][j] = _mm256_fmadd_ps(av, bv[j], acc[i][j]);
        }
      }
      for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) {
          float r = hsum8(acc[i][j]);
          if (REMAINDER_ON)
            for (int64_t kk = k; kk < K; kk++) r += A[(m + i) * K + kk] * B[(c + j) * K + kk];
          C[(m + i) * ldc + c + j] = r;
        }
    }
    for (; c < NB; c++)
      for (int i = 0; i < 4; i++) C[(m + i) * ldc + c] = fdot_avx2(A + (m + i) * K, B + c * K, K);
  }
  for (; m < M; m++)
    for (int64_t c = 0; c < NB; c++) C[m * ldc + c] = fdot_avx2(A + m * K, B + c * K, K);
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

bool cpu_has_avx512() { return cpu_has_avx2() && __builtin_cpu_supports("avx512f"); }
bool cpu_has_avx512vnni() {
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi") &&
         __builtin_cpu_supports("gfni");
}
#endif  // MLXE_X86

// ---------------------------------------------------------------- ISA dispatch helpers

// the AVX2 code runs on both x86 SIMD paths; avx512 replaces only the quantized GEMV
inline bool avx2() {
#ifdef MLXE_X86
  return g_isa == MLXE_ISA_AVX2 || g_isa == MLXE_ISA_AVX512 || g_isa == MLXE_ISA_AVX512_VNNI;
#else
  return false;
#endif
}

inline bool avx512() {
#ifdef MLXE_X86
  return g_isa == MLXE_ISA_AVX512 || g_isa == MLXE_ISA_AVX512_VNNI;
#else
  return false;
#endif
}

inline bool vnni() {
#ifdef MLXE_X86
  return g_isa == MLXE_ISA_AVX512_VNNI;
#else
  return false;
#endif
}

void qdot(const QW& q, int64_t n, const XPrep& xp, int64_t m0, int mr, const float* s,
          const float* b, float* res) {
#ifdef MLXE_X86
  if (avx512()) return qdot_avx512(q, n, xp, m0, mr, s, b, res);
  if (avx2()) return qdot_avx2(q, n, xp, m0, mr, s, b, res);
#endif
  qdot_scalar(q, n, xp, m0, mr, s, b, res);
}

// rows n..n+3 against activation row 0 (decode) on the avx2 path (avx512 runs decode_rows4_avx512)
void qdot4(const QW& q, int64_t n, const XPrep& xp, const float* const* s, const float* const* b,
           const StepPrefetch& pf, float* res) {
#ifdef MLXE_X86
  qdot4_avx2(q, n, xp, s, b, pf, res);
#else
  (void)q, (void)n, (void)xp, (void)s, (void)b, (void)pf, (void)res;
#endif
}

void rparams(const QW& q, int64_t n, float* s, float* b) {
#ifdef MLXE_X86
  if (avx2()) return row_params_avx2(q, n, s, b);
#endif
  row_params(q, n, s, b);
}

// Row n's float32 scales and biases: read in place when stored as float32, else converted into s/b.
inline void row_params_at(const QW& q, int64_t n, float* s, float* b, const float** sp, const float** bp) {
  if (q.sdt == MLXE_F32 && BIAS_ON == 1.0f) {
    *sp = static_cast<const float*>(q.s) + n * q.groups();
    *bp = static_cast<const float*>(q.b) + n * q.groups();
    return;
  }
  rparams(q, n, s, b);
  *sp = s;
  *bp = b;
}

void dequant(const QW& q, int64_t n0, int64_t n1, float* dst) {
  auto& rs = row_scratch();
  if (rs.size() < size_t(2 * q.groups())) rs.resize(size_t(2 * q.groups()));
#ifdef MLXE_X86
  if (avx2()) return dequant_avx2(q, n0, n1, dst);
#endif
  dequant_scalar(q, n0, n1, dst);
}

float fdot(const float* a, const float* b, int64_t K) {
#ifdef MLXE_X86
  if (avx2()) return fdot_avx2(a, b, K);
#endif
  return fdot_scalar(a, b, K);
}

void convert_f32(const void* src, int dt, int64_t n, float* dst) {
#ifdef MLXE_X86
  if (avx2()) return to_f32_avx2(src, dt, n, dst);
#endif
  to_f32(src, dt, n, dst);
}

// C[M, NB] (ldc) = A[M, K] * B[NB, K]^T
void gemm_nt(const float* A, const float* B, float* C, int64_t M, int64_t NB, int64_t K, int64_t ldc) {
  if (g_use_blas && g_sgemm) {
    g_sgemm(kRowMajor, kNoTrans, kTrans, int(M), int(NB), int(K), 1.0f, A, int(K), B, int(K), 0.0f,
            C, int(ldc));
    return;
  }
#ifdef MLXE_X86
  if (avx2()) return gemm_nt_avx2(A, B, C, M, NB, K, ldc);
#endif
  gemm_nt_scalar(A, B, C, M, NB, K, ldc);
}

void prep_x(XPrep& p, const void* x, int xdt, int64_t M, int64_t K, int gs, int bits, bool permute) {
  p.M = M;
  p.K = K;
  p.G = K / gs;
  p.xf.resize(size_t(M * K));
  convert_f32(x, xdt, M * K, p.xf.data());
  p.xsum.resize(size_t(M * p.G));
  for (int64_t m = 0; m < M; m++)
    for (int64_t g = 0; g < p.G; g++) {
      const float* xg = p.xf.data() + m * K + g * gs;
      float a[8] = {};  // eight independent sums (gs is a multiple of 8): the compiler vectorises them
      for (int k = 0; k < gs; k += 8)
        for (int j = 0; j < 8; j++) a[j] += xg[k + j];
      p.xsum[size_t(m * p.G + g)] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    }
#ifdef MLXE_X86
  p.digits = permute && M == 1 &&
             (vnni() ? digits_x(p, bits) : bits == 4 && g_isa == MLXE_ISA_AVX2 && digits_x_avx2(p));
  if (permute && avx2() && !p.digits) {
    if (avx512()) permute_x(p, bits, 16);
    else permute_x_avx2(p, bits);
  }
#else
  (void)permute;
  (void)bits;
#endif
}

// A GEMV reading fewer bytes than this runs on the calling thread alone: below it, handing half to a
// worker costs more than it saves. It was 1 MiB while idle workers slept between calls (576x576 at 4 bits:
// 19 us on one thread, 31-47 us on two, waking the worker). Since they keep polling through a decode step
// (MLXEDGE_CPU_YIELD_US), splitting from 128 KiB made SmolLM2's 4-bit decode 7.6% faster (median of 12
// paired rounds, all 12 faster; scripts/decode_env_ab.py, Zen 4, 2 cores), its 8-bit decode and a 1B-class
// model's unchanged within noise. k/v at 4 bits (83 KB) stays on one thread.
int64_t g_parallel_min_bytes = [] {
  const char* e = std::getenv("MLXEDGE_CPU_PARALLEL_MIN_KB");
  return e ? int64_t(std::max(0, std::atoi(e))) << 10 : int64_t(128) << 10;
}();

// rows of W per task for a GEMV reading `bytes`: all of them under g_parallel_min_bytes, else small
// enough to balance two or more threads, large enough to amortise
int64_t gemv_chunk(int64_t N, int64_t bytes) {
  if (bytes < g_parallel_min_bytes) return N;
  int64_t T = pool().size();
  int64_t c = (N + T * 8 - 1) / (T * 8);
  c = (c + 7) / 8 * 8;
  return std::max<int64_t>(c, 8);
}

constexpr int64_t kTileN = 64;  // weight rows dequantised per GEMM tile

// Decode (one activation row, on the x86 SIMD paths): out[n - n0] for rows [n0, n1) in fours, prefetching
// ahead of them (StepPrefetch, from the caller's `ahead`; up to row nlim); returns the first row not done (the float paths leave the last
// n % 4 rows to the caller; the VNNI path does them all, as the caller's qdot has no float x to work on).
int64_t decode_rows4(const QW& q, const XPrep& xp, int64_t n0, int64_t n1, int64_t nlim, int64_t ahead, float* out) {
#ifdef MLXE_X86
  if (xp.digits) return !vnni()       ? decode_rows4_digits_avx2(q, xp, n0, n1, nlim, ahead, out)
                       : q.bits == 4 ? decode_rows4_vnni(q, xp, n0, n1, nlim, ahead, out)
                                     : decode_rows4_vnni8(q, xp, n0, n1, nlim, ahead, out);
  if (avx512()) return decode_rows4_avx512(q, xp, n0, n1, nlim, ahead, out);
#endif
  int64_t n = n0;
  Rows4Steps steps(q, n0, n1, nlim, ahead);
  for (; n + 4 <= n1; n += 4) {
    const Rows4 r4 = steps.step(n);
    qdot4(q, n, xp, r4.s, r4.b, steps.pf, out + (n - n0));
  }
  return n;
}

// rows [n0, n1) of y[M, N] f32 (ldy = N) = x @ deq(W).T through the GEMV path, on the calling thread;
// the prefetch runs on to row nlim (>= n1: rows this thread computes next)
void qgemv_rows(const QW& q, const XPrep& xp, float* y, int64_t M, int64_t n0, int64_t n1, int64_t nlim) {
  const int64_t N = q.N, G = q.groups(), Mend = ROWS_END(M);
  const int64_t ahead = prefetch_rows_ahead(qrow_bytes(q));
  prefetch_qrows(q, n0, std::min(n1, n0 + ahead));
  int64_t n = n0;
  if (M == 1 && avx2()) n = decode_rows4(q, xp, n0, n1, nlim, ahead, y + n0);  // decode: four weight rows at once
  auto& rs = row_scratch();
  if (rs.size() < size_t(2 * G)) rs.resize(size_t(2 * G));
  float* s = rs.data();
  float* b = s + G;
  float res[4];
  const float *sn, *bn;
  for (; n < n1; n++) {
    prefetch_qrows(q, n + ahead, std::min(n1, n + ahead + 1));
    row_params_at(q, n, s, b, &sn, &bn);
    for (int64_t m0 = 0; m0 < Mend; m0 += 4) {
      const int mr = int(std::min<int64_t>(4, Mend - m0));
      qdot(q, n, xp, m0, mr, sn, bn, res);
      for (int i = 0; i < mr; i++) y[(m0 + i) * N + n] = res[i];
    }
  }
}

// the bytes a GEMV over these weights reads: under g_parallel_min_bytes it runs on the calling thread alone
int64_t parts_bytes(const std::vector<QW>& qs) {
  int64_t bytes = 0;
  for (const auto& q : qs) bytes += q.N * qrow_bytes(q);
  return bytes;
}

void store_out(const float* y, void* out, int odt, int64_t n) {
#ifdef MLXE_X86
  if (avx2()) return from_f32_avx2(y, odt, n, out);
#endif
  store_row(out, odt, 0, n, y);
}

// Where a GEMV task (or a whole GEMM) puts its results, rows [n0, n1) of out[M, N]: straight into out where that is float32,
// else into this thread's float32 buffer (rows()), which finish() converts into out. Each task converts its
// own rows, so the calling thread neither allocates a result buffer per call nor reads the results the
// workers wrote from their caches: 576x576 4/64 bfloat16, 2 threads (ab_core_builds BF16=1, interleaved,
// 2 runs), hot 8.05-8.13 -> 6.94-6.99 us, from DRAM (COLD=1 SEP=1 ROTATE_MB=640) 9.36-9.41 -> 8.84.
struct TaskOut {
  void* out;
  int odt;
  int64_t M, N;

  float* rows() const {
    if (odt == MLXE_F32) return static_cast<float*>(out);
    thread_local std::vector<float> mine;  // capacity kept from call to call, written before it is read
    if (mine.size() < size_t(M * N)) mine.resize(size_t(M * N));
    return mine.data();
  }

  void finish(const float* y, int64_t n0, int64_t n1) const {
    if (odt == MLXE_F32) return;
    for (int64_t m = 0; m < M; m++)
      store_out(y + m * N + n0, static_cast<char*>(out) + size_t(m * N + n0) * 2, odt, n1 - n0);
  }
};

// The GEMV path for one or several weights against one x (a layer's q, k and v projections): their rows
// form one row space, split into tasks as one GEMV of the summed size is (all on the calling thread below
// g_parallel_min_bytes), so three small matrices cost what one larger one does. prepare() fills xp; it
// runs once the threads' first rows are asked for (Prelude).
template <class P>
void qgemv_parts(const std::vector<QW>& qs, const XPrep& xp, void* const* outs, int odt, int64_t M, P&& prepare) {
  int64_t rows = 0;
  for (const auto& q : qs) rows += q.N;
  const int64_t bytes = parts_bytes(qs);
  const int64_t chunk = gemv_chunk(rows, bytes);
  struct Task {
    size_t part;
    int64_t n0, n1;
  };
  std::vector<Task> tasks;
  for (size_t i = 0; i < qs.size(); i++)
    for (int64_t n0 = 0; n0 < COLS_END(qs[i].N); n0 += chunk)
      tasks.push_back({i, n0, std::min(n0 + chunk, COLS_END(qs[i].N))});
  // A thread asks for its first rows before x is prepared, so that their DRAM latency overlaps the
  // preparation instead of stalling the first steps. One thread, Zen 3, from DRAM, each array in its own
  // allocation as MLX's lie (ab_core_builds.cpp SEP=1 COLD=1, interleaved, 3 runs): 192x576 4/64 (SmolLM2's
  // k/v) 7.56-7.66 -> 7.19-7.29 us. On two threads, see Prelude.
  auto first_rows = [&](int64_t i, int64_t) {
    const auto& t = tasks[size_t(i)];
    const QW& q = qs[t.part];
    prefetch_qrows(q, t.n0, std::min(t.n1, t.n0 + prefetch_rows_ahead(qrow_bytes(q))));
  };
  auto run_task = [&](const Task& t, int64_t nlim) {
    const QW& q = qs[t.part];
    const TaskOut to{outs[t.part], odt, M, q.N};
    float* y = to.rows();
    qgemv_rows(q, xp, y, M, t.n0, t.n1, nlim);
    to.finish(y, t.n0, t.n1);
  };
  if (bytes < g_parallel_min_bytes) {
    if (!tasks.empty()) first_rows(0, 1);
    prepare();
    for (const auto& t : tasks) run_task(t, t.n1);
    return;
  }
  parallel_for_runs_prepared(int64_t(tasks.size()), [&](int64_t i, int64_t run_end) {
    const auto& t = tasks[size_t(i)];
    int64_t last = i;  // the run's last task in t's weight: its rows are this thread's next
    while (last + 1 < run_end && tasks[size_t(last + 1)].part == t.part) last++;
    run_task(t, tasks[size_t(last)].n1);
  }, first_rows, prepare);
}

// y[M, N] f32 = x @ deq(W).T through dequantised tiles and a GEMM
void qgemm(const QW& q, const XPrep& xp, float* y, int64_t M) {
  const int64_t N = q.N, K = q.K;
  const int64_t ntasks = (COLS_END(N) + kTileN - 1) / kTileN;
  const int64_t Mend = ROWS_END(M);
  reserve_tiles(kTileN * K);
  parallel_for(ntasks, [&](int64_t t) {
    const int64_t n0 = t * kTileN, n1 = std::min(n0 + kTileN, COLS_END(N));
    float* tile = tile_buffer(kTileN * K);
    dequant(q, n0, n1, tile);
    gemm_nt(xp.xf.data(), tile, y + n0, Mend, n1 - n0, K, N);
  });
}

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

}  // namespace

// ---------------------------------------------------------------- C ABI

extern "C" {

int mlxe_init(int isa, int nthreads) {
  std::lock_guard<std::mutex> lk(g_call_mu);
  init_locked(isa, nthreads);
  return g_isa;
}

}  // extern "C"

namespace {
void init_locked(int isa, int nthreads) {
  (void)isa;  // unused where only the portable path exists
  int chosen = MLXE_ISA_SCALAR;
#ifdef MLXE_X86
  if ((isa == MLXE_ISA_AUTO || isa == MLXE_ISA_AVX2) && cpu_has_avx2()) chosen = MLXE_ISA_AVX2;
  if ((isa == MLXE_ISA_AUTO || isa == MLXE_ISA_AVX512) && cpu_has_avx512()) chosen = MLXE_ISA_AVX512;
  if ((isa == MLXE_ISA_AUTO || isa == MLXE_ISA_AVX512_VNNI) && cpu_has_avx512vnni()) chosen = MLXE_ISA_AVX512_VNNI;
#endif
#if defined(__aarch64__)
  // arm64: the portable path, compiled with NEON as the baseline ISA
  if (isa == MLXE_ISA_AUTO || isa == MLXE_ISA_NEON) chosen = MLXE_ISA_NEON;
#endif
  g_isa = chosen;
  if (nthreads <= 0) {
    nthreads = int(std::thread::hardware_concurrency());
    if (nthreads <= 0) nthreads = 1;
  }
  if (!g_pool || g_pool->size() != nthreads) {
    delete g_pool;
    g_pool = new Pool(nthreads);
  }
}
}  // namespace

extern "C" {

int mlxe_isa(void) { return g_isa; }

void mlxe_parallel_for(int64_t ntasks, void (*fn)(void* ctx, int64_t task), void* ctx) {
  auto lock = enter_kernel();
  parallel_for(ntasks, [&](int64_t t) { fn(ctx, t); });
}
void mlxe_parallel_for_prepared(int64_t ntasks, void (*fn)(void* ctx, int64_t task), void (*prepare)(void* ctx),
                                void* ctx) {
  auto lock = enter_kernel();
  parallel_for_runs_prepared(
      ntasks, [&](int64_t t, int64_t) { fn(ctx, t); }, [](int64_t, int64_t) {}, [&] { prepare(ctx); });
}
int mlxe_threads(void) { return g_pool ? g_pool->size() : 0; }
void mlxe_set_gemv_max_rows(int rows) {
  std::lock_guard<std::mutex> lk(g_call_mu);
  g_gemv_max_rows = std::max(1, rows);
}
int64_t mlxe_set_gemv_parallel_min_bytes(int64_t bytes) {
  std::lock_guard<std::mutex> lk(g_call_mu);
  const int64_t previous = g_parallel_min_bytes;
  g_parallel_min_bytes = std::max<int64_t>(0, bytes);
  return previous;
}
const char* mlxe_plant(void) { return PLANT_NAME; }

int mlxe_set_blas(const char* path) {
  std::lock_guard<std::mutex> lk(g_call_mu);
  void* h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!h) return 0;
  auto f = reinterpret_cast<sgemm_fn>(dlsym(h, "scipy_cblas_sgemm"));
  auto nt = reinterpret_cast<setthreads_fn>(dlsym(h, "scipy_openblas_set_num_threads"));
  if (!f) return 0;
  if (nt) nt(1);  // our pool parallelises over tiles; each tile's GEMM runs on one thread
  g_sgemm = f;
  g_use_blas = true;
  return 1;
}

int mlxe_use_blas(int on) {
  std::lock_guard<std::mutex> lk(g_call_mu);
  g_use_blas = on && g_sgemm;
  return g_use_blas ? 1 : 0;
}
int mlxe_has_blas(void) { return g_sgemm ? 1 : 0; }

// one weight: the several-weights path with one part
void mlxe_qmm(const void* x, int xdt, const uint32_t* w, const void* scales, const void* biases,
              int sdt, void* out, int odt, int64_t M, int64_t N, int64_t K, int bits,
              int group_size) {
  mlxe_qmm_many(x, xdt, 1, &w, &scales, &biases, sdt, &out, odt, M, &N, K, bits, group_size);
}

void mlxe_qmm_many(const void* x, int xdt, int nparts, const uint32_t* const* w, const void* const* scales,
                   const void* const* biases, int sdt, void* const* outs, int odt, int64_t M, const int64_t* N,
                   int64_t K, int bits, int group_size) {
  auto lock = enter_kernel();
  const bool gemv = M <= g_gemv_max_rows;
  // reused: its buffers keep their capacity from call to call. A reference, so that the pool's tasks
  // (lambdas) see this thread's XPrep: naming a thread_local inside them would give each worker its own.
  thread_local XPrep prepared;
  XPrep& xp = prepared;
  std::vector<QW> qs;
  for (int i = 0; i < nparts; i++) qs.push_back(QW{w[i], scales[i], biases[i], sdt, N[i], K, bits, group_size});
  auto prepare = [&] { prep_x(xp, x, xdt, M, K, group_size, bits, gemv); };
  if (gemv) return qgemv_parts(qs, xp, outs, odt, M, prepare);  // (it prepares x once its first rows are asked for)
  prepare();
  for (int i = 0; i < nparts; i++) {
    const TaskOut to{outs[i], odt, M, N[i]};
    float* y = to.rows();
    qgemm(qs[size_t(i)], xp, y, M);
    to.finish(y, 0, N[i]);
  }
}

void mlxe_gate_up_silu(const void* x, int xdt, const uint32_t* wg, const void* sg, const void* bg,
                       const uint32_t* wu, const void* su, const void* bu, int sdt, void* out,
                       int odt, int64_t M, int64_t N, int64_t K, int bits, int group_size) {
  auto lock = enter_kernel();
  QW qg{wg, sg, bg, sdt, N, K, bits, group_size};
  QW qu{wu, su, bu, sdt, N, K, bits, group_size};
  const bool gemv = M <= g_gemv_max_rows;
  // reused: its buffers keep their capacity from call to call. A reference, so that the pool's tasks
  // (lambdas) see this thread's XPrep: naming a thread_local inside them would give each worker its own.
  thread_local XPrep prepared;
  XPrep& xp = prepared;
  auto prepare = [&] { prep_x(xp, x, xdt, M, K, group_size, bits, gemv); };
  const TaskOut to{out, odt, M, N};
  if (gemv) {
    // fused: each task reads its rows of Wg and Wu once and writes silu(g) * u
    const int64_t chunk = gemv_chunk(N, 2 * N * qrow_bytes(qg)), G = K / group_size;
    const int64_t ntasks = (COLS_END(N) + chunk - 1) / chunk;
    const int64_t Mend = ROWS_END(M);
    const int64_t ahead = prefetch_rows_ahead(2 * qrow_bytes(qg));
    auto first_rows = [&](int64_t t, int64_t) {  // a task's first rows of both weights
      const int64_t n0 = t * chunk, n1 = std::min(n0 + chunk, COLS_END(N));
      prefetch_qrows(qg, n0, std::min(n1, n0 + ahead));
      prefetch_qrows(qu, n0, std::min(n1, n0 + ahead));
    };
    parallel_for_runs_prepared(ntasks, [&](int64_t t, int64_t run_end) {
      const int64_t n0 = t * chunk, n1 = std::min(n0 + chunk, COLS_END(N));
      const int64_t nlim = std::min(run_end * chunk, COLS_END(N));  // this thread's next rows: prefetch on into them
      first_rows(t, run_end);
      float* y = to.rows();
      constexpr int64_t kPiece = 64;  // decode: rows of Wg then the same rows of Wu, a piece at a time
      float rg[kPiece], ru[kPiece];
      int64_t n = n0;
      while (M == 1 && avx2() && (n + 4 <= n1 || (xp.digits && n < n1))) {
        const int64_t end = std::min(n1, n + kPiece);
        const int64_t done = decode_rows4(qg, xp, n, end, nlim, ahead, rg);
        decode_rows4(qu, xp, n, end, nlim, ahead, ru);
        for (int64_t i = n; i < done; i++) y[i] = silu(rg[i - n]) * ru[i - n];
        n = done;
      }
      auto& rs = row_scratch();
      if (rs.size() < size_t(4 * G)) rs.resize(size_t(4 * G));
      float *s1 = rs.data(), *b1 = s1 + G, *s2 = b1 + G, *b2 = s2 + G;
      float rg1[4], ru1[4];
      const float *sgn, *bgn, *sun, *bun;
      for (; n < n1; n++) {
        prefetch_qrows(qg, n + ahead, std::min(n1, n + ahead + 1));
        prefetch_qrows(qu, n + ahead, std::min(n1, n + ahead + 1));
        row_params_at(qg, n, s1, b1, &sgn, &bgn);
        row_params_at(qu, n, s2, b2, &sun, &bun);
        for (int64_t m0 = 0; m0 < Mend; m0 += 4) {
          const int mr = int(std::min<int64_t>(4, Mend - m0));
          qdot(qg, n, xp, m0, mr, sgn, bgn, rg1);
          qdot(qu, n, xp, m0, mr, sun, bun, ru1);
          for (int i = 0; i < mr; i++) y[(m0 + i) * N + n] = silu(rg1[i]) * ru1[i];
        }
      }
      to.finish(y, n0, n1);
    }, first_rows, prepare);
    return;
  }
  prepare();
  float* y = to.rows();
  std::vector<float> ubuf(size_t(M * N));
  qgemm(qg, xp, y, M);
  qgemm(qu, xp, ubuf.data(), M);
  for (int64_t i = 0; i < M * N; i++) y[i] = silu(y[i]) * ubuf[size_t(i)];
  to.finish(y, 0, N);
}

void mlxe_matmul(const void* x, int xdt, const void* w, int wdt, void* out, int odt, int64_t M,
                 int64_t N, int64_t K) {
  auto lock = enter_kernel();
  std::vector<float> xf(size_t(M * K));
  convert_f32(x, xdt, M * K, xf.data());
  std::vector<float> ybuf;
  float* y = static_cast<float*>(out);
  if (odt != MLXE_F32) {
    ybuf.resize(size_t(M * N));
    y = ybuf.data();
  }
  const int64_t Mend = ROWS_END(M);
  const size_t wsz = wdt == MLXE_F32 ? 4 : 2;
  if (M <= g_gemv_max_rows) {
    const int64_t chunk = gemv_chunk(N, N * K * int64_t(wsz));
    const int64_t ntasks = (COLS_END(N) + chunk - 1) / chunk;
    parallel_for(ntasks, [&](int64_t t) {
      const int64_t n0 = t * chunk, n1 = std::min(n0 + chunk, COLS_END(N));
      auto& rs = row_scratch();
      if (wdt != MLXE_F32 && rs.size() < size_t(K)) rs.resize(size_t(K));
      const char* wbytes = static_cast<const char*>(w);
      const int64_t row_bytes = K * int64_t(wsz), ahead = prefetch_rows_ahead(row_bytes);
      prefetch_bytes(wbytes + n0 * row_bytes, (std::min(n1, n0 + ahead) - n0) * row_bytes);
      for (int64_t n = n0; n < n1; n++) {
        if (n + ahead < n1) prefetch_bytes(wbytes + (n + ahead) * row_bytes, row_bytes);
        const float* wr;
        if (wdt == MLXE_F32) {
          wr = static_cast<const float*>(w) + n * K;
        } else {
          convert_f32(static_cast<const char*>(w) + size_t(n * K) * wsz, wdt, K, rs.data());
          wr = rs.data();
        }
        for (int64_t m = 0; m < Mend; m++) y[m * N + n] = fdot(xf.data() + m * K, wr, K);
      }
    });
  } else {
    const int64_t ntasks = (COLS_END(N) + kTileN - 1) / kTileN;
    reserve_tiles(kTileN * K);
    parallel_for(ntasks, [&](int64_t t) {
      const int64_t n0 = t * kTileN, n1 = std::min(n0 + kTileN, COLS_END(N));
      const float* B;
      if (wdt == MLXE_F32) {
        B = static_cast<const float*>(w) + n0 * K;
      } else {
        float* tile = tile_buffer(kTileN * K);
        convert_f32(static_cast<const char*>(w) + size_t(n0 * K) * wsz, wdt, (n1 - n0) * K, tile);
        B = tile;
      }
      gemm_nt(xf.data(), B, y + n0, Mend, n1 - n0, K, N);
    });
  }
  store_out(y, out, odt, M * N);
}

}  // extern "C"
