// CPU kernels of the spherical Gram form's row ops (python/fastloss/linear_spherical.py): the per-row
// finalisation (spherical_row_terms), the centred target outputs (spherical_gather_dot), the row statistics
// (spherical_row_stats) and the hidden gradient (spherical_grad_hidden). The d x d and V x d products around
// them run through at::matmul. Maths in fastloss/spherical.h, shared with csrc/cuda/spherical.cu.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../spherical_checks.h"
#include "fastloss/bf16_split.h"

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

int64_t grain_rows(int64_t d) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)); }

at::Tensor spherical_gather_dot(const at::Tensor& hidden, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                const at::Tensor& center, int64_t offset, int64_t ignore_index) {
  auto in = prepare_gather_dot(hidden, weight, bias, target, center, offset);
  const int64_t d = in.d, Vs = in.Vs, K = in.K;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "spherical_gather_dot", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *hp = in.hidden.data_ptr<scalar_t>(), *wp = in.weight.data_ptr<scalar_t>();
    const acc_t* cp = in.center.data_ptr<acc_t>();
    const acc_t* bp = in.bias.defined() ? in.bias.data_ptr<acc_t>() : nullptr;
    const int64_t* tp = in.target.data_ptr<int64_t>();
    acc_t* out = in.out.data_ptr<acc_t>();
    at::parallel_for(0, in.N, grain_rows(d * K), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t j = 0; j < K; ++j) {
          const int64_t cls = tp[n * K + j], r = cls - offset;
          double dev = 0.0, raw = 0.0;
          if (cls != ignore_index && r >= 0 && r < Vs) {
            const scalar_t *wr = wp + r * d, *hr = hp + n * d;
            for (int64_t i = 0; i < d; ++i)
              gram_target_terms(static_cast<double>(wr[i]), static_cast<double>(cp[i]), static_cast<double>(hr[i]),
                                dev, raw);
            if (bp) dev += static_cast<double>(bp[r]) - static_cast<double>(cp[d]), raw += static_cast<double>(bp[r]);
          }
          out[2 * (n * K + j)] = static_cast<acc_t>(dev);
          out[2 * (n * K + j) + 1] = static_cast<acc_t>(raw);
        }
      }
    });
  });
  return in.out;
}

at::Tensor spherical_row_stats(const at::Tensor& hidden, const at::Tensor& hq, const at::Tensor& stat) {
  auto in = prepare_row_stats(hidden, hq, stat);
  const int64_t d = in.d;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "spherical_row_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* hp = in.hidden.data_ptr<scalar_t>();
    const acc_t *qp = in.hq.data_ptr<acc_t>(), *sp = in.stat.data_ptr<acc_t>();
    acc_t* out = in.out.data_ptr<acc_t>();
    at::parallel_for(0, in.N, grain_rows(d), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        double mu = 0.0;
        acc_t m2 = acc_t(0);
        for (int64_t i = 0; i < d; ++i)
          gram_stats_terms<acc_t>(static_cast<acc_t>(hp[n * d + i]), qp[n * d + i], sp[i], sp[d + 1 + i], mu, m2);
        out[2 * n] = static_cast<acc_t>(mu + static_cast<double>(sp[d]));
        out[2 * n + 1] = m2 + sp[2 * d + 1];
      }
    });
  });
  return in.out;
}

std::tuple<at::Tensor, at::Tensor> spherical_split_bf16(const at::Tensor& x,
                                                       const std::optional<at::Tensor>& col_shift,
                                                       const std::optional<at::Tensor>& row_scale) {
  auto in = prepare_split_bf16(x, col_shift, row_scale);
  const int64_t d = in.d;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.x.scalar_type(), "spherical_split_bf16", [&] {
    const scalar_t* xp = in.x.data_ptr<scalar_t>();
    const float* shift = in.shift.defined() ? in.shift.data_ptr<float>() : nullptr;
    const float* scale = in.scale.defined() ? in.scale.data_ptr<float>() : nullptr;
    auto* hi = reinterpret_cast<uint16_t*>(in.hi.data_ptr<at::BFloat16>());
    auto* lo = reinterpret_cast<uint16_t*>(in.lo.data_ptr<at::BFloat16>());
    at::parallel_for(0, in.R, grain_rows(d), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float s = scale ? scale[r] : 1.0f;
        for (int64_t j = 0; j < d; ++j) {
          const float v = (static_cast<float>(xp[r * d + j]) - (shift ? shift[j] : 0.0f)) * s;
          split_bf16(v, hi[r * d + j], lo[r * d + j]);
        }
      }
    });
  });
  return {in.hi, in.lo};
}

