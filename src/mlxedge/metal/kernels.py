"""Metal source strings for the dequantize-and-multiply kernels (MLX affine layout) and their launch geometry.

Two kernels, both bodies for `mx.fast.metal_kernel` (MLX writes the signature from the input and output
names, the template arguments, and the Metal attributes the body mentions):

* ``QMV``: y[m, n] = sum_k x[m, k] * (scale[n, g] * q[n, k] + bias[n, g]) for M = 1..8 activation rows.
* ``GATE_UP``: y[m, n] = silu(x @ Wg.T)[m, n] * (x @ Wu.T)[m, n] in one pass.

How they are laid out (the decode GEMV recipe of llama.cpp's ``kernel_mul_mv_q4_0_f32`` and MLX's
``qmv_fast``): a threadgroup is two SIMD-groups of 32 lanes; each SIMD-group owns ``ROWS_PER_SIMDGROUP``
output rows; each lane takes ``VALUES_PER_LANE`` consecutive weights (2 uint32 words) of each row per
block and walks K in blocks of 32 lanes x that. A lane's values always sit in one quantization group
(16 divides every group size), so each lane reads one scale and one bias per row and block, and folds the
bias through the activation sum: sum_i x_i (s q_i + b) = s * sum_i x_i q_i + b * sum_i x_i. For 4 bits the
activations are pre-divided by 1, 16, 256, 4096 so a 16-bit half-word's nibbles are masked in place, not
shifted. Everything accumulates in float32 and each row ends in one ``simd_sum``. ``ALIGNED`` selects the
path without bounds checks (N a multiple of the rows per threadgroup, K a multiple of the block).
The helpers take their buffers as deduced pointer types: MLX declares an input of fewer than 8 elements
(a one-row weight's scales, say) ``const constant T*`` and a larger one ``const device T*``, and Metal
refuses to pass one address space where the other is declared.

The fused kernel gives SIMD-group 0 the gate rows and SIMD-group 1 the up rows of the same outputs; the up
sums cross through threadgroup memory behind a barrier and SIMD-group 0 writes silu(gate) * up.
"""

from __future__ import annotations

from dataclasses import dataclass

SIMD_SIZE = 32
SIMDGROUPS_PER_THREADGROUP = 2
ROWS_PER_SIMDGROUP = 4
MAX_ROWS = 8  # activation rows (decode and small batches); more goes to MLX's matrix kernels
SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class KernelSource:
    """Everything `mx.fast.metal_kernel` needs to build one kernel (hashable: the runners cache on it)."""

    name: str
    input_names: tuple
    output_names: tuple
    source: str
    header: str = ""


def values_per_lane(bits: int) -> int:
    """Weights one lane dequantizes per row and block: two uint32 words."""
    return 2 * 32 // bits


def block_size(bits: int) -> int:
    """K covered by one pass of a SIMD-group over a row."""
    return SIMD_SIZE * values_per_lane(bits)


HEADER = r"""
// mlxedge quantized GEMV helpers (MLX affine layout: w = scale * q + bias, q packed lowest bits first).
// Buffers are taken as deduced pointer types: MLX declares an input of fewer than 8 elements
// `const constant T*` and a larger one `const device T*`, and Metal does not convert between address spaces.

// Load VPT activations starting at x, pre-scaled for masked (unshifted) 4-bit nibbles; returns their sum.
template <typename T, int BITS, int VPT, typename XPtr>
inline float mlxe_load_x(XPtr x, thread float* xs) {
  float sum = 0.0f;
  if (BITS == 4) {
    for (int i = 0; i < VPT; i += 4) {
      const float a = float(x[i]);
      const float b = float(x[i + 1]);
      const float c = float(x[i + 2]);
      const float d = float(x[i + 3]);
      sum += a + b + c + d;
      xs[i] = a;
      xs[i + 1] = b * (1.0f / 16.0f);
      xs[i + 2] = c * (1.0f / 256.0f);
      xs[i + 3] = d * (1.0f / 4096.0f);
    }
  } else {
    for (int i = 0; i < VPT; i++) {
      const float a = float(x[i]);
      sum += a;
      xs[i] = a;
    }
  }
  return sum;
}

// dot[m] = sum_i xs[m][i] * q_i over the VPT packed weights in the words at w, for M activation rows (each
// weight read once). Words are read whole and split in registers (no pointer casts across types).
template <int BITS, int VPT, int M, typename WPtr>
inline void mlxe_qdot(WPtr w, const thread float* xs, thread float* dot) {
  for (int m = 0; m < M; m++) {
    dot[m] = 0.0f;
  }
  for (int j = 0; j < VPT * BITS / 32; j++) {
    const uint32_t word = w[j];
    if (BITS == 4) {
      for (int h = 0; h < 2; h++) {
        const uint32_t q = h == 0 ? (word & 0xffffu) : (word >> 16);
        const float q0 = float(q & 0x000f);
        const float q1 = float(q & 0x00f0);
        const float q2 = float(q & 0x0f00);
        const float q3 = float(q & 0xf000);
        for (int m = 0; m < M; m++) {
          const thread float* xm = xs + m * VPT + 8 * j + 4 * h;
          dot[m] += xm[0] * q0 + xm[1] * q1 + xm[2] * q2 + xm[3] * q3;
        }
      }
    } else {
      for (int b = 0; b < 4; b++) {
        const float q = float((word >> (8 * b)) & 0xffu);
        for (int m = 0; m < M; m++) {
          dot[m] += xs[m * VPT + 4 * j + b] * q;
        }
      }
    }
  }
}

// Accumulate, for R consecutive rows starting at row0, the M row-dot-products of one lane over all of K.
template <typename T, int BITS, int GS, int M, int R, bool ALIGNED, typename XPtr, typename WPtr, typename SPtr,
          typename BPtr>
inline void mlxe_qmv_rows(XPtr x, WPtr w, SPtr scales, BPtr biases, int N, int K, int row0, uint lane,
                          thread float* acc) {
  constexpr int VPT = 2 * 32 / BITS;
  constexpr int BLOCK = 32 * VPT;
  const int words = K * BITS / 32;
  const int groups = K / GS;
  float xs[M * VPT];
  float xsum[M];
  float dot[M];
  for (int i = 0; i < M * R; i++) {
    acc[i] = 0.0f;
  }
  for (int kb = 0; kb < K; kb += BLOCK) {
    const int k = kb + int(lane) * VPT;
    if (!ALIGNED && k >= K) {
      break;
    }
    for (int m = 0; m < M; m++) {
      xsum[m] = mlxe_load_x<T, BITS, VPT>(x + m * K + k, xs + m * VPT);
    }
    for (int r = 0; r < R; r++) {
      const int row = ALIGNED ? row0 + r : metal::min(row0 + r, N - 1);
      const int g = row * groups + k / GS;
      const float s = float(scales[g]);
      const float b = float(biases[g]);
      mlxe_qdot<BITS, VPT, M>(w + row * words + k * BITS / 32, xs, dot);
      for (int m = 0; m < M; m++) {
        acc[m * R + r] += s * dot[m] + b * xsum[m];
      }
    }
  }
}
"""

