// Checks and argument packing of the spherical Gram-form ops (spherical_row_terms, spherical_gather_dot,
// spherical_row_stats, spherical_grad_hidden), shared by their CPU and CUDA glue. The Python side validates
// the user's arguments first; these keep direct calls of the ops safe.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <optional>

#include "spherical_terms.h"

namespace fastloss {

struct SphericalTermsInputs {
  int64_t N, K;
  at::Tensor mu, m2, oc, dev, target, weight, loss, coef;  // contiguous; weight undefined when absent
};

inline SphericalTermsInputs prepare_spherical_terms(const at::Tensor& mu, const at::Tensor& m2,
                                                    const at::Tensor& oc, const at::Tensor& dev,
                                                    const at::Tensor& target,
                                                    const std::optional<at::Tensor>& target_weight, int64_t kind,
                                                    int64_t num_classes, int64_t ignore_index) {
  constexpr const char* op = "fastloss.spherical_row_terms";
  TORCH_CHECK(kind >= 0 && kind <= 3, op, ": unknown spherical loss kind ", kind);
  TORCH_CHECK(num_classes >= 1, op, ": num_classes must be >= 1, got ", num_classes);
  TORCH_CHECK(mu.dim() == 1, op, ": mu must be 1-D (N,), got ", mu.sizes());
  const int64_t N = mu.size(0);
  TORCH_CHECK(target.dim() == 2 && target.size(0) == N, op, ": target must be (", N, ", K), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64");
  const auto st = mu.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, ": mu must be float32 or float64, got ", st);
  TORCH_CHECK(m2.sizes() == mu.sizes() && m2.scalar_type() == st, op, ": m2 must match mu");
  TORCH_CHECK(oc.sizes() == target.sizes() && oc.scalar_type() == st, op, ": target_out must be (N, K) like mu");
  TORCH_CHECK(dev.sizes() == target.sizes() && dev.scalar_type() == st, op, ": target_dev must be (N, K) like mu");
  for (const at::Tensor* t : {&m2, &oc, &dev, &target})
    TORCH_CHECK(t->device() == mu.device(), op, ": all inputs must be on ", mu.device());
  at::Tensor w;
  if (target_weight.has_value() && target_weight->defined()) {
    TORCH_CHECK(target_weight->sizes() == target.sizes(), op, ": target_weight must have the shape of target");
    TORCH_CHECK(target_weight->device() == mu.device(), op, ": target_weight must be on ", mu.device());
    w = target_weight->to(st).contiguous();
  }
  const int64_t K = target.size(1);
  return {N,
          K,
          mu.contiguous(),
          m2.contiguous(),
          oc.contiguous(),
          dev.contiguous(),
          target.contiguous(),
          w,
          at::empty({N}, mu.options()),
          at::empty({N, 3 + K}, mu.options())};
}

template <typename T>
SphericalTermsArgs<T> spherical_terms_args(SphericalTermsInputs& in, int64_t kind, double a, double b, double eps,
                                           int64_t num_classes, int64_t ignore_index) {
  return {in.mu.data_ptr<T>(),
          in.m2.data_ptr<T>(),
          in.oc.data_ptr<T>(),
          in.dev.data_ptr<T>(),
          in.target.data_ptr<int64_t>(),
          in.weight.defined() ? in.weight.data_ptr<T>() : nullptr,
          in.K,
          ignore_index,
          SphericalLoss<T>{static_cast<int>(kind), T(a), T(b), T(eps), T(num_classes)},
          in.loss.data_ptr<T>(),
          in.coef.data_ptr<T>()};
}

// ------------------------------------------------------------------------------------------ row kernels

inline at::ScalarType gram_acc_type(const at::Tensor& hidden) {
  return hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_gram_hidden(const at::Tensor& hidden, const char* op) {
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must be (N, d), got ", hidden.sizes());
  const auto st = hidden.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": hidden must be a floating tensor, got ", st);
}

