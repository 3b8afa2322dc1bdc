// CPU glue of the sparsemax ops: checks, allocation, target validation, at::parallel_for over rows and the
// choice of instruction set. The kernels are in sparsemax_kernels.cpp, the maths in fastloss/sparsemax.h.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>

#include "../row_checks.h"
#include "glue.h"
#include "sparsemax_kernels.h"

namespace fastloss::cpu {
namespace {

// Newton passes before the exact sort-based fallback (rows seen in tests need at most ~12). The
// FASTLOSS_SPARSEMAX_MAX_ITER variable lowers it so the tests can reach the fallback.
int max_iter() {
  const char* env = std::getenv("FASTLOSS_SPARSEMAX_MAX_ITER");
  return env ? std::max(1, std::atoi(env)) : 100;
}

SparsemaxArgs sm_args(const at::Tensor& in, bool entmax15) {
  SparsemaxArgs a{};
  a.dtype = dtype_of(in);
  a.entmax15 = entmax15;
  a.in = in.data_ptr();
  a.row_stride = in.size(0) > 1 ? in.stride(0) : in.size(1);
  a.C = in.size(1);
  a.max_iter = max_iter();
  return a;
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
  constexpr const char* op = "fastloss.sparsemax_loss_fwd";
  check_row_inputs(logits, target, op);
  const int64_t N = logits.size(0), C = logits.size(1);
  auto t = target.contiguous();
  check_targets(t, C, ignore_index);
  auto opts = logits.options().dtype(acc_type_of(logits));
  at::Tensor loss = at::empty({N}, opts), stats = at::empty({N, 2}, opts);
  SparsemaxArgs a = sm_args(logits, entmax15);
  a.target = t.data_ptr<int64_t>();
  a.ignore_index = ignore_index;
  a.out = loss.data_ptr();
  a.stats = stats.data_ptr();
  run_rows(FL_CPU_KERNELS(sparsemax_kernels).loss_fwd, a, N);
  return {loss, stats};
}

at::Tensor sparsemax_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                              const at::Tensor& stats, int64_t ignore_index, bool entmax15) {
  constexpr const char* op = "fastloss.sparsemax_loss_bwd";
  auto in = prepare_row_backward(grad_loss, 1, logits, target, stats, 2, op);
  check_targets(in.target, logits.size(1), ignore_index);
  advise_huge_pages(in.grad_logits);
  SparsemaxArgs a = sm_args(logits, entmax15);
  a.target = in.target.data_ptr<int64_t>();
  a.ignore_index = ignore_index;
  a.stats = in.stats.data_ptr();
  a.grad_in = in.grad_rows.data_ptr();
  a.out = in.grad_logits.data_ptr();
  run_rows(FL_CPU_KERNELS(sparsemax_kernels).loss_bwd, a, logits.size(0));
  return in.grad_logits;
}

at::Tensor sparsemax_fwd(const at::Tensor& logits, bool entmax15) {
  constexpr const char* op = "fastloss.sparsemax_fwd";
  check_act_input(logits, op, "logits");
  at::Tensor out = at::empty(logits.sizes(), logits.options());
  const int64_t N = logits.size(0);
  advise_huge_pages(out);
  SparsemaxArgs a = sm_args(logits, entmax15);
  a.out = out.data_ptr();
  run_rows(FL_CPU_KERNELS(sparsemax_kernels).act_fwd, a, N);
  return out;
}

at::Tensor sparsemax_bwd(const at::Tensor& grad, const at::Tensor& probs, bool entmax15) {
  constexpr const char* op = "fastloss.sparsemax_bwd";
  check_act_input(probs, op, "probs");
  TORCH_CHECK(grad.sizes() == probs.sizes(), op, ": grad has shape ", grad.sizes(), ", probs ", probs.sizes());
  TORCH_CHECK(grad.device() == probs.device(), op, ": grad and probs are on different devices");
  const auto p = probs.contiguous();
  const auto g = grad.to(probs.scalar_type()).contiguous();
  at::Tensor out = at::empty(p.sizes(), p.options());
  const int64_t N = p.size(0);
  advise_huge_pages(out);
  SparsemaxArgs a = sm_args(p, entmax15);
  a.grad_in = g.data_ptr();
  a.out = out.data_ptr();
  run_rows(FL_CPU_KERNELS(sparsemax_kernels).act_bwd, a, N);
  return out;
}

}  // namespace
}  // namespace fastloss::cpu

TORCH_LIBRARY_IMPL(fastloss, CPU, m) {
  m.impl("sparsemax_fwd", &fastloss::cpu::sparsemax_fwd);
  m.impl("sparsemax_bwd", &fastloss::cpu::sparsemax_bwd);
  m.impl("sparsemax_loss_fwd", &fastloss::cpu::sparsemax_loss_fwd);
  m.impl("sparsemax_loss_bwd", &fastloss::cpu::sparsemax_loss_bwd);
}
