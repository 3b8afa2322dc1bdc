// CUDA kernels of the stable-softmax family: one additive-state kernel templated on the normaliser kind
// (StableMax, Taylor, softplus) and one two-state log-sum-exp kernel templated on the multi-label kind
// (ZLPR, decoupled softmax). One block per row (grid-stride over rows), 16-byte loads, per-thread partial
// states merged in a fixed order (no atomics). Same torch-free maths as the CPU kernels
// (fastloss/stable_softmax.h). A bad target never indexes memory: its row gets NaN, without a host sync.
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
#include "fastloss/stable_softmax.h"
#include "launch.cuh"

namespace fastloss::cuda {
namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

constexpr int kMaxWarps = kMaxRowThreads / kWarp;
template <typename scalar_t>
constexpr int kMinBlocks = sizeof(scalar_t) == 8 ? 1 : 2;

template <typename acc_t>
struct AddArgs {
  AddOpts<acc_t> o;
  acc_t scale, margin;
  int64_t ignore_index;
};

template <typename scalar_t, AddKind K>
__global__ void __launch_bounds__(kMaxRowThreads, kMinBlocks<scalar_t>)
    additive_fwd_kernel(const scalar_t* __restrict__ logits, int64_t row_stride, int64_t N, int64_t C,
                        const int64_t* __restrict__ target, AddArgs<acc_type<scalar_t>> p,
                        acc_type<scalar_t>* __restrict__ loss, acc_type<scalar_t>* __restrict__ stats) {
  using acc_t = acc_type<scalar_t>;
  using Phi = AddPhi<K>;
  constexpr int V = Pack<scalar_t>::N;
  __shared__ acc_t smem[kMaxWarps];
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const scalar_t* x = logits + row * row_stride;
    const int64_t y = target[row];
    if (y == p.ignore_index || y < 0 || y >= C) {  // block-uniform
      if (threadIdx.x == 0) {
        const acc_t v = y == p.ignore_index ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
        loss[row] = stats[2 * row] = stats[2 * row + 1] = v;
      }
      continue;
    }
    acc_t rest = 0;  // the target stays out of the rest mass
    for_each_in_row(
        x, C,
        [&](int64_t k, scalar_t v) {
          if (k != y) rest += Phi::phi(p.scale * static_cast<acc_t>(v), p.o);
        },
        [&](int64_t k0, const Pack<scalar_t>& pk) {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const acc_t ph = Phi::phi(p.scale * static_cast<acc_t>(pk.v[j]), p.o);
            rest += k0 + j == y ? acc_t(0) : ph;
          }
        });
    rest = block_merge(rest, smem, [](acc_t& a, const acc_t& b) { a += b; });
    if (threadIdx.x == 0) {
      const acc_t z_y = p.scale * static_cast<acc_t>(x[y]) - p.margin;
      const acc_t phi_y = Phi::phi(z_y, p.o);
      loss[row] = additive_loss(rest, phi_y, Phi::log_phi(z_y, p.o), C == 1);
      stats[2 * row] = rest;
      stats[2 * row + 1] = phi_y;
    }
  }
}

template <typename scalar_t, AddKind K>
__global__ void __launch_bounds__(kMaxRowThreads, kMinBlocks<scalar_t>)
    additive_bwd_kernel(const scalar_t* __restrict__ logits, int64_t row_stride, int64_t N, int64_t C,
                        const int64_t* __restrict__ target, AddArgs<acc_type<scalar_t>> p,
                        const acc_type<scalar_t>* __restrict__ stats, const acc_type<scalar_t>* __restrict__ gloss,
                        scalar_t* __restrict__ grad) {
  using acc_t = acc_type<scalar_t>;
  using Phi = AddPhi<K>;
  constexpr int V = Pack<scalar_t>::N;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const scalar_t* x = logits + row * row_stride;
    scalar_t* out = grad + row * C;
    const int64_t y = target[row];
    if (y == p.ignore_index || y < 0 || y >= C) {
      const scalar_t v =
          static_cast<scalar_t>(y == p.ignore_index ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN());
      for (int64_t k = threadIdx.x; k < C; k += blockDim.x) out[k] = v;
      continue;
    }
    const acc_t z_y = p.scale * static_cast<acc_t>(x[y]) - p.margin;
    const auto g = additive_grad_row<K>(gloss[row], stats[2 * row], stats[2 * row + 1], z_y, p.o);
    const acc_t coef = g.coef * p.scale, tgt = g.target * p.scale;
    auto other = [&](scalar_t v) {
      return static_cast<scalar_t>(coef * Phi::dphi(p.scale * static_cast<acc_t>(v), p.o));
    };
    auto dx = [&](int64_t k, scalar_t v) { return k == y ? static_cast<scalar_t>(tgt) : other(v); };
    map_row(x, out, C, dx, [&](int64_t k0, const Pack<scalar_t>& in, Pack<scalar_t>& res) {
#pragma unroll
      for (int j = 0; j < V; ++j) res.v[j] = k0 + j == y ? static_cast<scalar_t>(tgt) : other(in.v[j]);
    });
  }
}

