// CUDA kernels of sparsemax / entmax-1.5 and their Fenchel-Young losses: one block per row (grid-stride over
// rows). The threshold search is solve_threshold from fastloss/sparsemax.h, the same loop as on the CPU; each
// of its passes here is a block-wide walk over the row (16-byte loads, the row stays in L2 between passes)
// merged in a fixed order, so every thread sees the same sums and takes the same branch. No sort, no host
// sync. Rows that would need more than kMaxIter passes (none seen in tests; the CPU then sorts its
// candidates) keep the last Newton lower bound. Bad targets never index memory: their row becomes NaN.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "../row_checks.h"
#include "common.cuh"
#include "fastloss/sparsemax.h"
#include "launch.cuh"

namespace fastloss::cuda {
namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

constexpr int kMaxWarps = kMaxRowThreads / kWarp;
constexpr int kMaxIter = 100;

// Forward of both the activation (kLoss = false: writes p) and the loss (kLoss = true: writes the row loss and
// the stats (m, t)). One kernel for both maps: kEntmax selects the maths in Threshold<kEntmax>.
template <bool kEntmax, bool kLoss, typename scalar_t>
__global__ void __launch_bounds__(kMaxRowThreads)
    threshold_fwd_kernel(const scalar_t* __restrict__ logits, int64_t row_stride, int64_t N, int64_t C,
                         const int64_t* __restrict__ target, int64_t ignore_index, scalar_t* __restrict__ probs,
                         acc_type<scalar_t>* __restrict__ loss, acc_type<scalar_t>* __restrict__ stats) {
  using acc_t = acc_type<scalar_t>;
  using Th = Threshold<kEntmax>;
  constexpr int V = Pack<scalar_t>::N;
  __shared__ SupportSums<acc_t> smem[kMaxWarps];
  __shared__ acc_t smax[kMaxWarps];
  const acc_t scale = acc_t(Th::kScale), nan = std::numeric_limits<acc_t>::quiet_NaN();
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const scalar_t* x = logits + row * row_stride;
    int64_t y = -1;
    if constexpr (kLoss) {
      y = target[row];
      if (y != ignore_index && (y < 0 || y >= C)) {
        if (threadIdx.x == 0) loss[row] = stats[2 * row] = stats[2 * row + 1] = nan;
        continue;
      }
      if (y == ignore_index) {  // no loss, no gradient: skip the search
        if (threadIdx.x == 0) {
          loss[row] = acc_t(0);
          stats[2 * row] = neg_inf<acc_t>();
          stats[2 * row + 1] = acc_t(0);
        }
        continue;
      }
    }
    acc_t m = neg_inf<acc_t>();
    for_each_in_row(
        x, C, [&](int64_t, scalar_t v) { m = nan_max(m, static_cast<acc_t>(v)); },
        [&](int64_t, const Pack<scalar_t>& p) {
#pragma unroll
          for (int j = 0; j < V; ++j) m = nan_max(m, static_cast<acc_t>(p.v[j]));
        });
    m = block_merge(m, smax, [](acc_t& a, const acc_t& b) { a = nan_max(a, b); });
    const bool finite = m > neg_inf<acc_t>() && m < -neg_inf<acc_t>();  // false for NaN too
    acc_t t = m == neg_inf<acc_t>() ? acc_t(0) : nan;
    SupportSums<acc_t> sums = SupportSums<acc_t>::empty();
    if (finite) {
      auto reduce_at = [&](acc_t tt, acc_t cc) {
        SupportSums<acc_t> s = SupportSums<acc_t>::empty();
        for_each_in_row(
            x, C, [&](int64_t, scalar_t v) { s.push(scale * (static_cast<acc_t>(v) - m), tt, cc); },
            [&](int64_t, const Pack<scalar_t>& p) {
#pragma unroll
              for (int j = 0; j < V; ++j) s.push(scale * (static_cast<acc_t>(p.v[j]) - m), tt, cc);
            });
        return block_merge(s, smem, [](SupportSums<acc_t>& a, const SupportSums<acc_t>& b) { a.merge(b); });
      };
      bool converged;
      t = solve_threshold<kEntmax, acc_t>(reduce_at, kMaxIter, converged);
      if constexpr (kLoss) sums = reduce_at(t, t);  // moments of v = u - t: what the loss needs
    }
    if constexpr (kLoss) {
      if (threadIdx.x == 0) {
        stats[2 * row] = m;
        stats[2 * row + 1] = t;
        if (m == neg_inf<acc_t>()) loss[row] = std::numeric_limits<acc_t>::infinity();  // the target is masked
        else loss[row] = Th::loss(sums, t, scale * (static_cast<acc_t>(x[y]) - m));
      }
    } else {
      const auto r = ThresholdRow<kEntmax, acc_t>::make(m, t);
      auto p_of = [&](int64_t, scalar_t v) { return static_cast<scalar_t>(r.prob(static_cast<acc_t>(v))); };
      map_row(x, probs + row * C, C, p_of, [&](int64_t, const Pack<scalar_t>& in, Pack<scalar_t>& out) {
#pragma unroll
        for (int j = 0; j < V; ++j) out.v[j] = static_cast<scalar_t>(r.prob(static_cast<acc_t>(in.v[j])));
      });
    }
  }
}

