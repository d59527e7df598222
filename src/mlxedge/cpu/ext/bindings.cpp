// mlxedge native CPU kernels as MLX operations: one Primitive (eval_cpu only) per kernel kind,
// scheduled on the CPU stream through MLX's CPU command encoder, and the nanobind module `_ext`.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>
#include <sstream>
#include <stdexcept>
#include <string>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"
#include "mlx/primitives.h"

#include "../kernels/core.h"
#include "dense.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

namespace {

enum class Kind { QMM, GATE_UP, MATMUL };

using mlxedge_ext::code_of;
using mlxedge_ext::dense;

class CpuKernel : public mx::UnaryPrimitive {
 public:
  CpuKernel(mx::Stream s, Kind kind, int bits, int group_size)
      : mx::UnaryPrimitive(s), kind_(kind), bits_(bits), gs_(group_size) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : inputs) enc.set_input_array(a);
    enc.set_output_array(out);
    const auto& x = inputs[0];
    const int64_t K = x.shape(-1);
    const int64_t M = K ? int64_t(x.size()) / K : 0;
    const int64_t N = out.shape(-1);
    // the task keeps its inputs alive until it has run
    enc.dispatch([inputs, out = mx::array::unsafe_weak_copy(out), kind = kind_, bits = bits_,
                  gs = gs_, M, N, K]() mutable {
      const int xdt = code_of(inputs[0].dtype()), odt = code_of(out.dtype());
      if (M == 0 || N == 0) return;
      // dense views of every input (strided ones are gathered here, not by graph nodes)
      std::vector<std::vector<char>> bufs(inputs.size());
      std::vector<const void*> p(inputs.size());
      for (size_t i = 0; i < inputs.size(); i++) p[i] = dense(inputs[i], bufs[i]);
      auto u32 = [&](size_t i) { return static_cast<const uint32_t*>(p[i]); };
      switch (kind) {
        case Kind::QMM:
          mlxe_qmm(p[0], xdt, u32(1), p[2], p[3], code_of(inputs[2].dtype()), out.data<void>(), odt, M,
                   N, K, bits, gs);
          break;
        case Kind::GATE_UP:
          mlxe_gate_up_silu(p[0], xdt, u32(1), p[2], p[3], u32(4), p[5], p[6], code_of(inputs[2].dtype()),
                            out.data<void>(), odt, M, N, K, bits, gs);
          break;
        case Kind::MATMUL:
          mlxe_matmul(p[0], xdt, p[1], code_of(inputs[1].dtype()), out.data<void>(), odt, M, N, K);
          break;
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error(
        "mlxedge native CPU kernels have no GPU implementation; schedule them on mx.cpu");
  }

  const char* name() const override {
    switch (kind_) {
      case Kind::QMM: return "MlxedgeCpuQuantizedMatmul";
      case Kind::GATE_UP: return "MlxedgeCpuGateUpSilu";
      default: return "MlxedgeCpuMatmul";
    }
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const CpuKernel&>(other);
    return kind_ == o.kind_ && bits_ == o.bits_ && gs_ == o.gs_;
  }

 private:
  Kind kind_;
  int bits_, gs_;
};

// Several quantized matmuls of one x (a layer's q, k and v projections), one output each: inputs are
// x then a (w, scales, biases) triplet per output, all quantized alike.
class CpuQuantizedMatmuls : public mx::Primitive {
 public:
  CpuQuantizedMatmuls(mx::Stream s, int bits, int group_size) : mx::Primitive(s), bits_(bits), gs_(group_size) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : inputs) enc.set_input_array(a);
    std::vector<mx::array> outs;
    for (auto& o : outputs) {
      o.set_data(mx::allocator::malloc(o.nbytes()));
      enc.set_output_array(o);
      outs.push_back(mx::array::unsafe_weak_copy(o));
    }
    enc.dispatch([inputs, outs, bits = bits_, gs = gs_]() mutable {
      const auto& x = inputs[0];
      const int64_t K = x.shape(-1), M = K ? int64_t(x.size()) / K : 0;
      if (M == 0) return;
      std::vector<std::vector<char>> bufs(inputs.size());
      std::vector<const void*> p(inputs.size());
      for (size_t i = 0; i < inputs.size(); i++) p[i] = dense(inputs[i], bufs[i]);
      const size_t n = outs.size();
      std::vector<const uint32_t*> w(n);
      std::vector<const void*> sc(n), bi(n);
      std::vector<void*> y(n);
      std::vector<int64_t> N(n);
      for (size_t i = 0; i < n; i++) {
        w[i] = static_cast<const uint32_t*>(p[1 + 3 * i]);
        sc[i] = p[2 + 3 * i];
        bi[i] = p[3 + 3 * i];
        y[i] = outs[i].data<void>();
        N[i] = outs[i].shape(-1);
      }
      mlxe_qmm_many(p[0], code_of(x.dtype()), int(n), w.data(), sc.data(), bi.data(), code_of(inputs[2].dtype()),
                    y.data(), code_of(outs[0].dtype()), M, N.data(), K, bits, gs);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error(
        "mlxedge native CPU kernels have no GPU implementation; schedule them on mx.cpu");
  }

  const char* name() const override { return "MlxedgeCpuQuantizedMatmuls"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const CpuQuantizedMatmuls&>(other);
    return bits_ == o.bits_ && gs_ == o.gs_;
  }

 private:
  int bits_, gs_;
};

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument(what); }

void check_float(const mx::array& a, const char* name) {
  if (code_of(a.dtype()) < 0) {
    std::ostringstream os;
    os << name << " must be float32, float16 or bfloat16, got " << a.dtype();
    bad(os.str());
  }
}

mx::Stream cpu_stream() { return mx::default_stream(mx::Device(mx::Device::cpu)); }

// shape [..., K] x and quantized triplet for an [N, K] weight
int64_t check_quantized(const mx::array& x, const mx::array& w, const mx::array& s,
                        const mx::array& b, int group_size, int bits, const char* what) {
  if (bits != 4 && bits != 8) bad("native CPU kernels support bits 4 and 8, got " + std::to_string(bits));
  if (group_size != 32 && group_size != 64 && group_size != 128)
    bad("native CPU kernels support group_size 32, 64 and 128, got " + std::to_string(group_size));
  check_float(x, "x");
  check_float(s, "scales");
  if (b.dtype() != s.dtype()) bad(std::string(what) + ": biases must have the scales' dtype");
  if (w.dtype() != mx::uint32) bad(std::string(what) + ": packed weights must be uint32");
  if (x.ndim() < 1 || w.ndim() != 2 || s.ndim() != 2 || b.ndim() != 2)
    bad(std::string(what) + ": expected x [..., K], w [N, K*bits/32], scales/biases [N, K/group_size]");
  const int64_t K = x.shape(-1), N = w.shape(0);
  if (K % group_size != 0 || w.shape(1) * 32 != K * bits || s.shape(0) != N ||
      b.shape(0) != N || s.shape(1) * group_size != K || b.shape(1) != s.shape(1)) {
    std::ostringstream os;
    os << what << ": shapes do not match (x " << x.shape() << ", w " << w.shape() << ", scales "
       << s.shape() << ", biases " << b.shape() << ", group_size " << group_size << ", bits "
       << bits << ")";
    bad(os.str());
  }
  return N;
}

mx::Shape out_shape(const mx::array& x, int64_t N) {
  mx::Shape sh = x.shape();
  sh.back() = int(N);
  return sh;
}

mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& s,
                           const mx::array& b, int group_size, int bits) {
  const int64_t N = check_quantized(x, w, s, b, group_size, bits, "quantized_matmul");
  auto st = cpu_stream();
  auto dt = mx::promote_types(x.dtype(), s.dtype());
  return mx::array(out_shape(x, N), dt, std::make_shared<CpuKernel>(st, Kind::QMM, bits, group_size),
                   {x, w, s, b});
}