template <typename acc_t>
struct MlState {
  LseState<acc_t> neg, pos;
  acc_t count;
};

template <typename scalar_t, MlKind K>
__global__ void __launch_bounds__(kMaxRowThreads, kMinBlocks<scalar_t>)
    multilabel_fwd_kernel(const scalar_t* __restrict__ logits, int64_t row_stride, const bool* __restrict__ mask,
                          int64_t mask_stride, int64_t N, int64_t C, MlOpts<acc_type<scalar_t>> o,
                          acc_type<scalar_t>* __restrict__ loss, acc_type<scalar_t>* __restrict__ stats) {
  using acc_t = acc_type<scalar_t>;
  constexpr int V = Pack<scalar_t>::N;
  __shared__ MlState<acc_t> smem[kMaxWarps];
  __shared__ acc_t smem2[2 * kMaxWarps];
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const scalar_t* x = logits + row * row_stride;
    const bool* m = mask + row * mask_stride;
    MlState<acc_t> ts{LseState<acc_t>::empty(), LseState<acc_t>::empty(), acc_t(0)};
    auto visit = [&](int64_t k, acc_t z) {
      if (m[k]) {
        ts.count += acc_t(1);
        if constexpr (K == MlKind::zlpr) ts.pos.push(-o.s_pos(z));
      } else {
        ts.neg.push(o.s_neg(z));
      }
    };
    for_each_in_row(
        x, C, [&](int64_t k, scalar_t v) { visit(k, static_cast<acc_t>(v)); },
        [&](int64_t k0, const Pack<scalar_t>& pk) {
#pragma unroll
          for (int j = 0; j < V; ++j) visit(k0 + j, static_cast<acc_t>(pk.v[j]));
        });
    ts = block_merge(ts, smem, [](MlState<acc_t>& a, const MlState<acc_t>& b) {
      a.neg.merge(b.neg);
      a.pos.merge(b.pos);
      a.count += b.count;
    });
    if constexpr (K == MlKind::zlpr) {
      if (threadIdx.x == 0) {
        ts.neg.merge({acc_t(0), acc_t(0)});  // the implicit zero logit, once per row
        ts.pos.merge({acc_t(0), acc_t(0)});
        loss[row] = ts.neg.lse() + ts.pos.lse();
        acc_t* st = stats + 4 * row;
        st[0] = ts.neg.m;
        st[1] = ts.neg.r;
        st[2] = ts.pos.m;
        st[3] = ts.pos.r;
      }
    } else {
      // Second pass over the positives, now that lse_N is known.
      const acc_t lse_n = ts.neg.lse();
      struct Sums {
        acc_t l, s;
      } sums{0, 0};
      if (ts.count > acc_t(0)) {
        for (int64_t k = threadIdx.x; k < C; k += blockDim.x) {
          if (!m[k]) continue;
          const acc_t d = lse_n - o.s_pos(static_cast<acc_t>(x[k]));
          sums.l += softplus(d);
          sums.s += sigmoid(d);
        }
      }
      sums = block_merge(sums, reinterpret_cast<Sums*>(smem2), [](Sums& a, const Sums& b) {
        a.l += b.l;
        a.s += b.s;
      });
      if (threadIdx.x == 0) {
        loss[row] = ts.count > acc_t(0) ? sums.l / ts.count : acc_t(0);
        acc_t* st = stats + 4 * row;
        st[0] = ts.neg.m;
        st[1] = ts.neg.r;
        st[2] = sums.s;
        st[3] = ts.count;
      }
    }
  }
}

