// Metal shim: just enough of the Metal Shading Language for g++ to compile the kernel bodies mlxedge hands
// to mx.fast.metal_kernel, and a deterministic fiber scheduler that runs one threadgroup at a time with
// 32-lane SIMD-groups sharing simd_sum and threadgroup_barrier.
//
// Threadgroup memory: `threadgroup T name[n];` becomes a static in the section "mlxe_tgmem"; the harness
// poisons the whole section with 0xFF bytes (NaN for float and half) before every threadgroup.
// Only array declarations at kernel scope are supported (no `threadgroup T*` pointers).
//
// With MLXE_TYPECHECK defined (clang, -fsyntax-only; harness.check_address_spaces) the shim declares instead
// of runs: `device`, `constant` and `threadgroup` become clang address spaces 1, 2 and 3, and `thread` the
// default one (Metal's address space of unqualified locals), so handing a pointer of one address space to
// a parameter declared with another fails to compile, as it does in Metal; bfloat16_t is clang's scalar
// __bf16 (Metal's bfloat is a scalar too, so it reads from any address space). That mode includes no header
// at all (as the Metal standard library is not the C++ one), so any clang checks it without a C++ library.
#pragma once

#ifdef MLXE_TYPECHECK
typedef __INT8_TYPE__ int8_t;
typedef __INT16_TYPE__ int16_t;
typedef __INT32_TYPE__ int32_t;
typedef __INT64_TYPE__ int64_t;
typedef __UINT8_TYPE__ uint8_t;
typedef __UINT16_TYPE__ uint16_t;
typedef __UINT32_TYPE__ uint32_t;
typedef __UINT64_TYPE__ uint64_t;
#else
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ucontext.h>
#include <vector>
#endif

// ---- Scalar types ---------------------------------------------------------------------------------------
typedef unsigned int uint;
typedef _Float16 half;
typedef _Float16 float16_t;

#ifdef MLXE_TYPECHECK
typedef __bf16 bfloat16_t;
#else
struct bfloat16_t {
  uint16_t bits_;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits_ = uint16_t((u >> 16) | 0x40);  // quiet NaN
    } else {
      bits_ = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
    }
  }
  operator float() const {
    uint32_t u = uint32_t(bits_) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
#endif

// ---- Vector types (members only; no swizzles such as .xy) ----------------------------------------------
struct uint3 {
  uint x, y, z;
};

// ---- The kernel-side runtime the scheduler provides ----------------------------------------------------
#ifndef MLXE_TYPECHECK
namespace mlxe_emu {

struct Fiber {
  ucontext_t ctx;
  int simdgroup = 0;
  int lane = 0;
  bool done = false;
  bool waiting = false;
};

struct SimdGroup {
  int live = 0;       // lanes not yet returned
  int arrived = 0;    // lanes waiting in the current simd_sum
  float slots[32];
  float result = 0.0f;
};

struct Threadgroup {
  std::vector<Fiber> fibers;
  std::vector<SimdGroup> groups;
  int live = 0;
  int total = 0;
  int at_barrier = 0;
  int current = -1;
  ucontext_t scheduler;
  const char* error = nullptr;
};

inline Threadgroup*& active() {
  static Threadgroup* tg = nullptr;
  return tg;
}

inline void block_current() {
  Threadgroup* tg = active();
  Fiber& f = tg->fibers[tg->current];
  f.waiting = true;
  swapcontext(&f.ctx, &tg->scheduler);
}

inline void release_simdgroup(Threadgroup* tg, int sg) {
  SimdGroup& g = tg->groups[sg];
  float sum = 0.0f;
  for (int i = 0; i < 32; i++) {
    sum += g.slots[i];
  }
  g.result = sum;
  g.arrived = 0;
  for (auto& f : tg->fibers) {
    if (f.simdgroup == sg) f.waiting = false;
  }
}

inline void release_barrier(Threadgroup* tg) {
  tg->at_barrier = 0;
  for (auto& f : tg->fibers) f.waiting = false;
}

}  // namespace mlxe_emu
#endif

namespace metal {

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

#ifdef MLXE_TYPECHECK
float simd_sum(float v);
void threadgroup_barrier(mem_flags);
float exp(float x);
float abs(float x);
float fma(float a, float b, float c);
float rsqrt(float x);
#else
// Sum over the live lanes of the calling SIMD-group; lanes that already returned contribute nothing.
inline float simd_sum(float v) {
  using namespace mlxe_emu;
  Threadgroup* tg = active();
  Fiber& f = tg->fibers[tg->current];
  SimdGroup& g = tg->groups[f.simdgroup];
  if (g.arrived == 0) {
    for (int i = 0; i < 32; i++) g.slots[i] = 0.0f;
  }
  g.slots[f.lane] = v;
  g.arrived++;
  if (g.arrived == g.live) {
    release_simdgroup(tg, f.simdgroup);
  } else {
    block_current();
  }
  return g.result;
}

inline void threadgroup_barrier(mem_flags) {
  using namespace mlxe_emu;
  Threadgroup* tg = active();
  if (tg->live < tg->total) {
    std::fprintf(stderr, "emulator: threadgroup_barrier reached after some threads of the threadgroup returned\n");
    std::exit(5);
  }
  tg->at_barrier++;
  if (tg->at_barrier == tg->live) {
    release_barrier(tg);
  } else {
    block_current();
  }
}

inline float exp(float x) { return std::exp(x); }
inline float abs(float x) { return std::fabs(x); }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
#endif

template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }

}  // namespace metal

using namespace metal;

// ---- Metal address spaces, defined after every standard include (`thread` would break <thread>) -------
#ifdef MLXE_TYPECHECK
#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup static __attribute__((address_space(3)))
#define thread
#else
#define device
#define constant
#define thread
#define threadgroup static __attribute__((section("mlxe_tgmem")))
#endif