mx::array gate_up_silu(const mx::array& x, const nb::tuple& gate, const nb::tuple& up,
                       int group_size, int bits) {
  if (nb::len(gate) != 3 || nb::len(up) != 3) bad("gate_up_silu: gate and up must be (w, scales, biases)");
  auto wg = nb::cast<mx::array>(gate[0]), sg = nb::cast<mx::array>(gate[1]), bg = nb::cast<mx::array>(gate[2]);
  auto wu = nb::cast<mx::array>(up[0]), su = nb::cast<mx::array>(up[1]), bu = nb::cast<mx::array>(up[2]);
  const int64_t N = check_quantized(x, wg, sg, bg, group_size, bits, "gate_up_silu (gate)");
  const int64_t Nu = check_quantized(x, wu, su, bu, group_size, bits, "gate_up_silu (up)");
  if (N != Nu || su.dtype() != sg.dtype()) bad("gate_up_silu: gate and up must have the same shape and dtype");
  auto st = cpu_stream();
  auto dt = mx::promote_types(x.dtype(), sg.dtype());
  return mx::array(out_shape(x, N), dt, std::make_shared<CpuKernel>(st, Kind::GATE_UP, bits, group_size),
                   {x, wg, sg, bg, wu, su, bu});
}

nb::list quantized_matmuls(const mx::array& x, const nb::list& weights, int group_size, int bits) {
  const size_t n = nb::len(weights);
  if (n == 0) bad("quantized_matmuls: give at least one (w, scales, biases) triplet");
  std::vector<mx::array> inputs{x};
  std::vector<mx::Shape> shapes;
  for (auto item : weights) {
    auto t = nb::cast<nb::tuple>(item);
    if (nb::len(t) != 3) bad("quantized_matmuls: weights must be (w, scales, biases) triplets");
    auto w = nb::cast<mx::array>(t[0]), s = nb::cast<mx::array>(t[1]), b = nb::cast<mx::array>(t[2]);
    const int64_t N = check_quantized(x, w, s, b, group_size, bits, "quantized_matmuls");
    if (inputs.size() > 1 && s.dtype() != inputs[2].dtype())
      bad("quantized_matmuls: every weight's scales must have the same dtype");
    inputs.insert(inputs.end(), {w, s, b});
    shapes.push_back(out_shape(x, N));
  }
  auto dt = mx::promote_types(x.dtype(), inputs[2].dtype());
  auto outs = mx::array::make_arrays(shapes, std::vector<mx::Dtype>(n, dt),
                                     std::make_shared<CpuQuantizedMatmuls>(cpu_stream(), bits, group_size), inputs);
  nb::list result;
  for (auto& o : outs) result.append(nb::cast(o));
  return result;
}