QMV_BODY = r"""
  // Template: T (activation/scale dtype), BITS, GS (group size), M (activation rows), ALIGNED.
  constexpr int R = 4;  // rows per SIMD-group
  const int N = w_shape[0];
  const int K = w_shape[1] * 32 / BITS;
  const uint lane = thread_index_in_simdgroup;
  const int row0 = int(threadgroup_position_in_grid.y) * (2 * R) + int(simdgroup_index_in_threadgroup) * R;
  float acc[M * R];
  mlxe_qmv_rows<T, BITS, GS, M, R, ALIGNED>(x, w, scales, biases, N, K, row0, lane, acc);
  for (int r = 0; r < R; r++) {
    for (int m = 0; m < M; m++) {
      const float total = metal::simd_sum(acc[m * R + r]);
      if (lane == 0 && (ALIGNED || row0 + r < N)) {
        y[m * N + row0 + r] = static_cast<T>(total);
      }
    }
  }
"""

GATE_UP_BODY = r"""
  // Template: T, BITS, GS, M, ALIGNED. SIMD-group 0: gate rows; SIMD-group 1: up rows of the same outputs.
  constexpr int R = 4;  // outputs per threadgroup
  const int N = wg_shape[0];
  const int K = wg_shape[1] * 32 / BITS;
  const uint lane = thread_index_in_simdgroup;
  const bool is_up = simdgroup_index_in_threadgroup == 1;
  const int row0 = int(threadgroup_position_in_grid.y) * R;
  threadgroup float up_sums[M * R];
  float acc[M * R];
  if (is_up) {
    mlxe_qmv_rows<T, BITS, GS, M, R, ALIGNED>(x, wu, su, bu, N, K, row0, lane, acc);
  } else {
    mlxe_qmv_rows<T, BITS, GS, M, R, ALIGNED>(x, wg, sg, bg, N, K, row0, lane, acc);
  }
  for (int i = 0; i < M * R; i++) {
    acc[i] = metal::simd_sum(acc[i]);
  }
  if (is_up && lane == 0) {
    for (int i = 0; i < M * R; i++) {
      up_sums[i] = acc[i];
    }
  }
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  if (!is_up && lane == 0) {
    for (int r = 0; r < R; r++) {
      if (ALIGNED || row0 + r < N) {
        for (int m = 0; m < M; m++) {
          const float g = acc[m * R + r];
          const float silu = g / (1.0f + metal::exp(-g));
          y[m * N + row0 + r] = static_cast<T>(silu * up_sums[m * R + r]);
        }
      }
    }
  }
"""

QMV = KernelSource(
    name="mlxedge_qmv",
    input_names=("x", "w", "scales", "biases"),
    output_names=("y",),
    source=QMV_BODY,
    header=HEADER,
)

GATE_UP = KernelSource(
    name="mlxedge_gate_up",
    input_names=("x", "wg", "sg", "bg", "wu", "su", "bu"),
    output_names=("y",),
    source=GATE_UP_BODY,
    header=HEADER,
)

QMV_ROWS_PER_THREADGROUP = SIMDGROUPS_PER_THREADGROUP * ROWS_PER_SIMDGROUP
GATE_UP_ROWS_PER_THREADGROUP = ROWS_PER_SIMDGROUP
THREADS_PER_THREADGROUP = SIMD_SIZE * SIMDGROUPS_PER_THREADGROUP


def launch(kernel: KernelSource, n_out: int, k: int, bits: int, group_size: int, rows: int, dtype) -> dict:
    """Template arguments, grid and threadgroup for one call (grid counts threads, as dispatchThreads does)."""
    per_tg = QMV_ROWS_PER_THREADGROUP if kernel is QMV else GATE_UP_ROWS_PER_THREADGROUP
    aligned = n_out % per_tg == 0 and k % block_size(bits) == 0
    n_tg = -(-n_out // per_tg)
    return {
        "template": [("T", dtype), ("BITS", bits), ("GS", group_size), ("M", rows), ("ALIGNED", aligned)],
        "grid": (THREADS_PER_THREADGROUP, n_tg, 1),
        "threadgroup": (THREADS_PER_THREADGROUP, 1, 1),
    }
