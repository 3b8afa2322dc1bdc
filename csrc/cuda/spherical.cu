// CUDA kernels of the spherical Gram form's row ops (see csrc/cpu/spherical.cpp for the CPU twins and
// fastloss/spherical.h for the maths): one thread per row for spherical_row_terms, one warp per row (or per
// target) for the length-d dot products and axpys, lanes striding over d and a fixed shuffle tree (bitwise
// reproducible, no atomics). Target ids outside this shard contribute 0 and never index memory.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../spherical_checks.h"
#include "fastloss/bf16_split.h"
#include "common.cuh"

namespace fastloss::cuda {
namespace {

constexpr int kRowThreads = 128;
constexpr int kWarpsPerBlock = 8;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

unsigned warp_blocks(int64_t items) {
  return grid_1d((items + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

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
  const auto blocks = grid_1d((N + kRowThreads - 1) / kRowThreads);
  AT_DISPATCH_FLOATING_TYPES(mu.scalar_type(), "spherical_row_terms", [&] {
    auto args = spherical_terms_args<scalar_t>(in, kind, a, b, eps, num_classes, ignore_index);
    spherical_terms_kernel<scalar_t><<<blocks, kRowThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {in.loss, in.coef};
}

// One warp per (row, target).
template <typename scalar_t, typename acc_t>
__global__ void gather_dot_kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ w,
                                  const acc_t* __restrict__ bias, const int64_t* __restrict__ target,
                                  const acc_t* __restrict__ center, int64_t NK, int64_t K, int64_t d, int64_t Vs,
                                  int64_t offset, int64_t ignore_index, acc_t* __restrict__ out) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (item >= NK) return;
  const int64_t n = item / K, cls = target[item], r = cls - offset;
  const bool local = cls != ignore_index && r >= 0 && r < Vs;
  double dev = 0.0, raw = 0.0;
  if (local) {
    const scalar_t *wr = w + r * d, *hr = h + n * d;
    for (int64_t i = lane; i < d; i += kWarp)
      gram_target_terms(static_cast<double>(wr[i]), static_cast<double>(center[i]), static_cast<double>(hr[i]),
                        dev, raw);
  }
  dev = warp_sum(dev), raw = warp_sum(raw);
  if (lane == 0) {
    const double b = local && bias ? static_cast<double>(bias[r]) : 0.0;
    out[2 * item] = local ? static_cast<acc_t>(dev + b - (bias ? static_cast<double>(center[d]) : 0.0)) : acc_t(0);
    out[2 * item + 1] = local ? static_cast<acc_t>(raw + b) : acc_t(0);
  }
}

at::Tensor spherical_gather_dot(const at::Tensor& hidden, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                const at::Tensor& center, int64_t offset, int64_t ignore_index) {
  c10::cuda::CUDAGuard guard(hidden.device());
  auto in = prepare_gather_dot(hidden, weight, bias, target, center, offset);
  if (in.N * in.K == 0) return in.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "spherical_gather_dot", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gather_dot_kernel<scalar_t, acc_t><<<warp_blocks(in.N * in.K), kWarpsPerBlock * kWarp, 0,
                                         c10::cuda::getCurrentCUDAStream()>>>(
        in.hidden.data_ptr<scalar_t>(), in.weight.data_ptr<scalar_t>(),
        in.bias.defined() ? in.bias.data_ptr<acc_t>() : nullptr, in.target.data_ptr<int64_t>(),
        in.center.data_ptr<acc_t>(), in.N * in.K, in.K, in.d, in.Vs, offset, ignore_index, in.out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return in.out;
}

// One warp per row.
template <typename scalar_t, typename acc_t>
__global__ void row_stats_kernel(const scalar_t* __restrict__ h, const acc_t* __restrict__ hq,
                                 const acc_t* __restrict__ stat, int64_t N, int64_t d, acc_t* __restrict__ out) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (n >= N) return;
  double mu = 0.0;
  acc_t m2 = acc_t(0);
  for (int64_t i = lane; i < d; i += kWarp)
    gram_stats_terms<acc_t>(static_cast<acc_t>(h[n * d + i]), hq[n * d + i], stat[i], stat[d + 1 + i], mu, m2);
  mu = warp_sum(mu);
  m2 = warp_sum(m2);
  if (lane == 0) {
    out[2 * n] = static_cast<acc_t>(mu + static_cast<double>(stat[d]));
    out[2 * n + 1] = m2 + stat[2 * d + 1];
  }
}

at::Tensor spherical_row_stats(const at::Tensor& hidden, const at::Tensor& hq, const at::Tensor& stat) {
  c10::cuda::CUDAGuard guard(hidden.device());
  auto in = prepare_row_stats(hidden, hq, stat);
  if (in.N == 0) return in.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "spherical_row_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    row_stats_kernel<scalar_t, acc_t><<<warp_blocks(in.N), kWarpsPerBlock * kWarp, 0,
                                        c10::cuda::getCurrentCUDAStream()>>>(
        in.hidden.data_ptr<scalar_t>(), in.hq.data_ptr<acc_t>(), in.stat.data_ptr<acc_t>(), in.N, in.d,
        in.out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return in.out;
}

// Blocks stride over rows, threads over a row's columns (coalesced); memory-bound: 2-4 bytes in, 4 out.
template <typename scalar_t>
__global__ void split_bf16_kernel(const scalar_t* __restrict__ x, const float* __restrict__ shift,
                                  const float* __restrict__ scale, int64_t R, int64_t d, uint16_t* __restrict__ hi,
                                  uint16_t* __restrict__ lo) {
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const float s = scale ? scale[r] : 1.0f;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      const int64_t k = r * d + j;
      // __fmul_rn: never contracted with split_bf16's v - hi into one FMA (that would change lo's bits vs torch)
      split_bf16(__fmul_rn(static_cast<float>(x[k]) - (shift ? shift[j] : 0.0f), s), hi[k], lo[k]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> spherical_split_bf16(const at::Tensor& x,
                                                       const std::optional<at::Tensor>& col_shift,
                                                       const std::optional<at::Tensor>& row_scale) {
  c10::cuda::CUDAGuard guard(x.device());
  auto in = prepare_split_bf16(x, col_shift, row_scale);
  if (in.R == 0 || in.d == 0) return {in.hi, in.lo};
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(in.R, int64_t(1) << 16));
  const int threads = in.d >= 256 ? 256 : (in.d >= 64 ? 64 : 32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "spherical_split_bf16", [&] {
    split_bf16_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        in.x.data_ptr<scalar_t>(), in.shift.defined() ? in.shift.data_ptr<float>() : nullptr,
        in.scale.defined() ? in.scale.data_ptr<float>() : nullptr, in.R, in.d,
        reinterpret_cast<uint16_t*>(in.hi.data_ptr<at::BFloat16>()),
        reinterpret_cast<uint16_t*>(in.lo.data_ptr<at::BFloat16>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {in.hi, in.lo};
}

// Blocks stride over weight rows, threads over a row's columns (coalesced); memory-bound: 4 bytes in, 2-4 out.
template <typename out_t, typename acc_t>
__global__ void weight_grad_kernel(const acc_t* __restrict__ gw, const acc_t* __restrict__ row,
                                   const acc_t* __restrict__ bias, const acc_t* __restrict__ v, int64_t R, int64_t d,
                                   out_t* __restrict__ out) {
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    const acc_t two_b = bias ? acc_t(2) * bias[r] : acc_t(0);
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x)
      out[r * d + j] = static_cast<out_t>(gram_weight_grad_term(gw[r * d + j], row[j], two_b, v[j]));
  }
}

at::Tensor spherical_weight_grad(const at::Tensor& gw, const at::Tensor& row, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& v, at::ScalarType dtype) {
  c10::cuda::CUDAGuard guard(gw.device());
  auto in = prepare_weight_grad(gw, row, bias, v, dtype);
  if (in.R == 0 || in.d == 0) return in.out;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(in.R, int64_t(1) << 16));
  const int threads = in.d >= 256 ? 256 : (in.d >= 64 ? 64 : 32);
  AT_DISPATCH_FLOATING_TYPES(in.gw.scalar_type(), "spherical_weight_grad", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "spherical_weight_grad_out", [&] {
      weight_grad_kernel<scalar_t, acc_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          in.gw.data_ptr<acc_t>(), in.row.data_ptr<acc_t>(), in.bias.defined() ? in.bias.data_ptr<acc_t>() : nullptr,
          in.v.data_ptr<acc_t>(), in.R, in.d, in.out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return in.out;
}

// One warp per row: each lane owns the elements i = lane + 32 k, first the dense part, then the targets'
// weight rows in target order (a fixed order: reproducible).
template <typename scalar_t, typename acc_t>
__global__ void grad_hidden_kernel(const acc_t* __restrict__ hq, const acc_t* __restrict__ ab,
                                   const acc_t* __restrict__ gamma, const scalar_t* __restrict__ w,
                                   const int64_t* __restrict__ target, const acc_t* __restrict__ stat, int64_t N,
                                   int64_t K, int64_t d, int64_t Vs, int64_t offset, int64_t ignore_index,
                                   bool with_dense, acc_t* __restrict__ out) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (n >= N) return;
  acc_t* orow = out + n * d;
  const acc_t A = ab[2 * n], B = ab[2 * n + 1];
  for (int64_t i = lane; i < d; i += kWarp)
    orow[i] = with_dense ? gram_grad_dense<acc_t>(A, B, hq[n * d + i], stat[d + 1 + i], stat[i]) : acc_t(0);
  for (int64_t j = 0; j < K; ++j) {
    const int64_t cls = target[n * K + j], r = cls - offset;
    const acc_t g = gamma[n * K + j];
    if (cls == ignore_index || r < 0 || r >= Vs || g == acc_t(0)) continue;
    const scalar_t* wr = w + r * d;
    for (int64_t i = lane; i < d; i += kWarp) orow[i] += gram_grad_target(g, static_cast<acc_t>(wr[i]), stat[i]);
  }
}

at::Tensor spherical_grad_hidden(const at::Tensor& hq, const at::Tensor& ab, const at::Tensor& gamma,
                                 const at::Tensor& weight, const at::Tensor& target, const at::Tensor& stat,
                                 int64_t offset, int64_t ignore_index, bool with_dense) {
  c10::cuda::CUDAGuard guard(hq.device());
  auto in = prepare_grad_hidden(hq, ab, gamma, weight, target, stat, offset);
  if (in.N == 0) return in.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "spherical_grad_hidden", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    grad_hidden_kernel<scalar_t, acc_t><<<warp_blocks(in.N), kWarpsPerBlock * kWarp, 0,
                                          c10::cuda::getCurrentCUDAStream()>>>(
        in.hq.data_ptr<acc_t>(), in.ab.data_ptr<acc_t>(), in.gamma.data_ptr<acc_t>(), in.weight.data_ptr<scalar_t>(),
        in.target.data_ptr<int64_t>(), in.stat.data_ptr<acc_t>(), in.N, in.K, in.d, in.Vs, offset, ignore_index,
        with_dense, in.out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return in.out;
}

}  // namespace
}  // namespace fastloss::cuda

TORCH_LIBRARY_IMPL(fastloss, CUDA, m) {
  m.impl("spherical_row_terms", &fastloss::cuda::spherical_row_terms);
  m.impl("spherical_gather_dot", &fastloss::cuda::spherical_gather_dot);
  m.impl("spherical_row_stats", &fastloss::cuda::spherical_row_stats);
  m.impl("spherical_grad_hidden", &fastloss::cuda::spherical_grad_hidden);
  m.impl("spherical_split_bf16", &fastloss::cuda::spherical_split_bf16);
  m.impl("spherical_weight_grad", &fastloss::cuda::spherical_weight_grad);
}
