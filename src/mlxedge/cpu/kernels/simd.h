// mlxedge native CPU kernels: the x86-64 SIMD switch and the AVX2/AVX-512 helpers core.cpp and ops.cpp share.
//
// The AVX2 and AVX-512 code is compiled through target attributes (no -mavx2 for the whole file) and chosen at run
// time (mlxe_init), so one build runs on any x86-64. -DMLXEDGE_NO_X86_SIMD builds only the portable path.
#pragma once

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(MLXEDGE_NO_X86_SIMD)
#define MLXE_X86 1
#include <immintrin.h>
#define MLXE_AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define MLXE_AVX512_FN __attribute__((target("avx512f,avx2,fma,f16c")))

namespace mlxe {

// the sum of a vector's eight lanes
MLXE_AVX2_FN inline float hsum8(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

}  // namespace mlxe
#endif
