// mlxedge native CPU kernels besides the matmuls: RMS norm, rotary embedding, attention (ops.h).
//
// On MLX's CPU backend mx.fast.rms_norm, mx.fast.rope and mx.fast.scaled_dot_product_attention are
// not kernels: each expands into its reference graph (8-20 primitives, the attention matmuls through
// the reference BLAS), and a decode step of a small model is then mostly per-primitive overhead.
// These are one pass each. Portable C++ with an AVX2 path where it pays (the attention's dot
// products and exponentials); the matmuls' ISA choice (mlxe_init) applies. Work is split over rows
// (norm), rows of the [R, L, D] view (rope) and (batch, head, query block) (attention) on the
// matmuls' thread pool.
//
// Planted bugs for the mutation tests: compile with -DMLXEDGE_PLANT_<NAME> (see OPS_PLANT below).
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <cstring>
#include <vector>

#include "dtype.h"

#include "simd.h"  // MLXE_X86, MLXE_AVX2_FN, hsum8

// planted bugs (tests/test_cpu_mutations.py): each must make the op checks fail
#ifdef MLXEDGE_PLANT_ROPE_HALF
#define ROPE_PARTNER(i, half) ((i) + (half) - 1)  // planted: pairs the wrong feature
#else
#define ROPE_PARTNER(i, half) ((i) + (half))
#endif
#ifdef MLXEDGE_PLANT_CAUSAL_OFF_BY_ONE
#define CAUSAL_LAST(i, Lq, Lk) ((Lk) - (Lq) + (i) - 1)  // planted: a query does not see itself
#else
#define CAUSAL_LAST(i, Lq, Lk) ((Lk) - (Lq) + (i))
#endif
#ifdef MLXEDGE_PLANT_GQA_HEAD
#define KV_HEAD(h, group, Hkv) ((h) % (Hkv))  // planted: interleaved instead of grouped heads
#else
#define KV_HEAD(h, group, Hkv) ((h) / (group))
#endif
#ifdef MLXEDGE_PLANT_NORM_MEAN
#define NORM_DIVISOR(D) double((D) - 1)  // planted: divides the sum of squares by D - 1
#else
#define NORM_DIVISOR(D) double(D)
#endif

#if defined(MLXEDGE_PLANT_ROPE_HALF)
#define OPS_PLANT_NAME "rope_half"
#elif defined(MLXEDGE_PLANT_CAUSAL_OFF_BY_ONE)
#define OPS_PLANT_NAME "causal_off_by_one"
#elif defined(MLXEDGE_PLANT_GQA_HEAD)
#define OPS_PLANT_NAME "gqa_head"
#elif defined(MLXEDGE_PLANT_NORM_MEAN)
#define OPS_PLANT_NAME "norm_mean"
#else
#define OPS_PLANT_NAME ""
#endif

using namespace mlxe;

namespace {

template <class F>
void parallel_for(int64_t ntasks, F&& f) {
  auto tramp = [](void* ctx, int64_t t) { (*static_cast<F*>(ctx))(t); };
  mlxe_parallel_for(ntasks, tramp, &f);
}

inline bool use_avx2() {
#ifdef MLXE_X86
  return mlxe_isa() == MLXE_ISA_AVX2 || mlxe_isa() == MLXE_ISA_AVX512 || mlxe_isa() == MLXE_ISA_AVX512_VNNI;
#else
  return false;
#endif
}

inline float rnd(float v, int dt) {  // round a float32 value through dtype dt
  switch (dt) {
    case MLXE_F16: return f16_to_f32(f32_to_f16(v));
    case MLXE_BF16: return bf16_to_f32(f32_to_bf16(v));
    default: return v;
  }
}

std::vector<float>& scratch(int which) {
  thread_local std::vector<float> bufs[4];
  return bufs[which];
}

float* scratch_of(int which, int64_t n) {
  auto& b = scratch(which);
  if (b.size() < size_t(n)) b.resize(size_t(n));
  return b.data();
}

// rows per task so that a task holds at least ~16k elements (small problems run on the caller)
int64_t rows_per_task(int64_t rows, int64_t width) {
  int64_t per = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, width));
  return std::min(rows, per);
}

// ---------------------------------------------------------------- dot / axpy / exp

