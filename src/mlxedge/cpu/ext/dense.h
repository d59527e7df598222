// Reading MLX arrays from the native kernels: dtype codes, and dense (row-major) views of arrays that
// may be strided — gathered inside the kernel's task instead of adding a Contiguous primitive per
// input to the graph (a decode step would otherwise carry hundreds of them).
#pragma once
#include <cstring>
#include <vector>

#include "mlx/array.h"

#include "../kernels/core.h"

namespace mlxedge_ext {

namespace mx = mlx::core;

inline int code_of(mx::Dtype dt) {
  if (dt == mx::float32) return MLXE_F32;
  if (dt == mx::float16) return MLXE_F16;
  if (dt == mx::bfloat16) return MLXE_BF16;
  return -1;
}

// The elements of `a` in row-major order: its own buffer when already dense, else a copy in `buf`.
inline const void* dense(const mx::array& a, std::vector<char>& buf) {
  if (a.flags().row_contiguous || a.size() <= 1) return a.data<void>();
  const size_t esz = a.itemsize();
  const int nd = int(a.ndim());
  const auto& sh = a.shape();
  const auto& st = a.strides();
  buf.resize(a.size() * esz);
  const char* src = a.data<char>();
  char* dst = buf.data();
  const int64_t inner = sh[nd - 1], istride = st[nd - 1];
  const size_t outer = a.size() / size_t(inner);
  std::vector<int64_t> idx(size_t(nd), 0);
  for (size_t o = 0; o < outer; o++) {
    int64_t off = 0;
    for (int d = 0; d < nd - 1; d++) off += idx[size_t(d)] * st[d];
    const char* s = src + off * int64_t(esz);
    if (istride == 1) {
      std::memcpy(dst, s, size_t(inner) * esz);
    } else {
      for (int64_t i = 0; i < inner; i++) std::memcpy(dst + i * esz, s + i * istride * int64_t(esz), esz);
    }
    dst += size_t(inner) * esz;
    for (int d = nd - 2; d >= 0; d--) {  // next index over the outer dimensions
      if (++idx[size_t(d)] < sh[d]) break;
      idx[size_t(d)] = 0;
    }
  }
  return buf.data();
}

// A 4-D array [B, H, L, D] as a pointer plus element strides of its first three dimensions with the
// last one contiguous: read in place when it already is (a KV cache slice), else a dense copy.
inline const void* rows_view(const mx::array& a, std::vector<char>& buf, int64_t strides[3]) {
  if (a.ndim() == 4 && (a.strides()[3] == 1 || a.shape(3) == 1)) {
    for (int d = 0; d < 3; d++) strides[d] = a.strides()[d];
    return a.data<void>();
  }
  const void* p = dense(a, buf);
  strides[2] = a.shape(3);
  strides[1] = int64_t(a.shape(2)) * strides[2];
  strides[0] = int64_t(a.shape(1)) * strides[1];
  return p;
}

}  // namespace mlxedge_ext