template <typename scalar_t, MlKind K>
__global__ void __launch_bounds__(kMaxRowThreads, kMinBlocks<scalar_t>)
    multilabel_bwd_kernel(const scalar_t* __restrict__ logits, int64_t row_stride, const bool* __restrict__ mask,
                          int64_t mask_stride, int64_t N, int64_t C, MlOpts<acc_type<scalar_t>> o,
                          acc_type<scalar_t> scale, const acc_type<scalar_t>* __restrict__ stats,
                          const acc_type<scalar_t>* __restrict__ gloss, scalar_t* __restrict__ grad) {
  using acc_t = acc_type<scalar_t>;
  constexpr int V = Pack<scalar_t>::N;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const scalar_t* x = logits + row * row_stride;
    const bool* m = mask + row * mask_stride;
    scalar_t* out = grad + row * C;
    const auto g = MlGradRow<acc_t>::template make<K>(stats + 4 * row, gloss[row], scale);
    auto dx = [&](int64_t k, scalar_t v) {
      const acc_t z = static_cast<acc_t>(v);
      if (m[k]) return static_cast<scalar_t>(g.template pos<K>(o.s_pos(z)));
      // A zero coefficient (positive-free DEXML row) must not meet exp(s_n) = inf.
      return static_cast<scalar_t>(g.neg_coef == acc_t(0) ? acc_t(0) : g.neg_coef * fl_exp(o.s_neg(z) - g.m_neg));
    };
    map_row(x, out, C, dx, [&](int64_t k0, const Pack<scalar_t>& in, Pack<scalar_t>& res) {
#pragma unroll
      for (int j = 0; j < V; ++j) res.v[j] = dx(k0 + j, in.v[j]);
    });
  }
}

// ------------------------------------------------------------------------------------------------ glue

template <typename F>
void dispatch_add_kind(int64_t kind, F&& f) {
  switch (kind) {
    case 0: return f(std::integral_constant<AddKind, AddKind::stablemax>{});
    case 1: return f(std::integral_constant<AddKind, AddKind::taylor>{});
    case 2: return f(std::integral_constant<AddKind, AddKind::softplus>{});
    default: TORCH_CHECK(false, "fastloss: kind must be 0, 1 or 2, got ", kind);
  }
}

template <typename F>
void dispatch_ml_kind(int64_t kind, F&& f) {
  switch (kind) {
    case 0: return f(std::integral_constant<MlKind, MlKind::zlpr>{});
    case 1: return f(std::integral_constant<MlKind, MlKind::dexml>{});
    default: TORCH_CHECK(false, "fastloss: kind must be 0 (zlpr) or 1 (dexml), got ", kind);
  }
}