float dot_scalar(const float* a, const float* b, int64_t n) {
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += a[i] * b[i];
    s1 += a[i + 1] * b[i + 1];
    s2 += a[i + 2] * b[i + 2];
    s3 += a[i + 3] * b[i + 3];
  }
  for (; i < n; i++) s0 += a[i] * b[i];
  return (s0 + s1) + (s2 + s3);
}

void axpy_scalar(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

#ifdef MLXE_X86
#define OPS_AVX2 MLXE_AVX2_FN

OPS_AVX2 float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float r = hsum8(_mm256_add_ps(s0, s1));
  for (; i < n; i++) r += a[i] * b[i];
  return r;
}

OPS_AVX2 void axpy_avx2(float a, const float* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; i++) y[i] += a * x[i];
}

// exp(x) for x <= 0 (softmax after subtracting the max): 2^n * p(r), |rel err| < 2e-7; x < -87 -> 0.
OPS_AVX2 __m256 exp_neg_avx2(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(under, y);
}

// p[j] = exp(p[j] - m) in place; returns the sum
OPS_AVX2 float exp_sum_avx2(float* p, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 e = exp_neg_avx2(_mm256_sub_ps(_mm256_loadu_ps(p + j), mv));
    _mm256_storeu_ps(p + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  float s = hsum8(acc);
  for (; j < n; j++) {
    p[j] = std::exp(p[j] - m);
    s += p[j];
  }
  return s;
}

OPS_AVX2 float sum_squares_avx2(const float* x, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 u = _mm256_loadu_ps(x + i), v = _mm256_loadu_ps(x + i + 8);
    a0 = _mm256_fmadd_ps(u, u, a0);
    a1 = _mm256_fmadd_ps(v, v, a1);
  }
  float s = hsum8(_mm256_add_ps(a0, a1));
  for (; i < n; i++) s += x[i] * x[i];
  return s;
}
#endif

float dot(const float* a, const float* b, int64_t n) {
#ifdef MLXE_X86
  if (use_avx2()) return dot_avx2(a, b, n);
#endif
  return dot_scalar(a, b, n);
}

void axpy(float a, const float* x, float* y, int64_t n) {
#ifdef MLXE_X86
  if (use_avx2()) return axpy_avx2(a, x, y, n);
#endif
  axpy_scalar(a, x, y, n);
}

float exp_sum(float* p, int64_t n, float m) {
#ifdef MLXE_X86
  if (use_avx2()) return exp_sum_avx2(p, n, m);
#endif
  float s = 0;
  for (int64_t j = 0; j < n; j++) {
    p[j] = std::exp(p[j] - m);
    s += p[j];
  }
  return s;
}

float sum_squares(const float* x, int64_t n) {
#ifdef MLXE_X86
  if (use_avx2()) return sum_squares_avx2(x, n);
#endif
  double s = 0;  // the portable path accumulates in double: a reference-quality sum
  for (int64_t i = 0; i < n; i++) s += double(x[i]) * x[i];
  return float(s);
}

}  // namespace