at::Tensor spherical_weight_grad(const at::Tensor& gw, const at::Tensor& row, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& v, at::ScalarType dtype) {
  auto in = prepare_weight_grad(gw, row, bias, v, dtype);
  const int64_t d = in.d;
  AT_DISPATCH_FLOATING_TYPES(in.gw.scalar_type(), "spherical_weight_grad", [&] {
    using acc_t = scalar_t;
    const acc_t* g = in.gw.data_ptr<acc_t>();
    const acc_t* rw = in.row.data_ptr<acc_t>();
    const acc_t* vv = in.v.data_ptr<acc_t>();
    const acc_t* b = in.bias.defined() ? in.bias.data_ptr<acc_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "spherical_weight_grad_out", [&] {
      scalar_t* out = in.out.data_ptr<scalar_t>();
      at::parallel_for(0, in.R, grain_rows(d), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const acc_t two_b = b ? acc_t(2) * b[r] : acc_t(0);
          for (int64_t j = 0; j < d; ++j)
            out[r * d + j] = static_cast<scalar_t>(gram_weight_grad_term(g[r * d + j], rw[j], two_b, vv[j]));
        }
      });
    });
  });
  return in.out;
}

at::Tensor spherical_grad_hidden(const at::Tensor& hq, const at::Tensor& ab, const at::Tensor& gamma,
                                 const at::Tensor& weight, const at::Tensor& target, const at::Tensor& stat,
                                 int64_t offset, int64_t ignore_index, bool with_dense) {
  auto in = prepare_grad_hidden(hq, ab, gamma, weight, target, stat, offset);
  const int64_t d = in.d, Vs = in.Vs, K = in.K;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "spherical_grad_hidden", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* wp = in.weight.data_ptr<scalar_t>();
    const acc_t *qp = in.hq.data_ptr<acc_t>(), *abp = in.ab.data_ptr<acc_t>(), *gp = in.gamma.data_ptr<acc_t>(),
                *sp = in.stat.data_ptr<acc_t>();
    const int64_t* tp = in.target.data_ptr<int64_t>();
    acc_t* out = in.out.data_ptr<acc_t>();
    at::parallel_for(0, in.N, grain_rows(d), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        acc_t* orow = out + n * d;
        const acc_t A = abp[2 * n], B = abp[2 * n + 1];
        for (int64_t i = 0; i < d; ++i)
          orow[i] = with_dense ? gram_grad_dense<acc_t>(A, B, qp[n * d + i], sp[d + 1 + i], sp[i]) : acc_t(0);
        for (int64_t j = 0; j < K; ++j) {  // target rows in target order
          const int64_t cls = tp[n * K + j], r = cls - offset;
          const acc_t g = gp[n * K + j];
          if (cls == ignore_index || r < 0 || r >= Vs || g == acc_t(0)) continue;
          const scalar_t* wr = wp + r * d;
          for (int64_t i = 0; i < d; ++i) orow[i] += gram_grad_target(g, static_cast<acc_t>(wr[i]), sp[i]);
        }
      }
    });
  });
  return in.out;
}

}  // namespace
}  // namespace fastloss::cpu

TORCH_LIBRARY_IMPL(fastloss, CPU, m) {
  m.impl("spherical_row_terms", &fastloss::cpu::spherical_row_terms);
  m.impl("spherical_gather_dot", &fastloss::cpu::spherical_gather_dot);
  m.impl("spherical_row_stats", &fastloss::cpu::spherical_row_stats);
  m.impl("spherical_grad_hidden", &fastloss::cpu::spherical_grad_hidden);
  m.impl("spherical_split_bf16", &fastloss::cpu::spherical_split_bf16);
  m.impl("spherical_weight_grad", &fastloss::cpu::spherical_weight_grad);
}