mx::array matmul(const mx::array& x, const mx::array& w) {
  check_float(x, "x");
  check_float(w, "w");
  if (x.ndim() < 1 || w.ndim() != 2 || w.shape(1) != x.shape(-1)) {
    std::ostringstream os;
    os << "matmul: expected x [..., K] and w [N, K], got x " << x.shape() << " and w " << w.shape();
    bad(os.str());
  }
  auto st = cpu_stream();
  auto dt = mx::promote_types(x.dtype(), w.dtype());
  return mx::array(out_shape(x, w.shape(0)), dt, std::make_shared<CpuKernel>(st, Kind::MATMUL, 0, 0), {x, w});
}

// Seconds per call of the quantized matmul kernel alone (no graph, no MLX scheduling): `calls` calls,
// timed on the calling thread. Each run of `parts` consecutive triplets is one set (parts = 1: one weight,
// as mlxe_qmm runs it; 3: a layer's q, k, v) and call i runs mlxe_qmm_many on set i % sets. For scripts/bench_cpu_kernels.py, which sets this beside the same calls
// through MLX to show what the per-op overhead costs.
double kernel_seconds(const mx::array& x, const nb::list& weights, int group_size, int bits, int calls, int parts) {
  if (nb::len(weights) == 0 || calls < 1 || parts < 1 || nb::len(weights) % size_t(parts) != 0)
    bad("kernel_seconds: give at least one weight triplet per part, a whole number of sets, and one call");
  struct Triplet {
    mx::array w, s, b;
    int64_t N;
  };
  std::vector<Triplet> ws;
  for (auto item : weights) {
    auto t = nb::cast<nb::tuple>(item);
    if (nb::len(t) != 3) bad("kernel_seconds: weights must be (w, scales, biases) triplets");
    Triplet q{nb::cast<mx::array>(t[0]), nb::cast<mx::array>(t[1]), nb::cast<mx::array>(t[2]), 0};
    q.N = check_quantized(x, q.w, q.s, q.b, group_size, bits, "kernel_seconds");
    ws.push_back(q);
  }
  mx::array xe = x;
  mx::eval(xe);
  for (auto& q : ws) mx::eval(q.w, q.s, q.b);
  for (auto& q : ws)
    if (!q.w.flags().row_contiguous || !q.s.flags().row_contiguous || !q.b.flags().row_contiguous)
      bad("kernel_seconds: weights must be row-contiguous");
  if (!xe.flags().row_contiguous) bad("kernel_seconds: x must be row-contiguous");
  const int64_t K = xe.shape(-1), M = int64_t(xe.size()) / K;
  const int xdt = code_of(xe.dtype()), sdt = code_of(ws[0].s.dtype());
  const size_t sets = ws.size() / size_t(parts);
  // per set: the pointers and output buffers mlxe_qmm_many takes
  std::vector<std::vector<const uint32_t*>> wp(sets);
  std::vector<std::vector<const void*>> sp(sets), bp(sets);
  std::vector<std::vector<int64_t>> np(sets);
  std::vector<std::vector<float>> ybufs;
  std::vector<void*> yp;
  for (int j = 0; j < parts; j++) {
    ybufs.emplace_back(size_t(M * ws[size_t(j)].N));
    yp.push_back(ybufs.back().data());
  }
  for (size_t c = 0; c < sets; c++)
    for (int j = 0; j < parts; j++) {
      const auto& q = ws[c * size_t(parts) + size_t(j)];
      if (q.N != ws[size_t(j)].N) bad("kernel_seconds: every set must have the same shapes");
      wp[c].push_back(q.w.data<uint32_t>());
      sp[c].push_back(q.s.data<void>());
      bp[c].push_back(q.b.data<void>());
      np[c].push_back(q.N);
    }
  nb::gil_scoped_release unlocked;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < calls; i++) {
    const size_t c = size_t(i) % sets;
    mlxe_qmm_many(xe.data<void>(), xdt, parts, wp[c].data(), sp[c].data(), bp[c].data(), sdt, yp.data(), MLXE_F32, M,
                  np[c].data(), K, bits, group_size);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / calls;
}

}  // namespace

