// CPU kernel of spherical_row_terms (the Gram form's per-row finalisation); the products around it run in
// python/fastloss/linear_spherical.py through at::matmul.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../spherical_checks.h"

namespace fastloss::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> spherical_row_terms(const at::Tensor& mu, const at::Tensor& m2,
                                                       const at::Tensor& oc, const at::Tensor& dev,
                                                       const at::Tensor& target,
                                                       const std::optional<at::Tensor>& target_weight, int64_t kind,
                                                       double a, double b, double eps, int64_t num_classes,
                                                       int64_t ignore_index) {
  auto in = prepare_spherical_terms(mu, m2, oc, dev, target, target_weight, kind, num_classes, ignore_index);
  const int64_t N = in.N;
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "spherical_row_terms", [&] {
    auto args = spherical_terms_args<scalar_t>(in, kind, a, b, eps, num_classes, ignore_index);
    at::parallel_for(0, N, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) spherical_terms_row(args, n);
    });
  });
  return {in.loss, in.coef};
}

}  // namespace
}  // namespace fastloss::cpu

TORCH_LIBRARY_IMPL(fastloss, CPU, m) { m.impl("spherical_row_terms", &fastloss::cpu::spherical_row_terms); }
