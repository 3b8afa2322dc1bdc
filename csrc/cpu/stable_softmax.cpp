// CPU glue of the stable-softmax ops (additive normalisers and multi-label losses): checks, allocation,
// target validation, at::parallel_for over rows and the choice of instruction set.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../row_checks.h"
#include "glue.h"
#include "stable_softmax_kernels.h"

namespace fastloss::cpu {
namespace {

StableArgs make_args(const at::Tensor& logits) {
  StableArgs a{};
  a.dtype = dtype_of(logits);
  a.logits = logits.data_ptr();
  a.row_stride = logits.size(0) > 1 ? logits.stride(0) : logits.size(1);
  a.C = logits.size(1);
  a.scale = 1.0;
  return a;
}

int additive_kind(int64_t kind, int64_t order, const char* op) {
  TORCH_CHECK(kind >= 0 && kind <= 2, op, ": kind must be 0 (stablemax), 1 (taylor) or 2 (softplus), got ", kind);
  TORCH_CHECK(kind != 1 || (order >= 2 && order <= 10 && order % 2 == 0), op,
              ": Taylor order must be even in [2, 10], got ", order);
  return static_cast<int>(kind);
}

std::tuple<at::Tensor, at::Tensor> additive_row_fwd(const at::Tensor& logits, const at::Tensor& target,
                                                    int64_t kind, int64_t order, double scale, double margin,
                                                    int64_t ignore_index) {
  constexpr const char* op = "fastloss.additive_row_fwd";
  check_row_inputs(logits, target, op);
  const int k = additive_kind(kind, order, op);
  const int64_t N = logits.size(0);
  auto t = target.contiguous();
  check_targets(t, logits.size(1), ignore_index);
  auto opts = logits.options().dtype(acc_type_of(logits));
  at::Tensor loss = at::empty({N}, opts), stats = at::empty({N, 2}, opts);
  StableArgs a = make_args(logits);
  a.target = t.data_ptr<int64_t>();
  a.ignore_index = ignore_index;
  a.order = static_cast<int>(order);
  a.scale = scale;
  a.margin = margin;
  a.loss = loss.data_ptr();
  a.stats = stats.data_ptr();
  run_rows(FL_CPU_KERNELS(stable_kernels).add_fwd[k], a, N);
  return {loss, stats};
}

at::Tensor additive_row_bwd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                            const at::Tensor& stats, int64_t kind, int64_t order, double scale, double margin,
                            int64_t ignore_index) {
  constexpr const char* op = "fastloss.additive_row_bwd";
  auto in = prepare_row_backward(grad_loss, 1, logits, target, stats, 2, op);
  const int k = additive_kind(kind, order, op);
  check_targets(in.target, logits.size(1), ignore_index);
  StableArgs a = make_args(logits);
  a.target = in.target.data_ptr<int64_t>();
  a.ignore_index = ignore_index;
  a.order = static_cast<int>(order);
  a.scale = scale;
  a.margin = margin;
  advise_huge_pages(in.grad_logits);
  a.stats = in.stats.data_ptr();
  a.grad_loss = in.grad_rows.data_ptr();
  a.grad_logits = in.grad_logits.data_ptr();
  run_rows(FL_CPU_KERNELS(stable_kernels).add_bwd[k], a, logits.size(0));
  return in.grad_logits;
}

void check_mask(const at::Tensor& logits, const at::Tensor& mask, int64_t kind, const char* op) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) >= 1, op, ": logits must be 2-D (N, C) with C >= 1");
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) == 1 || logits.numel() == 0, op,
              ": logits need a contiguous class dimension");
  auto st = logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": logits must be a floating type, got ", st);
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == logits.size(0) && mask.size(1) == logits.size(1), op,
              ": mask must have the shape of logits ", logits.sizes(), ", got ", mask.sizes());
  TORCH_CHECK(mask.stride(1) == 1 || mask.size(1) == 1 || mask.numel() == 0, op,
              ": mask needs a contiguous class dimension");
  TORCH_CHECK(mask.device() == logits.device(), op, ": mask is on ", mask.device(), ", logits on ",
              logits.device());
  TORCH_CHECK(kind == 0 || kind == 1, op, ": kind must be 0 (zlpr) or 1 (dexml), got ", kind);
}

StableArgs ml_args(const at::Tensor& logits, const at::Tensor& mask, double scale, double margin) {
  StableArgs a = make_args(logits);
  a.mask = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  a.mask_stride = mask.size(0) > 1 ? mask.stride(0) : mask.size(1);
  a.scale = scale;
  a.margin = margin;
  return a;
}

std::tuple<at::Tensor, at::Tensor> multilabel_row_fwd(const at::Tensor& logits, const at::Tensor& mask,
                                                      int64_t kind, double scale, double margin) {
  check_mask(logits, mask, kind, "fastloss.multilabel_row_fwd");
  const int64_t N = logits.size(0);
  auto opts = logits.options().dtype(acc_type_of(logits));
  at::Tensor loss = at::empty({N}, opts), stats = at::empty({N, 4}, opts);
  StableArgs a = ml_args(logits, mask, scale, margin);
  a.loss = loss.data_ptr();
  a.stats = stats.data_ptr();
  run_rows(FL_CPU_KERNELS(stable_kernels).ml_fwd[kind], a, N);
  return {loss, stats};
}

at::Tensor multilabel_row_bwd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& mask,
                              const at::Tensor& stats, int64_t kind, double scale, double margin) {
  constexpr const char* op = "fastloss.multilabel_row_bwd";
  check_mask(logits, mask, kind, op);
  check_stats(grad_loss, logits, 1, op, "grad_loss");
  check_stats(stats, logits, 4, op, "stats");
  const auto acc = acc_type_of(logits);
  auto g = grad_loss.to(acc).contiguous();
  auto s = stats.to(acc).contiguous();
  at::Tensor grad = at::empty({logits.size(0), logits.size(1)}, logits.options());
  advise_huge_pages(grad);
  StableArgs a = ml_args(logits, mask, scale, margin);
  a.stats = s.data_ptr();
  a.grad_loss = g.data_ptr();
  a.grad_logits = grad.data_ptr();
  run_rows(FL_CPU_KERNELS(stable_kernels).ml_bwd[kind], a, logits.size(0));
  return grad;
}

}  // namespace
}  // namespace fastloss::cpu

TORCH_LIBRARY_IMPL(fastloss, CPU, m) {
  m.impl("additive_row_fwd", &fastloss::cpu::additive_row_fwd);
  m.impl("additive_row_bwd", &fastloss::cpu::additive_row_bwd);
  m.impl("multilabel_row_fwd", &fastloss::cpu::multilabel_row_fwd);
  m.impl("multilabel_row_bwd", &fastloss::cpu::multilabel_row_bwd);
}