extern "C" {

const char* mlxe_ops_plant(void) { return OPS_PLANT_NAME; }

void mlxe_rms_norm(const void* x, int xdt, const void* w, int wdt, void* out, int odt, int64_t M,
                   int64_t D, float eps) {
  if (M <= 0 || D <= 0) return;
  const int64_t per = rows_per_task(M, D);
  parallel_for((M + per - 1) / per, [&](int64_t t) {
    float* row = scratch_of(0, D);
    float* wr = scratch_of(1, D);
    if (w) load_row(w, wdt, 0, D, wr);
    const int64_t m1 = std::min(M, (t + 1) * per);
    for (int64_t m = t * per; m < m1; m++) {
      load_row(x, xdt, m * D, D, row);
      const float ms = float(double(sum_squares(row, D)) / NORM_DIVISOR(D));
      const float r = 1.0f / std::sqrt(ms + eps);
      for (int64_t i = 0; i < D; i++) {
        float v = rnd(row[i] * r, odt);
        row[i] = w ? v * wr[i] : v;
      }
      store_row(out, odt, m * D, D, row);
    }
  });
}

void mlxe_rope(const void* x, int dt, void* out, int64_t R, int64_t L, int64_t D, int dims,
               int traditional, float base, float scale, int64_t offset, const float* inv_freqs) {
  if (R <= 0 || L <= 0 || D <= 0) return;
  const int half = dims / 2;
  // cos/sin per (position, pair), shared by all R rows
  std::vector<float> cs(size_t(L * half)), sn(size_t(L * half));
  std::vector<double> freq(static_cast<size_t>(half));
  for (int i = 0; i < half; i++)
    freq[size_t(i)] = inv_freqs ? double(inv_freqs[i]) : std::pow(double(base), -2.0 * i / dims);
  for (int64_t l = 0; l < L; l++)
    for (int i = 0; i < half; i++) {
      const double a = double(scale) * double(offset + l) * freq[size_t(i)];
      cs[size_t(l * half + i)] = float(std::cos(a));
      sn[size_t(l * half + i)] = float(std::sin(a));
    }
  const int64_t rows = R * L;
  const int64_t per = rows_per_task(rows, D);
  parallel_for((rows + per - 1) / per, [&](int64_t t) {
    float* row = scratch_of(0, D);
    const int64_t q1 = std::min(rows, (t + 1) * per);
    for (int64_t q = t * per; q < q1; q++) {
      const int64_t l = q % L;
      const float* c = cs.data() + l * half;
      const float* s = sn.data() + l * half;
      load_row(x, dt, q * D, D, row);
      if (traditional) {
        for (int i = 0; i < half; i++) {
          const float a = row[2 * i], b = row[2 * i + 1];
          row[2 * i] = a * c[i] - b * s[i];
          row[2 * i + 1] = a * s[i] + b * c[i];
        }
      } else {
        for (int i = 0; i < half; i++) {
          const float a = row[i], b = row[ROPE_PARTNER(i, half)];
          row[i] = a * c[i] - b * s[i];
          row[i + half] = a * s[i] + b * c[i];
        }
      }
      store_row(out, dt, q * D, D, row);
    }
  });
}

void mlxe_sdpa(const void* q, const void* k, const void* v, int dt, void* out, int64_t B, int64_t Hq,
               int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D, const int64_t* k_strides,
               const int64_t* v_strides, float scale, int causal) {
  if (B <= 0 || Hq <= 0 || Lq <= 0 || D <= 0) return;
  const int64_t group = Hkv > 0 ? Hq / Hkv : 1;
  const int esz = dt == MLXE_F32 ? 4 : 2;
  // query rows per task: enough tasks for the pool, few enough that each converts K/V rows once
  const int64_t qblock = Lq <= 8 ? Lq : std::max<int64_t>(8, Lq / 16);
  const int64_t nqb = (Lq + qblock - 1) / qblock;
  parallel_for(B * Hq * nqb, [&](int64_t t) {
    const int64_t b = t / (Hq * nqb), h = (t / nqb) % Hq, qb = t % nqb;
    const int64_t hk = KV_HEAD(h, group, Hkv);
    const char* kbase = static_cast<const char*>(k) + (b * k_strides[0] + hk * k_strides[1]) * esz;
    const char* vbase = static_cast<const char*>(v) + (b * v_strides[0] + hk * v_strides[1]) * esz;
    const int64_t i0 = qb * qblock, i1 = std::min(Lq, i0 + qblock);
    // keys this block sees
    const int64_t kend = causal ? std::min<int64_t>(Lk, CAUSAL_LAST(i1 - 1, Lq, Lk) + 1) : Lk;
    const float* kf;
    const float* vf;
    int64_t kstride, vstride;  // in floats
    if (dt == MLXE_F32) {
      kf = reinterpret_cast<const float*>(kbase);
      vf = reinterpret_cast<const float*>(vbase);
      kstride = k_strides[2];
      vstride = v_strides[2];
    } else {  // convert the rows this block reads
      float* kc = scratch_of(2, std::max<int64_t>(1, kend * D));
      float* vc = scratch_of(3, std::max<int64_t>(1, kend * D));
      for (int64_t j = 0; j < kend; j++) {
        load_row(kbase, dt, j * k_strides[2], D, kc + j * D);
        load_row(vbase, dt, j * v_strides[2], D, vc + j * D);
      }
      kf = kc;
      vf = vc;
      kstride = vstride = D;
    }
    float* qrow = scratch_of(0, D + std::max<int64_t>(Lk, 1) + D);
    float* p = qrow + D;
    float* acc = p + std::max<int64_t>(Lk, 1);
    for (int64_t i = i0; i < i1; i++) {
      const int64_t qoff = ((b * Hq + h) * Lq + i) * D;
      load_row(q, dt, qoff, D, qrow);
      const int64_t n = causal ? std::max<int64_t>(0, std::min<int64_t>(Lk, CAUSAL_LAST(i, Lq, Lk) + 1)) : Lk;
      std::fill(acc, acc + D, 0.0f);
      if (n > 0) {
        float m = -INFINITY;
        for (int64_t j = 0; j < n; j++) {
          p[j] = scale * dot(qrow, kf + j * kstride, D);
          m = std::max(m, p[j]);
        }
        const float sum = exp_sum(p, n, m);
        for (int64_t j = 0; j < n; j++) axpy(p[j], vf + j * vstride, acc, D);
        const float inv = 1.0f / sum;
        for (int64_t d = 0; d < D; d++) acc[d] *= inv;
      }
      store_row(out, dt, qoff, D, acc);
    }
  });
}

}  // extern "C"

