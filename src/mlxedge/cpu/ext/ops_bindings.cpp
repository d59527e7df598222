// RMS norm, rotary embedding and attention (kernels/ops.h) as MLX operations on the CPU stream.
//
// Inputs need not be dense: strided views (a transposed projection, a slice of a preallocated KV
// cache) are read in place where the kernel takes strides (attention's K and V) and gathered into a
// dense copy inside the task otherwise — no Contiguous primitive is added to the graph.
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

#include "../kernels/ops.h"
#include "../kernels/dtype.h"
#include "dense.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

namespace {

enum class OpKind { RMS_NORM, ROPE, SDPA, FILTER };

struct OpParams {
  float eps = 0.f;                       // rms_norm
  int dims = 0, traditional = 0;         // rope
  float base = 0.f, scale = 0.f;         // rope (scale), sdpa (scale)
  int64_t offset = 0;                    // rope
  bool has_freqs = false, has_weight = false;
  int causal = 0;                        // sdpa
  float temperature = 1.f, top_p = 1.f, min_p = 0.f;  // filter_logits
  int64_t top_k = 0;
  bool operator==(const OpParams& o) const {
    return eps == o.eps && dims == o.dims && traditional == o.traditional && base == o.base &&
           scale == o.scale && offset == o.offset && has_freqs == o.has_freqs &&
           has_weight == o.has_weight && causal == o.causal && temperature == o.temperature &&
           top_p == o.top_p && min_p == o.min_p && top_k == o.top_k;
  }
};

class CpuOp : public mx::UnaryPrimitive {
 public:
  CpuOp(mx::Stream s, OpKind kind, OpParams p) : mx::UnaryPrimitive(s), kind_(kind), p_(p) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : inputs) enc.set_input_array(a);
    enc.set_output_array(out);
    enc.dispatch([inputs, out = mx::array::unsafe_weak_copy(out), kind = kind_, p = p_]() mutable {
      run(kind, p, inputs, out);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("mlxedge native CPU ops have no GPU implementation; schedule them on mx.cpu");
  }

  const char* name() const override {
    switch (kind_) {
      case OpKind::RMS_NORM: return "MlxedgeCpuRMSNorm";
      case OpKind::ROPE: return "MlxedgeCpuRoPE";
      case OpKind::FILTER: return "MlxedgeCpuFilterLogits";
      default: return "MlxedgeCpuSDPA";
    }
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const CpuOp&>(other);
    return kind_ == o.kind_ && p_ == o.p_;
  }

 private:
  static void run(OpKind kind, const OpParams& p, const std::vector<mx::array>& in, mx::array& out) {
    const int odt = mlxedge_ext::code_of(out.dtype());
    switch (kind) {
      case OpKind::RMS_NORM: {
        std::vector<char> xb, wb;
        const void* x = mlxedge_ext::dense(in[0], xb);
        const void* w = p.has_weight ? mlxedge_ext::dense(in[1], wb) : nullptr;
        const int64_t D = in[0].shape(-1);
        const int64_t M = D ? int64_t(in[0].size()) / D : 0;
        mlxe_rms_norm(x, mlxedge_ext::code_of(in[0].dtype()), w,
                      p.has_weight ? mlxedge_ext::code_of(in[1].dtype()) : MLXE_F32, out.data<void>(), odt, M,
                      D, p.eps);
        break;
      }
      case OpKind::ROPE: {
        std::vector<char> xb;
        const void* x = mlxedge_ext::dense(in[0], xb);
        const int64_t D = in[0].shape(-1), L = in[0].shape(-2);
        const int64_t R = (D && L) ? int64_t(in[0].size()) / (D * L) : 0;
        std::vector<float> inv;
        if (p.has_freqs) {
          std::vector<char> fb;
          const void* f = mlxedge_ext::dense(in[1], fb);
          const int fdt = mlxedge_ext::code_of(in[1].dtype());
          inv.resize(size_t(p.dims / 2));
          for (int i = 0; i < p.dims / 2; i++) {
            float period = fdt == MLXE_F32 ? static_cast<const float*>(f)[i]
                                           : mlxe::load_as_f32(f, fdt, i);
            inv[size_t(i)] = 1.0f / period;
          }
        }
        mlxe_rope(x, mlxedge_ext::code_of(in[0].dtype()), out.data<void>(), R, L, D, p.dims, p.traditional,
                  p.base, p.scale, p.offset, p.has_freqs ? inv.data() : nullptr);
        break;
      }
      case OpKind::FILTER: {
        std::vector<char> xb;
        const void* x = mlxedge_ext::dense(in[0], xb);
        const int64_t V = in[0].shape(-1);
        mlxe_filter_logits(static_cast<const float*>(x), out.data<float>(), V ? int64_t(in[0].size()) / V : 0, V,
                           p.temperature, p.top_k, p.top_p, p.min_p);
        break;
      }
      case OpKind::SDPA: {
        std::vector<char> qb, kb, vb;
        const void* q = mlxedge_ext::dense(in[0], qb);
        int64_t ks[3], vs[3];
        const void* k = mlxedge_ext::rows_view(in[1], kb, ks);
        const void* v = mlxedge_ext::rows_view(in[2], vb, vs);
        mlxe_sdpa(q, k, v, mlxedge_ext::code_of(in[0].dtype()), out.data<void>(), in[0].shape(0), in[0].shape(1),
                  in[1].shape(1), in[0].shape(2), in[1].shape(2), in[0].shape(3), ks, vs, p.scale, p.causal);
        break;
      }
    }
  }

  OpKind kind_;
  OpParams p_;
};

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument(what); }

