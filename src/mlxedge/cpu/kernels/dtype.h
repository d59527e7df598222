// mlxedge native CPU kernels: float32 <-> float16/bfloat16 conversions (portable, round to nearest even),
// element by element and a row at a time.
// Shared by core.cpp and ops.cpp; header-only.
#pragma once
#include <stdint.h>

#include <cstring>

#include "core.h"

namespace mlxe {


inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_f32(uint16_t h) { return from_bits(uint32_t(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
  uint32_t u = to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return uint16_t(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        e++;
        man <<= 1;
      } while ((man & 0x400u) == 0);
      u = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | man << 13;
  } else {
    u = sign | (exp + 112) << 23 | man << 13;
  }
  return from_bits(u);
}

inline uint16_t f32_to_f16(float f) {
  uint32_t u = to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);      // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);     // overflow (after rounding) -> inf
  if (a < 0x38800000u) {                                      // subnormal or zero in f16
    if (a < 0x33000000u) return uint16_t(sign);               // below half the smallest subnormal
    uint32_t e = a >> 23;
    uint32_t man = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;                                 // 14..24
    uint32_t r = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) r++;
    return uint16_t(sign | r);
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round to nearest even on bit 13
  return uint16_t(sign | ((r - 0x38000000u) >> 13));
}

inline float load_as_f32(const void* p, int dt, int64_t i) {
  switch (dt) {
    case MLXE_F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case MLXE_BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

inline void store_from_f32(void* p, int dt, int64_t i, float v) {
  switch (dt) {
    case MLXE_F16: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
    case MLXE_BF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// elements [start, start + n) of an array of dtype dt, as float32 (dst) / from float32 (src); the dtype
// is looked at once per row, not per element
inline void load_row(const void* p, int dt, int64_t start, int64_t n, float* dst) {
  const uint16_t* h = static_cast<const uint16_t*>(p) + start;
  switch (dt) {
    case MLXE_F16:
      for (int64_t i = 0; i < n; i++) dst[i] = f16_to_f32(h[i]);
      return;
    case MLXE_BF16:
      for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(h[i]);
      return;
    default: std::memcpy(dst, static_cast<const float*>(p) + start, size_t(n) * 4);
  }
}

inline void store_row(void* p, int dt, int64_t start, int64_t n, const float* src) {
  uint16_t* h = static_cast<uint16_t*>(p) + start;
  switch (dt) {
    case MLXE_F16:
      for (int64_t i = 0; i < n; i++) h[i] = f32_to_f16(src[i]);
      return;
    case MLXE_BF16:
      for (int64_t i = 0; i < n; i++) h[i] = f32_to_bf16(src[i]);
      return;
    default:
      if (static_cast<float*>(p) + start != src) std::memcpy(static_cast<float*>(p) + start, src, size_t(n) * 4);
  }
}

}  // namespace mlxe
