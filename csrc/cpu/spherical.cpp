// CPU kernels of the spherical Gram form's row ops (python/fastloss/linear_spherical.py): the per-row
// finalisation (spherical_row_terms), the centred target outputs (spherical_gather_dot), the row statistics
// (spherical_row_stats) and the hidden gradient (spherical_grad_hidden). The d x d and V x d products around
// them run through at::matmul. Maths in fastloss/spherical.h, shared with csrc/cuda/spherical.cu.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
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

int64_t grain_rows(int64_t d) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)); }

at::Tensor spherical_gather_dot(const at::Tensor& hidden, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                const at::Tensor& center, int64_t offset, int64_t ignore_index) {
  constexpr const char* op = "fastloss.spherical_gather_dot";
  check_gram_hidden(hidden, op);
  const auto tg = check_gram_targets(target, hidden, weight, offset, op);
  const int64_t N = hidden.size(0), d = hidden.size(1), Vs = weight.size(0), K = tg.K;
  const auto c = gram_acc_input(center, hidden, {d + 1}, op, "center");
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = gram_acc_input(bias->to(gram_acc_type(hidden)), hidden, {Vs}, op, "bias");
  auto h = hidden.contiguous(), w = weight.contiguous();
  at::Tensor out = at::empty({N, K}, hidden.options().dtype(gram_acc_type(hidden)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *hp = h.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    const acc_t* cp = c.data_ptr<acc_t>();
    const acc_t* bp = b.defined() ? b.data_ptr<acc_t>() : nullptr;
    const int64_t* tp = tg.target.data_ptr<int64_t>();
    acc_t* op_ = out.data_ptr<acc_t>();
    at::parallel_for(0, N, grain_rows(d * K), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t j = 0; j < K; ++j) {
          const int64_t cls = tp[n * K + j];
          const int64_t r = cls - offset;
          acc_t s = acc_t(0);
          if (cls != ignore_index && r >= 0 && r < Vs) {
            const scalar_t* wr = wp + r * d;
            const scalar_t* hr = hp + n * d;
            for (int64_t i = 0; i < d; ++i) s += gram_dev_term<acc_t>(wr[i], cp[i], hr[i]);
            if (bp) s += bp[r] - cp[d];
          }
          op_[n * K + j] = s;
        }
      }
    });
  });
  return out;
}

at::Tensor spherical_row_stats(const at::Tensor& hidden, const at::Tensor& hq, const at::Tensor& stat) {
  constexpr const char* op = "fastloss.spherical_row_stats";
  check_gram_hidden(hidden, op);
  const int64_t N = hidden.size(0), d = hidden.size(1);
  const auto q = gram_acc_input(hq, hidden, {N, d}, op, "hq");
  const auto st = gram_acc_input(stat, hidden, {2 * d + 2}, op, "stat");
  auto h = hidden.contiguous();
  at::Tensor out = at::empty({N, 2}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const acc_t *qp = q.data_ptr<acc_t>(), *sp = st.data_ptr<acc_t>();
    acc_t* o = out.data_ptr<acc_t>();
    at::parallel_for(0, N, grain_rows(d), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        acc_t mu = acc_t(0), m2 = acc_t(0);
        for (int64_t i = 0; i < d; ++i)
          gram_stats_terms<acc_t>(static_cast<acc_t>(hp[n * d + i]), qp[n * d + i], sp[i], sp[d + 1 + i], mu, m2);
        o[2 * n] = mu + sp[d];
        o[2 * n + 1] = m2 + sp[2 * d + 1];
      }
    });
  });
  return out;
}

at::Tensor spherical_grad_hidden(const at::Tensor& hq, const at::Tensor& ab, const at::Tensor& gamma,
                                 const at::Tensor& weight, const at::Tensor& target, const at::Tensor& stat,
                                 int64_t offset, int64_t ignore_index, bool with_dense) {
  constexpr const char* op = "fastloss.spherical_grad_hidden";
  TORCH_CHECK(hq.dim() == 2, op, ": hq must be (N, d)");
  const int64_t N = hq.size(0), d = hq.size(1), Vs = weight.size(0);
  const auto q = hq.contiguous();
  const auto tg = check_gram_grad_targets(target, hq, weight, offset, op);
  const int64_t K = tg.K;
  const auto a_b = gram_acc_input(ab, hq, {N, 2}, op, "ab");
  const auto gm = gram_acc_input(gamma, hq, {N, K}, op, "gamma");
  const auto st = gram_acc_input(stat, hq, {2 * d + 2}, op, "stat");
  auto w = weight.contiguous();
  at::Tensor out = at::empty({N, d}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const acc_t *qp = q.data_ptr<acc_t>(), *abp = a_b.data_ptr<acc_t>(), *gp = gm.data_ptr<acc_t>(),
                *sp = st.data_ptr<acc_t>();
    const int64_t* tp = tg.target.data_ptr<int64_t>();
    acc_t* o = out.data_ptr<acc_t>();
    at::parallel_for(0, N, grain_rows(d), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        acc_t* orow = o + n * d;
        const acc_t A = abp[2 * n], B = abp[2 * n + 1];
        for (int64_t i = 0; i < d; ++i)
          orow[i] = with_dense ? gram_grad_dense<acc_t>(A, B, qp[n * d + i], sp[d + 1 + i], sp[i]) : acc_t(0);
        for (int64_t j = 0; j < K; ++j) {
          const int64_t cls = tp[n * K + j], r = cls - offset;
          const acc_t g = gp[n * K + j];
          if (cls == ignore_index || r < 0 || r >= Vs || g == acc_t(0)) continue;
          const scalar_t* wr = wp + r * d;
          for (int64_t i = 0; i < d; ++i) orow[i] += g * static_cast<acc_t>(wr[i]);
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace fastloss::cpu

TORCH_LIBRARY_IMPL(fastloss, CPU, m) {
  m.impl("spherical_row_terms", &fastloss::cpu::spherical_row_terms);
  m.impl("spherical_gather_dot", &fastloss::cpu::spherical_gather_dot);
  m.impl("spherical_row_stats", &fastloss::cpu::spherical_row_stats);
  m.impl("spherical_grad_hidden", &fastloss::cpu::spherical_grad_hidden);
}
