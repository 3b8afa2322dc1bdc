// CPU glue of the row-loss ops: checks, allocation, target validation, at::parallel_for over rows and the
// choice of instruction set. The kernels themselves are in row_kernels_isa.cpp.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>

#include "../row_checks.h"
#include "glue.h"
#include "row_kernels.h"

namespace fastloss::cpu {
namespace {

RowArgs base_args(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index) {
  RowArgs a{};
  a.dtype = dtype_of(logits);
  a.logits = logits.data_ptr();
  a.row_stride = logits.size(0) > 1 ? logits.stride(0) : logits.size(1);
  a.C = logits.size(1);
  a.target = target.data_ptr<int64_t>();
  a.K = 1;
  a.ignore_index = ignore_index;
  a.scale = 1.0;
  return a;
}

void set_backward_args(RowArgs& a, RowBackwardInputs& in) {
  advise_huge_pages(in.grad_logits);
  a.stats = in.stats.data_ptr();
  a.grad_parts = in.grad_rows.data_ptr();
  a.grad_logits = in.grad_logits.data_ptr();
}

void set_ce_options(RowArgs& a, const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& mg,
                    double margin_scalar, double logit_scale, double softcap, bool with_smoothing) {
  a.weight = w ? w->data_ptr() : nullptr;
  a.margin = mg ? mg->data_ptr() : nullptr;
  a.margin_scalar = margin_scalar;
  a.scale = logit_scale;
  a.softcap = softcap;
  a.with_smoothing = with_smoothing;
  a.sum_w = w ? w->sum().item<double>() : static_cast<double>(a.C);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target,
                                                     const std::optional<at::Tensor>& weight,
                                                     const std::optional<at::Tensor>& margin, double margin_scalar,
                                                     double logit_scale, double softcap, int64_t ignore_index,
                                                     bool with_smoothing) {
  constexpr const char* op = "fastloss.cross_entropy_fwd";
  check_row_inputs(logits, target, op);
  auto w = class_vector(weight, logits, op, "weight");
  auto mg = class_vector(margin, logits, op, "target_margin");
  const int64_t N = logits.size(0), C = logits.size(1);
  auto t = target.contiguous();
  check_targets(t, C, ignore_index);
  auto opts = logits.options().dtype(acc_type_of(logits));
  at::Tensor parts = at::empty({N, 3}, opts), stats = at::empty({N, 3}, opts);
  RowArgs a = base_args(logits, t, ignore_index);
  set_ce_options(a, w, mg, margin_scalar, logit_scale, softcap, with_smoothing);
  a.parts = parts.data_ptr();
  a.stats = stats.data_ptr();
  run_rows(FL_CPU_KERNELS(kernels).ce_fwd, a, N);
  return {parts, stats};
}

at::Tensor cross_entropy_bwd(const at::Tensor& grad_parts, const at::Tensor& logits, const at::Tensor& target,
                             const std::optional<at::Tensor>& weight, const at::Tensor& stats, double logit_scale,
                             double softcap, int64_t ignore_index, bool with_smoothing) {
  constexpr const char* op = "fastloss.cross_entropy_bwd";
  auto in = prepare_row_backward(grad_parts, 3, logits, target, stats, 3, op);
  auto w = class_vector(weight, logits, op, "weight");
  check_targets(in.target, logits.size(1), ignore_index);
  RowArgs a = base_args(logits, in.target, ignore_index);
  set_ce_options(a, w, std::nullopt, 0.0, logit_scale, softcap, with_smoothing);
  set_backward_args(a, in);
  run_rows(FL_CPU_KERNELS(kernels).ce_bwd, a, logits.size(0));
  return in.grad_logits;
}

// Probability targets: the CE forward and backward with t (N, C) in place of class indices (no ignore_index,
// no target margin; see ProbSums).
RowArgs prob_args(const at::Tensor& logits, const ProbTargets& pt, const std::optional<at::Tensor>& w,
                  double logit_scale, double softcap, bool with_smoothing) {
  RowArgs a{};
  a.dtype = dtype_of(logits);
  a.logits = logits.data_ptr();
  a.row_stride = logits.size(0) > 1 ? logits.stride(0) : logits.size(1);
  a.C = logits.size(1);
  a.prob = pt.t.data_ptr();
  a.prob_is_acc = pt.is_acc;
  set_ce_options(a, w, std::nullopt, 0.0, logit_scale, softcap, with_smoothing);
  return a;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_prob_fwd(const at::Tensor& logits, const at::Tensor& target,
                                                          const std::optional<at::Tensor>& weight,
                                                          double logit_scale, double softcap, bool with_smoothing) {
  constexpr const char* op = "fastloss.cross_entropy_prob_fwd";
  check_row_logits(logits, op);
  auto pt = prob_targets(target, logits, op);
  auto w = class_vector(weight, logits, op, "weight");
  const int64_t N = logits.size(0);
  auto opts = logits.options().dtype(acc_type_of(logits));
  at::Tensor parts = at::empty({N, 3}, opts), stats = at::empty({N, 3}, opts);
  RowArgs a = prob_args(logits, pt, w, logit_scale, softcap, with_smoothing);
  a.parts = parts.data_ptr();
  a.stats = stats.data_ptr();
  run_rows(FL_CPU_KERNELS(kernels).ce_prob_fwd, a, N);
  return {parts, stats};
}

at::Tensor cross_entropy_prob_bwd(const at::Tensor& grad_parts, const at::Tensor& logits, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                                  double logit_scale, double softcap, bool with_smoothing) {
  constexpr const char* op = "fastloss.cross_entropy_prob_bwd";
  auto in = prepare_prob_backward(grad_parts, logits, stats, op);
  auto pt = prob_targets(target, logits, op);
  auto w = class_vector(weight, logits, op, "weight");
  RowArgs a = prob_args(logits, pt, w, logit_scale, softcap, with_smoothing);
  set_backward_args(a, in);
  run_rows(FL_CPU_KERNELS(kernels).ce_prob_bwd, a, logits.size(0));
  return in.grad_logits;
}

void set_spherical_options(RowArgs& a, const at::Tensor& target, const std::optional<at::Tensor>& tw, int64_t kind,
                           double a_, double b_, double eps) {
  TORCH_CHECK(kind >= 0 && kind <= 3, "fastloss: unknown spherical loss kind ", kind);
  a.K = target.size(1);
  a.kind = static_cast<int>(kind);
  a.a = a_;
  a.b = b_;
  a.eps = eps;
  a.target_weight = tw ? tw->data_ptr() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> spherical_fwd(const at::Tensor& logits, const at::Tensor& target,
                                                 const std::optional<at::Tensor>& target_weight, int64_t kind,
                                                 double a_, double b_, double eps, int64_t ignore_index) {
  constexpr const char* op = "fastloss.spherical_fwd";
  check_row_inputs(logits, target, op, /*multi_target=*/true);
  const int64_t N = logits.size(0), C = logits.size(1);
  auto t = target.contiguous();
  auto tw = target_weights(target_weight, t, logits, op);
  check_targets(t, C, ignore_index);
  auto opts = logits.options().dtype(acc_type_of(logits));
  at::Tensor loss = at::empty({N}, opts), stats = at::empty({N, 2}, opts);
  RowArgs a = base_args(logits, t, ignore_index);
  set_spherical_options(a, t, tw, kind, a_, b_, eps);
  a.parts = loss.data_ptr();
  a.stats = stats.data_ptr();
  run_rows(FL_CPU_KERNELS(kernels).spherical_fwd, a, N);
  return {loss, stats};
}

at::Tensor spherical_bwd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                         const std::optional<at::Tensor>& target_weight, const at::Tensor& stats, int64_t kind,
                         double a_, double b_, double eps, int64_t ignore_index) {
  constexpr const char* op = "fastloss.spherical_bwd";
  auto in = prepare_row_backward(grad_loss, 1, logits, target, stats, 2, op, /*multi_target=*/true);
  auto tw = target_weights(target_weight, in.target, logits, op);
  check_targets(in.target, logits.size(1), ignore_index);
  RowArgs a = base_args(logits, in.target, ignore_index);
  set_spherical_options(a, in.target, tw, kind, a_, b_, eps);
  set_backward_args(a, in);
  run_rows(FL_CPU_KERNELS(kernels).spherical_bwd, a, logits.size(0));
  return in.grad_logits;
}

}  // namespace
}  // namespace fastloss::cpu

TORCH_LIBRARY_IMPL(fastloss, CPU, m) {
  m.impl("cross_entropy_fwd", &fastloss::cpu::cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &fastloss::cpu::cross_entropy_bwd);
  m.impl("spherical_fwd", &fastloss::cpu::spherical_fwd);
  m.impl("spherical_bwd", &fastloss::cpu::spherical_bwd);
  m.impl("cross_entropy_prob_fwd", &fastloss::cpu::cross_entropy_prob_fwd);
  m.impl("cross_entropy_prob_bwd", &fastloss::cpu::cross_entropy_prob_bwd);
}