inline at::Tensor gram_acc_input(const at::Tensor& t, const at::Tensor& hidden, at::IntArrayRef shape,
                                 const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == gram_acc_type(hidden), op, ": ", name, " must be ", gram_acc_type(hidden));
  TORCH_CHECK(t.device() == hidden.device(), op, ": ", name, " must be on ", hidden.device());
  return t.contiguous();
}

// Target rows of a weight shard: class c is local when offset <= c < offset + V_s.
struct GramTargets {
  at::Tensor target;  // (N, K) int64, contiguous
  int64_t K, offset;
};

inline GramTargets check_gram_targets(const at::Tensor& target, const at::Tensor& hidden, const at::Tensor& weight,
                                      int64_t offset, const char* op) {
  TORCH_CHECK(target.dim() == 2 && target.size(0) == hidden.size(0), op, ": target must be (", hidden.size(0),
              ", K), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong && target.device() == hidden.device(), op,
              ": target must be int64 on ", hidden.device());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1), op, ": weight must be (V, ", hidden.size(1),
              "), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type() && weight.device() == hidden.device(), op,
              ": weight must have the dtype and device of hidden");
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0");
  return {target.contiguous(), target.size(1), offset};
}

// The same for spherical_grad_hidden, whose hq is in the accumulation type of the weight.
inline GramTargets check_gram_grad_targets(const at::Tensor& target, const at::Tensor& hq, const at::Tensor& weight,
                                           int64_t offset, const char* op) {
  TORCH_CHECK(target.dim() == 2 && target.size(0) == hq.size(0), op, ": target must be (", hq.size(0),
              ", K), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong && target.device() == hq.device(), op, ": target must be int64 on ",
              hq.device());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hq.size(1), op, ": weight must be (V, ", hq.size(1), "), got ",
              weight.sizes());
  TORCH_CHECK(weight.device() == hq.device(), op, ": weight must be on ", hq.device());
  TORCH_CHECK(hq.scalar_type() == gram_acc_type(weight), op, ": hq must be ", gram_acc_type(weight));
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0");
  return {target.contiguous(), target.size(1), offset};
}

// Contiguous inputs and the (uninitialised) output of one Gram-form row op, after its checks. Unused fields
// stay undefined; sizes: N rows, width d, V_s weight rows in this shard, K targets per row.
struct GramRowInputs {
  int64_t N = 0, d = 0, Vs = 0, K = 0;
  at::Tensor hidden, weight, target, bias, center, hq, ab, gamma, stat, out;
};

inline GramRowInputs prepare_gather_dot(const at::Tensor& hidden, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                        const at::Tensor& center, int64_t offset) {
  constexpr const char* op = "fastloss.spherical_gather_dot";
  check_gram_hidden(hidden, op);
  GramRowInputs in;
  const auto tg = check_gram_targets(target, hidden, weight, offset, op);
  in.N = hidden.size(0), in.d = hidden.size(1), in.Vs = weight.size(0), in.K = tg.K;
  in.center = gram_acc_input(center, hidden, {in.d + 1}, op, "center");
  if (bias.has_value() && bias->defined())
    in.bias = gram_acc_input(bias->to(gram_acc_type(hidden)), hidden, {in.Vs}, op, "bias");
  in.hidden = hidden.contiguous(), in.weight = weight.contiguous(), in.target = tg.target;
  in.out = at::empty({in.N, in.K, 2}, hidden.options().dtype(gram_acc_type(hidden)));
  return in;
}

inline GramRowInputs prepare_row_stats(const at::Tensor& hidden, const at::Tensor& hq, const at::Tensor& stat) {
  constexpr const char* op = "fastloss.spherical_row_stats";
  check_gram_hidden(hidden, op);
  GramRowInputs in;
  in.N = hidden.size(0), in.d = hidden.size(1);
  in.hq = gram_acc_input(hq, hidden, {in.N, in.d}, op, "hq");
  in.stat = gram_acc_input(stat, hidden, {2 * in.d + 2}, op, "stat");
  in.hidden = hidden.contiguous();
  in.out = at::empty({in.N, 2}, in.hq.options());
  return in;
}