int64_t stride_of(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

void check_order(int64_t kind, int64_t order, const char* op) {
  TORCH_CHECK(kind != 1 || (order >= 2 && order <= 10 && order % 2 == 0), op,
              ": Taylor order must be even in [2, 10], got ", order);
}

template <typename acc_t>
AddArgs<acc_t> add_args(int64_t order, double scale, double margin, int64_t ignore_index) {
  return {AddOpts<acc_t>::make(static_cast<int>(order)), acc_t(scale), acc_t(margin), ignore_index};
}

std::tuple<at::Tensor, at::Tensor> additive_row_fwd(const at::Tensor& logits, const at::Tensor& target,
                                                    int64_t kind, int64_t order, double scale, double margin,
                                                    int64_t ignore_index) {
  constexpr const char* op = "fastloss.additive_row_fwd";
  check_row_inputs(logits, target, op);
  check_order(kind, order, op);
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), C = logits.size(1);
  auto t = target.contiguous();
  auto opts = logits.options().dtype(acc_type_of(logits));
  at::Tensor loss = at::empty({N}, opts), stats = at::empty({N, 2}, opts);
  if (N == 0) return {loss, stats};
  const Launch L = row_launch(logits);
  dispatch_float(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    dispatch_add_kind(kind, [&](auto k) {
      additive_fwd_kernel<scalar_t, decltype(k)::value><<<L.grid, L.block, 0, L.stream>>>(
          static_cast<const scalar_t*>(logits.data_ptr()), stride_of(logits), N, C, t.data_ptr<int64_t>(),
          add_args<acc_t>(order, scale, margin, ignore_index), loss.data_ptr<acc_t>(), stats.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {loss, stats};
}

at::Tensor additive_row_bwd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                            const at::Tensor& stats, int64_t kind, int64_t order, double scale, double margin,
                            int64_t ignore_index) {
  constexpr const char* op = "fastloss.additive_row_bwd";
  c10::cuda::CUDAGuard guard(logits.device());
  auto in = prepare_row_backward(grad_loss, 1, logits, target, stats, 2, op);
  check_order(kind, order, op);
  const int64_t N = logits.size(0), C = logits.size(1);
  if (N == 0) return in.grad_logits;
  const Launch L = row_launch(logits);
  dispatch_float(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    dispatch_add_kind(kind, [&](auto k) {
      additive_bwd_kernel<scalar_t, decltype(k)::value><<<L.grid, L.block, 0, L.stream>>>(
          static_cast<const scalar_t*>(logits.data_ptr()), stride_of(logits), N, C, in.target.data_ptr<int64_t>(),
          add_args<acc_t>(order, scale, margin, ignore_index), in.stats.data_ptr<acc_t>(),
          in.grad_rows.data_ptr<acc_t>(), static_cast<scalar_t*>(in.grad_logits.data_ptr()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return in.grad_logits;
}

void check_mask(const at::Tensor& logits, const at::Tensor& mask, const char* op) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) >= 1, op, ": logits must be 2-D (N, C) with C >= 1");
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) == 1 || logits.numel() == 0, op,
              ": logits need a contiguous class dimension");
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == logits.size(0) && mask.size(1) == logits.size(1), op,
              ": mask must have the shape of logits ", logits.sizes(), ", got ", mask.sizes());
  TORCH_CHECK(mask.stride(1) == 1 || mask.size(1) == 1 || mask.numel() == 0, op,
              ": mask needs a contiguous class dimension");
  TORCH_CHECK(mask.device() == logits.device(), op, ": mask is on another device than logits");
}

std::tuple<at::Tensor, at::Tensor> multilabel_row_fwd(const at::Tensor& logits, const at::Tensor& mask,
                                                      int64_t kind, double scale, double margin) {
  check_mask(logits, mask, "fastloss.multilabel_row_fwd");
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), C = logits.size(1);
  auto opts = logits.options().dtype(acc_type_of(logits));
  at::Tensor loss = at::empty({N}, opts), stats = at::empty({N, 4}, opts);
  if (N == 0) return {loss, stats};
  const Launch L = row_launch(logits);
  dispatch_float(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    dispatch_ml_kind(kind, [&](auto k) {
      multilabel_fwd_kernel<scalar_t, decltype(k)::value><<<L.grid, L.block, 0, L.stream>>>(
          static_cast<const scalar_t*>(logits.data_ptr()), stride_of(logits), mask.data_ptr<bool>(),
          stride_of(mask), N, C, MlOpts<acc_t>{acc_t(scale), acc_t(margin)}, loss.data_ptr<acc_t>(),
          stats.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {loss, stats};
}

at::Tensor multilabel_row_bwd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& mask,
                              const at::Tensor& stats, int64_t kind, double scale, double margin) {
  constexpr const char* op = "fastloss.multilabel_row_bwd";
  check_mask(logits, mask, op);
  check_stats(grad_loss, logits, 1, op, "grad_loss");
  check_stats(stats, logits, 4, op, "stats");
  c10::cuda::CUDAGuard guard(logits.device());
  const auto acc = acc_type_of(logits);
  auto g = grad_loss.to(acc).contiguous();
  auto s = stats.to(acc).contiguous();
  const int64_t N = logits.size(0), C = logits.size(1);
  at::Tensor grad = at::empty({N, C}, logits.options());
  if (N == 0) return grad;
  const Launch L = row_launch(logits);
  dispatch_float(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    dispatch_ml_kind(kind, [&](auto k) {
      multilabel_bwd_kernel<scalar_t, decltype(k)::value><<<L.grid, L.block, 0, L.stream>>>(
          static_cast<const scalar_t*>(logits.data_ptr()), stride_of(logits), mask.data_ptr<bool>(),
          stride_of(mask), N, C, MlOpts<acc_t>{acc_t(scale), acc_t(margin)}, acc_t(scale), s.data_ptr<acc_t>(),
          g.data_ptr<acc_t>(), static_cast<scalar_t*>(grad.data_ptr()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad;
}

}  // namespace
}  // namespace fastloss::cuda

TORCH_LIBRARY_IMPL(fastloss, CUDA, m) {
  m.impl("additive_row_fwd", &fastloss::cuda::additive_row_fwd);
  m.impl("additive_row_bwd", &fastloss::cuda::additive_row_bwd);
  m.impl("multilabel_row_fwd", &fastloss::cuda::multilabel_row_fwd);
  m.impl("multilabel_row_bwd", &fastloss::cuda::multilabel_row_bwd);
}