// dL/dz = g (p - e_y), p recomputed from the logits and the saved (m, t).
template <bool kEntmax, typename scalar_t>
__global__ void __launch_bounds__(kMaxRowThreads)
    loss_bwd_kernel(const scalar_t* __restrict__ logits, int64_t row_stride, int64_t N, int64_t C,
                    const int64_t* __restrict__ target, int64_t ignore_index,
                    const acc_type<scalar_t>* __restrict__ stats, const acc_type<scalar_t>* __restrict__ gloss,
                    scalar_t* __restrict__ grad) {
  using acc_t = acc_type<scalar_t>;
  constexpr int V = Pack<scalar_t>::N;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const scalar_t* x = logits + row * row_stride;
    scalar_t* out = grad + row * C;
    const int64_t y = target[row];
    if (y != ignore_index && (y < 0 || y >= C)) {
      const scalar_t nan = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
      for (int64_t k = threadIdx.x; k < C; k += blockDim.x) out[k] = nan;
      continue;
    }
    const auto r = ThresholdRow<kEntmax, acc_t>::make(stats[2 * row], stats[2 * row + 1]);
    // Ignored rows and all-masked rows (constant +inf loss) get gradient 0.
    const acc_t g = (y == ignore_index || r.empty) ? acc_t(0) : gloss[row];
    const int64_t y_eff = (y == ignore_index || r.empty) ? -1 : y;
    // The target term in acc_t before rounding: p_y - 1 must not cancel in low precision.
    auto dz = [&](int64_t k, scalar_t v) {
      const acc_t p = r.prob(static_cast<acc_t>(v));
      return static_cast<scalar_t>(g * (k == y_eff ? p - acc_t(1) : p));
    };
    map_row(x, out, C, dz, [&](int64_t k0, const Pack<scalar_t>& in, Pack<scalar_t>& res) {
#pragma unroll
      for (int j = 0; j < V; ++j) res.v[j] = dz(k0 + j, in.v[j]);
    });
  }
}

// Activation backward: dz = w g - (<w, g> / sum w) w, w = p^(2 - alpha), from the saved output p.
template <bool kEntmax, typename scalar_t>
__global__ void __launch_bounds__(kMaxRowThreads)
    act_bwd_kernel(const scalar_t* __restrict__ probs, const scalar_t* __restrict__ gout, int64_t N, int64_t C,
                   scalar_t* __restrict__ grad) {
  using acc_t = acc_type<scalar_t>;
  struct WG {
    acc_t swg, sw;
  };
  __shared__ WG smem[kMaxWarps];
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const scalar_t* p = probs + row * C;
    const scalar_t* g = gout + row * C;
    WG s{acc_t(0), acc_t(0)};
    for (int64_t k = threadIdx.x; k < C; k += blockDim.x) {
      const acc_t w = Threshold<kEntmax>::weight(static_cast<acc_t>(p[k]));
      s.swg += w * static_cast<acc_t>(g[k]);
      s.sw += w;
    }
    s = block_merge(s, smem, [](WG& a, const WG& b) {
      a.swg += b.swg;
      a.sw += b.sw;
    });
    const acc_t q = s.sw > acc_t(0) ? s.swg / s.sw : acc_t(0);  // an all-masked row (p = 0) has gradient 0
    for (int64_t k = threadIdx.x; k < C; k += blockDim.x) {
      const acc_t w = Threshold<kEntmax>::weight(static_cast<acc_t>(p[k]));
      grad[row * C + k] = static_cast<scalar_t>(w * (static_cast<acc_t>(g[k]) - q));
    }
  }
}

// ------------------------------------------------------------------------------------------------ glue

// f(kind, scalar_t{}) with kind = std::true_type for entmax-1.5.
template <typename F>
void dispatch(at::ScalarType st, bool entmax15, F&& f) {
  dispatch_float(st, [&](auto tag) {
    if (entmax15) f(std::true_type{}, tag);
    else f(std::false_type{}, tag);
  });
}

void check_act_input(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be 2-D (N, C), got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) >= 1, op, ": ", name, " need at least one class");
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) == 1 || x.numel() == 0, op,
              ": ", name, " need a contiguous class dimension");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", st);
}

