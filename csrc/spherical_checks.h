// Checks and argument packing of spherical_row_terms, shared by its CPU and CUDA glue.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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
          at::empty({N, 2 + K}, mu.options())};
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

}  // namespace fastloss