namespace {

// softmax probabilities of the finite entries of y (indices idx), in float32 with float64 sums
void probs_of(const float* y, const int64_t* idx, int64_t n, float m, std::vector<float>& p, float* z_out) {
  p.resize(size_t(n));
  double z = 0;
  for (int64_t j = 0; j < n; j++) {
    p[size_t(j)] = std::exp(y[idx[j]] - m);
    z += p[size_t(j)];
  }
  *z_out = float(z);
}

void filter_row(const float* x, float* y, int64_t V, float temperature, int64_t top_k, float top_p,
                float min_p) {
  const float ninf = -INFINITY;
  for (int64_t i = 0; i < V; i++) y[i] = temperature != 1.0f ? x[i] / temperature : x[i];
  std::vector<int64_t> idx;  // the finite entries, the only ones the later filters can change
  idx.reserve(size_t(V));
  if (top_k > 0 && top_k < V) {
    std::vector<float> tmp(y, y + V);
    std::nth_element(tmp.begin(), tmp.begin() + (top_k - 1), tmp.end(), std::greater<float>());
    const float kth = tmp[size_t(top_k - 1)];
    for (int64_t i = 0; i < V; i++) {
      if (y[i] < kth) y[i] = ninf;
      else if (y[i] != ninf) idx.push_back(i);
    }
  } else {
    for (int64_t i = 0; i < V; i++)
      if (y[i] != ninf) idx.push_back(i);
  }
  const int64_t n = int64_t(idx.size());
  if (n == 0) return;
  std::vector<float> p;
  if (top_p < 1.0f) {
    // ascending by value (ties by index), cumulative probability from the smallest
    std::sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return y[a] < y[b] || (y[a] == y[b] && a < b); });
    float z;
    probs_of(y, idx.data(), n, y[idx[size_t(n - 1)]], p, &z);
    float cum = 0;
    std::vector<int64_t> kept;
    kept.reserve(idx.size());
    for (int64_t j = 0; j < n; j++) {
      cum += p[size_t(j)] / z;
      if (cum <= 1.0f - top_p && j < n - 1) y[idx[size_t(j)]] = ninf;
      else kept.push_back(idx[size_t(j)]);
    }
    idx.swap(kept);
  }
  if (min_p > 0.0f && !idx.empty()) {
    float m = ninf;
    for (int64_t i : idx) m = std::max(m, y[i]);
    float z;
    probs_of(y, idx.data(), int64_t(idx.size()), m, p, &z);
    const float threshold = min_p * (1.0f / z);  // the top token's probability is exp(0) / z
    for (size_t j = 0; j < idx.size(); j++)
      if (p[j] / z < threshold) y[idx[j]] = ninf;
  }
}

}  // namespace

extern "C" void mlxe_filter_logits(const float* x, float* out, int64_t B, int64_t V, float temperature,
                                   int64_t top_k, float top_p, float min_p) {
  if (B <= 0 || V <= 0) return;
  parallel_for(B, [&](int64_t b) { filter_row(x + b * V, out + b * V, V, temperature, top_k, top_p, min_p); });
}