void register_ops(nb::module_& m);  // ops_bindings.cpp: rms_norm, rope, sdpa
void register_read_reference(nb::module_& m);  // read_reference.cpp: the bench's read references

NB_MODULE(_ext, m) {
  m.doc() = "mlxedge native CPU kernels (MLX extension)";
  m.def("quantized_matmul", &quantized_matmul, "x"_a, "w"_a, "scales"_a, "biases"_a, nb::kw_only(),
        "group_size"_a, "bits"_a);
  m.def("gate_up_silu", &gate_up_silu, "x"_a, "gate"_a, "up"_a, nb::kw_only(), "group_size"_a, "bits"_a);
  m.def("quantized_matmuls", &quantized_matmuls, "x"_a, "weights"_a, nb::kw_only(), "group_size"_a, "bits"_a);
  m.def("matmul", &matmul, "x"_a, "w"_a);
  m.def("init", &mlxe_init, "isa"_a, "threads"_a);
  m.def("isa", &mlxe_isa);
  m.def("threads", &mlxe_threads);
  m.def("set_blas", [](const std::string& path) { return mlxe_set_blas(path.c_str()) != 0; });
  m.def("use_blas", [](bool on) { return mlxe_use_blas(on) != 0; });
  m.def("has_blas", [] { return mlxe_has_blas() != 0; });
  m.def("set_gemv_max_rows", &mlxe_set_gemv_max_rows);
  m.def("set_gemv_parallel_min_bytes", &mlxe_set_gemv_parallel_min_bytes, "bytes"_a);
  m.def("plant", [] { return std::string(mlxe_plant()); });
  m.def("kernel_seconds", &kernel_seconds, "x"_a, "weights"_a, nb::kw_only(), "group_size"_a, "bits"_a, "calls"_a,
        "parts"_a = 1);
  register_ops(m);
  register_read_reference(m);
}