struct SplitInputs {
  at::Tensor x, shift, scale, hi, lo;
  int64_t R, d;
};

inline SplitInputs prepare_split_bf16(const at::Tensor& x, const std::optional<at::Tensor>& col_shift,
                                      const std::optional<at::Tensor>& row_scale) {
  constexpr const char* op = "fastloss.spherical_split_bf16";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D, got ", x.dim(), "-D");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", st);
  SplitInputs in;
  in.R = x.size(0), in.d = x.size(1);
  in.x = x.contiguous();
  auto vec = [&](const std::optional<at::Tensor>& t, int64_t n, const char* name) {
    if (!t.has_value() || !t->defined()) return at::Tensor();
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n, op, ": ", name, " must have shape (", n, ",)");
    TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32");
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but x is on ", x.device());
    return t->contiguous();
  };
  in.shift = vec(col_shift, in.d, "col_shift");
  in.scale = vec(row_scale, in.R, "row_scale");
  in.hi = at::empty({in.R, in.d}, x.options().dtype(at::kBFloat16));
  in.lo = at::empty({in.R, in.d}, x.options().dtype(at::kBFloat16));
  return in;
}

struct WeightGradInputs {
  at::Tensor gw, row, bias, v, out;
  int64_t R, d;
};

inline WeightGradInputs prepare_weight_grad(const at::Tensor& gw, const at::Tensor& row,
                                            const std::optional<at::Tensor>& bias, const at::Tensor& v,
                                            at::ScalarType dtype) {
  constexpr const char* op = "fastloss.spherical_weight_grad";
  TORCH_CHECK(gw.dim() == 2, op, ": gw must be 2-D, got ", gw.dim(), "-D");
  const auto acc = gw.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, op, ": gw must be float32 or float64, got ", acc);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": dtype must be a floating dtype, got ", dtype);
  WeightGradInputs in;
  in.R = gw.size(0), in.d = gw.size(1);
  auto vec = [&](const at::Tensor& t, int64_t n, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape (", n, ",)");
    TORCH_CHECK(t.device() == gw.device(), op, ": ", name, " is on ", t.device(), " but gw is on ", gw.device());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point");
    return t.to(acc).contiguous();
  };
  in.gw = gw.contiguous();
  in.row = vec(row, in.d, "row");
  in.v = vec(v, in.d, "v");
  if (bias.has_value() && bias->defined()) in.bias = vec(*bias, in.R, "bias");
  in.out = at::empty({in.R, in.d}, gw.options().dtype(dtype));
  return in;
}

inline GramRowInputs prepare_grad_hidden(const at::Tensor& hq, const at::Tensor& ab, const at::Tensor& gamma,
                                         const at::Tensor& weight, const at::Tensor& target, const at::Tensor& stat,
                                         int64_t offset) {
  constexpr const char* op = "fastloss.spherical_grad_hidden";
  TORCH_CHECK(hq.dim() == 2, op, ": hq must be (N, d)");
  GramRowInputs in;
  const auto tg = check_gram_grad_targets(target, hq, weight, offset, op);
  in.N = hq.size(0), in.d = hq.size(1), in.Vs = weight.size(0), in.K = tg.K;
  in.hq = hq.contiguous(), in.weight = weight.contiguous(), in.target = tg.target;
  in.ab = gram_acc_input(ab, hq, {in.N, 2}, op, "ab");
  in.gamma = gram_acc_input(gamma, hq, {in.N, in.K}, op, "gamma");
  in.stat = gram_acc_input(stat, hq, {2 * in.d + 2}, op, "stat");
  in.out = at::empty({in.N, in.d}, in.hq.options());
  return in;
}

}  // namespace fastloss
