// mlxedge native CPU kernels besides the matmuls: RMS norm, rotary embedding, attention.
//
// Plain C ABI like core.h (dtype codes MLXE_F32/F16/BF16; accumulation in float32). They share the
// matmuls' thread pool and ISA choice (mlxe_init), so they must be linked with core.cpp.
#pragma once
#include <stdint.h>

#include "core.h"

#ifdef __cplusplus
extern "C" {
#endif

// The name of the planted bug this build of ops.cpp carries ("" for a clean build).
const char* mlxe_ops_plant(void);

// out[m, :] = (x[m, :] * rsqrt(mean(x[m, :]^2) + eps)) * w for M rows of width D (x, out dense).
// As mx.fast.rms_norm: the normalised row is rounded to the output dtype before the weight multiply.
// w may be null (no weight).
void mlxe_rms_norm(const void* x, int xdt, const void* w, int wdt, void* out, int odt, int64_t M,
                   int64_t D, float eps);

// Rotary embedding as mx.fast.rope over x viewed as [R, L, D] (dense; L = positions, D = features):
// position of row l is offset + l; the first `dims` features rotate (pairs (i, i + dims/2), or
// (2i, 2i+1) when traditional), the rest are copied. Frequencies: inv_freqs[i] (dims/2 of them) if
// given, else base^(-2i/dims); angles are scale * position * frequency. out has x's dtype.
void mlxe_rope(const void* x, int dt, void* out, int64_t R, int64_t L, int64_t D, int dims,
               int traditional, float base, float scale, int64_t offset, const float* inv_freqs);

// Scaled dot-product attention, softmax(scale * q k^T [+ causal mask]) v, grouped-query aware:
// q [B, Hq, Lq, D] dense; k, v [B, Hkv, Lk, D] given by element strides (batch, head, row) with the
// last dimension contiguous; query head h reads kv head h / (Hq / Hkv). causal: query i sees keys
// j <= Lk - Lq + i (the bottom-right alignment of mx.fast.scaled_dot_product_attention). q, k, v and
// out share one dtype; out is dense [B, Hq, Lq, D].
void mlxe_sdpa(const void* q, const void* k, const void* v, int dt, void* out, int64_t B, int64_t Hq,
               int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D, const int64_t* k_strides,
               const int64_t* v_strides, float scale, int causal);

// The sampling filters of transformers' generate(do_sample=True), in its order, on float32 logits
// x [B, V] -> out [B, V] with every removed token at -inf: divide by temperature (when != 1); top_k
// (0 < k < V): drop logits strictly below the k-th largest; top_p (< 1): in ascending order drop the
// tokens whose cumulative softmax probability is <= 1 - top_p, always keeping the largest; min_p (> 0):
// drop tokens whose probability is below min_p times the largest one's.
void mlxe_filter_logits(const float* x, float* out, int64_t B, int64_t V, float temperature, int64_t top_k,
                        float top_p, float min_p);

#ifdef __cplusplus
}
#endif