mx::Stream cpu_stream() { return mx::default_stream(mx::Device(mx::Device::cpu)); }

void check_float(const mx::array& a, const char* name) {
  if (mlxedge_ext::code_of(a.dtype()) < 0) {
    std::ostringstream os;
    os << name << " must be float32, float16 or bfloat16, got " << a.dtype();
    bad(os.str());
  }
}

mx::array rms_norm(const mx::array& x, const std::optional<mx::array>& w, float eps) {
  check_float(x, "x");
  if (x.ndim() < 1) bad("rms_norm: x must have at least one dimension");
  OpParams p;
  p.eps = eps;
  p.has_weight = w.has_value();
  std::vector<mx::array> inputs{x};
  auto dt = x.dtype();
  if (w) {
    check_float(*w, "weight");
    if (w->ndim() != 1 || w->shape(0) != x.shape(-1)) bad("rms_norm: weight must be [D] with D = x.shape[-1]");
    inputs.push_back(*w);
    dt = mx::promote_types(dt, w->dtype());
  }
  return mx::array(x.shape(), dt, std::make_shared<CpuOp>(cpu_stream(), OpKind::RMS_NORM, p), inputs);
}

mx::array rope(const mx::array& x, int dims, bool traditional, float base, float scale, int64_t offset,
               const std::optional<mx::array>& freqs) {
  check_float(x, "x");
  if (x.ndim() < 2) bad("rope: x must be [..., L, D]");
  if (dims <= 0 || dims % 2 != 0 || dims > x.shape(-1)) bad("rope: dims must be even and at most x.shape[-1]");
  OpParams p;
  p.dims = dims;
  p.traditional = traditional ? 1 : 0;
  p.base = base;
  p.scale = scale;
  p.offset = offset;
  p.has_freqs = freqs.has_value();
  std::vector<mx::array> inputs{x};
  if (freqs) {
    check_float(*freqs, "freqs");
    if (freqs->ndim() != 1 || freqs->shape(0) != dims / 2) bad("rope: freqs must be [dims / 2]");
    inputs.push_back(*freqs);
  }
  return mx::array(x.shape(), x.dtype(), std::make_shared<CpuOp>(cpu_stream(), OpKind::ROPE, p), inputs);
}

mx::array sdpa(const mx::array& q, const mx::array& k, const mx::array& v, float scale, bool causal) {
  check_float(q, "q");
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4) bad("sdpa: q, k, v must be [B, H, L, D]");
  if (k.dtype() != q.dtype() || v.dtype() != q.dtype()) bad("sdpa: q, k and v must share one dtype");
  if (k.shape(0) != q.shape(0) || v.shape(0) != q.shape(0) || k.shape(3) != q.shape(3) ||
      v.shape(3) != q.shape(3) || v.shape(1) != k.shape(1) || v.shape(2) != k.shape(2) ||
      k.shape(1) == 0 || q.shape(1) % k.shape(1) != 0) {
    std::ostringstream os;
    os << "sdpa: shapes do not match (q " << q.shape() << ", k " << k.shape() << ", v " << v.shape() << ")";
    bad(os.str());
  }
  OpParams p;
  p.scale = scale;
  p.causal = causal ? 1 : 0;
  return mx::array(q.shape(), q.dtype(), std::make_shared<CpuOp>(cpu_stream(), OpKind::SDPA, p), {q, k, v});
}

mx::array filter_logits(const mx::array& x, float temperature, int64_t top_k, float top_p, float min_p) {
  if (x.dtype() != mx::float32 || x.ndim() != 2) bad("filter_logits: x must be float32 [batch, vocab]");
  if (!(temperature > 0.f) || top_k < 0 || !(top_p > 0.f && top_p <= 1.f) || !(min_p >= 0.f && min_p < 1.f))
    bad("filter_logits: temperature > 0, top_k >= 0, top_p in (0, 1], min_p in [0, 1)");
  OpParams p;
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  p.min_p = min_p;
  return mx::array(x.shape(), mx::float32, std::make_shared<CpuOp>(cpu_stream(), OpKind::FILTER, p), {x});
}

}  // namespace

void register_ops(nb::module_& m) {
  m.def("filter_logits", &filter_logits, "x"_a, nb::kw_only(), "temperature"_a, "top_k"_a, "top_p"_a, "min_p"_a);
  m.def("rms_norm", &rms_norm, "x"_a, "weight"_a.none(), "eps"_a);
  m.def("rope", &rope, "x"_a, "dims"_a, nb::kw_only(), "traditional"_a, "base"_a, "scale"_a, "offset"_a,
        "freqs"_a = nb::none());
  m.def("sdpa", &sdpa, "q"_a, "k"_a, "v"_a, nb::kw_only(), "scale"_a, "causal"_a);
}
