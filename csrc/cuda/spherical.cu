// CUDA kernel of spherical_row_terms (the Gram form's per-row finalisation): one thread per row, the maths of
// fastloss/spherical.h shared with the CPU kernel. Targets are range-checked by the caller (they index nothing
// here: target outputs arrive precomputed).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../spherical_checks.h"

namespace fastloss::cuda {
namespace {

template <typename T>
__global__ void spherical_terms_kernel(SphericalTermsArgs<T> args, int64_t N) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n < N) spherical_terms_row(args, n);
}

std::tuple<at::Tensor, at::Tensor> spherical_row_terms(const at::Tensor& mu, const at::Tensor& m2,
                                                       const at::Tensor& oc, const at::Tensor& dev,
                                                       const at::Tensor& target,
                                                       const std::optional<at::Tensor>& target_weight, int64_t kind,
                                                       double a, double b, double eps, int64_t num_classes,
                                                       int64_t ignore_index) {
  c10::cuda::CUDAGuard guard(mu.device());
  auto in = prepare_spherical_terms(mu, m2, oc, dev, target, target_weight, kind, num_classes, ignore_index);
  const int64_t N = in.N;
  if (N == 0) return {in.loss, in.coef};
  constexpr int kThreads = 128;
  const auto blocks = static_cast<unsigned>((N + kThreads - 1) / kThreads);
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "spherical_row_terms", [&] {
    auto args = spherical_terms_args<scalar_t>(in, kind, a, b, eps, num_classes, ignore_index);
    spherical_terms_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {in.loss, in.coef};
}

}  // namespace
}  // namespace fastloss::cuda

TORCH_LIBRARY_IMPL(fastloss, CUDA, m) { m.impl("spherical_row_terms", &fastloss::cuda::spherical_row_terms); }