std::tuple<at::Tensor, at::Tensor> sparsemax_loss_fwd(const at::Tensor& logits, const at::Tensor& target,
                                                      int64_t ignore_index, bool entmax15) {
  check_row_inputs(logits, target, "fastloss.sparsemax_loss_fwd");
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), C = logits.size(1);
  auto t = target.contiguous();
  auto opts = logits.options().dtype(acc_type_of(logits));
  at::Tensor loss = at::empty({N}, opts), stats = at::empty({N, 2}, opts);
  if (N == 0) return {loss, stats};
  const Launch L = row_launch(logits);
  dispatch(logits.scalar_type(), entmax15, [&](auto kind, auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    threshold_fwd_kernel<decltype(kind)::value, true, scalar_t><<<L.grid, L.block, 0, L.stream>>>(
        static_cast<const scalar_t*>(logits.data_ptr()), row_stride_of(logits), N, C, t.data_ptr<int64_t>(),
        ignore_index, nullptr, loss.data_ptr<acc_t>(), stats.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats};
}

at::Tensor sparsemax_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                              const at::Tensor& stats, int64_t ignore_index, bool entmax15) {
  c10::cuda::CUDAGuard guard(logits.device());
  auto in = prepare_row_backward(grad_loss, 1, logits, target, stats, 2, "fastloss.sparsemax_loss_bwd");
  const int64_t N = logits.size(0), C = logits.size(1);
  if (N == 0) return in.grad_logits;
  const Launch L = row_launch(logits);
  dispatch(logits.scalar_type(), entmax15, [&](auto kind, auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    loss_bwd_kernel<decltype(kind)::value, scalar_t><<<L.grid, L.block, 0, L.stream>>>(
        static_cast<const scalar_t*>(logits.data_ptr()), row_stride_of(logits), N, C, in.target.data_ptr<int64_t>(),
        ignore_index, in.stats.data_ptr<acc_t>(), in.grad_rows.data_ptr<acc_t>(),
        static_cast<scalar_t*>(in.grad_logits.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return in.grad_logits;
}

at::Tensor sparsemax_fwd(const at::Tensor& logits, bool entmax15) {
  check_act_input(logits, "fastloss.sparsemax_fwd", "logits");
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), C = logits.size(1);
  at::Tensor out = at::empty({N, C}, logits.options());
  if (N == 0) return out;
  const Launch L = row_launch(logits);
  dispatch(logits.scalar_type(), entmax15, [&](auto kind, auto tag) {
    using scalar_t = decltype(tag);
    threshold_fwd_kernel<decltype(kind)::value, false, scalar_t><<<L.grid, L.block, 0, L.stream>>>(
        static_cast<const scalar_t*>(logits.data_ptr()), row_stride_of(logits), N, C, nullptr, 0,
        static_cast<scalar_t*>(out.data_ptr()), nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor sparsemax_bwd(const at::Tensor& grad, const at::Tensor& probs, bool entmax15) {
  constexpr const char* op = "fastloss.sparsemax_bwd";
  check_act_input(probs, op, "probs");
  TORCH_CHECK(grad.sizes() == probs.sizes(), op, ": grad has shape ", grad.sizes(), ", probs ", probs.sizes());
  TORCH_CHECK(grad.device() == probs.device(), op, ": grad and probs are on different devices");
  c10::cuda::CUDAGuard guard(probs.device());
  const auto p = probs.contiguous();
  const auto g = grad.to(probs.scalar_type()).contiguous();
  const int64_t N = p.size(0), C = p.size(1);
  at::Tensor out = at::empty({N, C}, p.options());
  if (N == 0) return out;
  const Launch L = row_launch(p);
  dispatch(p.scalar_type(), entmax15, [&](auto kind, auto tag) {
    using scalar_t = decltype(tag);
    act_bwd_kernel<decltype(kind)::value, scalar_t><<<L.grid, L.block, 0, L.stream>>>(
        static_cast<const scalar_t*>(p.data_ptr()), static_cast<const scalar_t*>(g.data_ptr()), N, C,
        static_cast<scalar_t*>(out.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace fastloss::cuda

TORCH_LIBRARY_IMPL(fastloss, CUDA, m) {
  m.impl("sparsemax_fwd", &fastloss::cuda::sparsemax_fwd);
  m.impl("sparsemax_bwd", &fastloss::cuda::sparsemax_bwd);
  m.impl("sparsemax_loss_fwd", &fastloss::cuda::sparsemax_loss_fwd);
  m.impl("sparsemax_loss_bwd", &fastloss::cuda::sparsemax_loss_bwd);
}
