// mlxedge native CPU kernels: the plain C ABI of the kernel core.
//
// The core knows nothing about MLX. The MLX extension (../ext) calls it from a Primitive's eval_cpu,
// and the mutation tests load it directly through ctypes (built with -DMLXEDGE_PLANT=<name>).
//
// Layout (MLX affine quantization, transpose=True): W is [N, K] packed into uint32 words holding a
// little-endian bitstream (element i at bits [i*b, (i+1)*b) of the row), scales and biases are
// [N, K/group_size] (group_size 32, 64 or 128), w[n,k] = scale[n, k/gs] * q[n,k] + bias[n, k/gs]. Results y[m,n] = sum_k x[m,k] w[n,k].
// All accumulation is float32. Arrays are dense row-major.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// dtype codes for x, scales/biases, float weights and outputs
enum { MLXE_F32 = 0, MLXE_F16 = 1, MLXE_BF16 = 2 };
// instruction-set paths
// AVX512: the quantized GEMV in 512-bit vectors (AVX-512F), everything else on the AVX2 code.
// AVX512_VNNI: AVX512 with the 4- and 8-bit decode GEMV in integer dot products (AVX-512 VNNI, BW, VL, VBMI and GFNI).
enum {
  MLXE_ISA_AUTO = 0,
  MLXE_ISA_SCALAR = 1,
  MLXE_ISA_AVX2 = 2,
  MLXE_ISA_NEON = 3,
  MLXE_ISA_AVX512 = 4,
  MLXE_ISA_AVX512_VNNI = 5
};

// Choose the ISA path (AUTO picks the best this CPU supports; a path the CPU lacks falls back to
// scalar) and size the persistent thread pool (<= 0: the cores available). Returns the ISA in use.
int mlxe_init(int isa, int nthreads);
int mlxe_isa(void);
// Run fn(ctx, t) for t in [0, ntasks) on the kernels' thread pool (the calling thread takes part);
// for the other kernel files (ops.cpp), which share the pool and the ISA choice.
void mlxe_parallel_for(int64_t ntasks, void (*fn)(void* ctx, int64_t task), void* ctx);
// mlxe_parallel_for whose tasks start only after prepare(ctx) has run on the calling thread (the decode GEMVs'
// Prelude: workers join meanwhile); for the pool's tests
void mlxe_parallel_for_prepared(int64_t ntasks, void (*fn)(void* ctx, int64_t task), void (*prepare)(void* ctx),
                                void* ctx);
int mlxe_threads(void);
// Rows up to this count take the GEMV path; more take the blocked (dequantize tile + GEMM) path.
void mlxe_set_gemv_max_rows(int rows);
// A GEMV reading fewer bytes than this runs on the calling thread alone (0: every GEMV is split over
// the pool). Returns the previous value. Default 128 KiB, or MLXEDGE_CPU_PARALLEL_MIN_KB.
int64_t mlxe_set_gemv_parallel_min_bytes(int64_t bytes);
// Load an OpenBLAS with scipy_-prefixed symbols (scipy-openblas32) from `path`; 1 on success.
int mlxe_set_blas(const char* path);
// 1: use the loaded BLAS for GEMM tiles, 0: use the built-in micro-kernel. Returns whether BLAS is used.
int mlxe_use_blas(int on);
int mlxe_has_blas(void);
// The name of the planted bug this build carries ("" for a clean build).
const char* mlxe_plant(void);

void mlxe_qmm(const void* x, int xdt, const uint32_t* w, const void* scales, const void* biases,
              int sdt, void* out, int odt, int64_t M, int64_t N, int64_t K, int bits,
              int group_size);

// outs[i] = x @ deq(W_i).T for nparts weights [N[i], K] quantized alike (a layer's q, k and v projections):
// one activation preparation, and on the GEMV path one partition of all their rows over the pool.
void mlxe_qmm_many(const void* x, int xdt, int nparts, const uint32_t* const* w, const void* const* scales,
                   const void* const* biases, int sdt, void* const* outs, int odt, int64_t M, const int64_t* N,
                   int64_t K, int bits, int group_size);

// out = silu(x @ deq(Wg).T) * (x @ deq(Wu).T)
void mlxe_gate_up_silu(const void* x, int xdt, const uint32_t* wg, const void* sg, const void* bg,
                       const uint32_t* wu, const void* su, const void* bu, int sdt, void* out,
                       int odt, int64_t M, int64_t N, int64_t K, int bits, int group_size);

// out = x @ w.T for a float weight w [N, K]
void mlxe_matmul(const void* x, int xdt, const void* w, int wdt, void* out, int odt, int64_t M,
                 int64_t N, int64_t K);

#ifdef __cplusplus
}
#endif
