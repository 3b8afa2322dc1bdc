// Argument checks shared by the CPU and CUDA glue of the row-loss ops. The Python API validates first and
// names the user's arguments; these checks keep a direct call of the op (torch.ops.fastloss.*) safe too.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <optional>

namespace fastloss {

inline void check_row_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D (N, C), got ", logits.dim(), "-D");
  TORCH_CHECK(logits.size(1) >= 1, op, ": logits need at least one class");
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) == 1 || logits.numel() == 0, op,
              ": logits need a contiguous class dimension");
  auto st = logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": logits must be float32, float64, float16 or bfloat16, got ", st);
}

// target is (N,) class ids, or (N, K) with K >= 1 when multi_target (the spherical family).
inline void check_row_inputs(const at::Tensor& logits, const at::Tensor& target, const char* op,
                             bool multi_target = false) {
  check_row_logits(logits, op);
  if (multi_target) {
    TORCH_CHECK(target.dim() == 2 && target.size(0) == logits.size(0) && target.size(1) >= 1, op,
                ": target must have shape (", logits.size(0), ", K) with K >= 1, got ", target.sizes());
  } else {
    TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), op, ": target must have shape (",
                logits.size(0), ",), got ", target.sizes());
  }
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64, got ", target.scalar_type());
  TORCH_CHECK(target.device() == logits.device(), op, ": target is on ", target.device(), ", logits on ",
              logits.device());
}

inline at::ScalarType acc_type_of(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Optional per-class vector (weight, margin) as a contiguous tensor of the accumulation type.
inline std::optional<at::Tensor> class_vector(const std::optional<at::Tensor>& v, const at::Tensor& logits,
                                              const char* op, const char* name) {
  if (!v.has_value() || !v->defined()) return std::nullopt;
  TORCH_CHECK(v->dim() == 1 && v->size(0) == logits.size(1), op, ": ", name, " must have shape (",
              logits.size(1), ",), got ", v->sizes());
  TORCH_CHECK(v->device() == logits.device(), op, ": ", name, " is on ", v->device(), ", logits on ",
              logits.device());
  return v->to(acc_type_of(logits)).contiguous();
}

// Optional (N, K) target weights as a contiguous tensor of the accumulation type.
inline std::optional<at::Tensor> target_weights(const std::optional<at::Tensor>& w, const at::Tensor& target,
                                                const at::Tensor& logits, const char* op) {
  if (!w.has_value() || !w->defined()) return std::nullopt;
  TORCH_CHECK(w->sizes() == target.sizes(), op, ": target_weight must have the shape of target ", target.sizes(),
              ", got ", w->sizes());
  TORCH_CHECK(w->device() == logits.device(), op, ": target_weight is on ", w->device(), ", logits on ",
              logits.device());
  TORCH_CHECK(at::isFloatingType(w->scalar_type()), op, ": target_weight must be floating point, got ",
              w->scalar_type());
  return w->to(acc_type_of(logits)).contiguous();
}

// Probability targets (N, C) of a cross_entropy_prob op, contiguous: in the logits' dtype when given so, else
// converted to the accumulation type (exact for every 2-byte dtype; float64 targets of float32 logits round).
struct ProbTargets {
  at::Tensor t;
  bool is_acc;  // t holds the accumulation type, not the logits' dtype
};
inline ProbTargets prob_targets(const at::Tensor& target, const at::Tensor& logits, const char* op) {
  TORCH_CHECK(target.dim() == 2 && target.sizes() == logits.sizes(), op,
              ": probability target must have the shape of logits ", logits.sizes(), ", got ", target.sizes());
  TORCH_CHECK(at::isFloatingType(target.scalar_type()), op, ": probability target must be floating point, got ",
              target.scalar_type());
  TORCH_CHECK(target.device() == logits.device(), op, ": target is on ", target.device(), ", logits on ",
              logits.device());
  if (target.scalar_type() == logits.scalar_type()) return {target.contiguous(), false};
  return {target.to(acc_type_of(logits)).contiguous(), true};
}

inline void check_stats(const at::Tensor& t, const at::Tensor& logits, int64_t cols, const char* op,
                        const char* name) {
  TORCH_CHECK(t.dim() == (cols == 1 ? 1 : 2) && t.size(0) == logits.size(0) && (cols == 1 || t.size(1) == cols),
              op, ": ", name, " has shape ", t.sizes(), ", expected (", logits.size(0),
              cols == 1 ? "" : ", ", cols == 1 ? "" : std::to_string(cols), ")");
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " is on another device than logits");
}

// The common prologue of every backward op: checks, then target, upstream gradient and saved statistics as
// contiguous tensors (the last two in the accumulation type) and the uninitialised (N, C) gradient.
struct RowBackwardInputs {
  at::Tensor target, grad_rows, stats, grad_logits;
};

inline RowBackwardInputs prepare_row_backward(const at::Tensor& grad_rows, int64_t grad_cols,
                                              const at::Tensor& logits, const at::Tensor& target,
                                              const at::Tensor& stats, int64_t stats_cols, const char* op,
                                              bool multi_target = false) {
  check_row_inputs(logits, target, op, multi_target);
  check_stats(grad_rows, logits, grad_cols, op, grad_cols == 1 ? "grad_loss" : "grad_parts");
  check_stats(stats, logits, stats_cols, op, "stats");
  const auto acc = acc_type_of(logits);
  return {target.contiguous(), grad_rows.to(acc).contiguous(), stats.to(acc).contiguous(),
          at::empty({logits.size(0), logits.size(1)}, logits.options())};
}

// The same for the probability-target CE backward (3 parts, 3 statistics; the caller checks its target).
inline RowBackwardInputs prepare_prob_backward(const at::Tensor& grad_parts, const at::Tensor& logits,
                                               const at::Tensor& stats, const char* op) {
  check_row_logits(logits, op);
  check_stats(grad_parts, logits, 3, op, "grad_parts");
  check_stats(stats, logits, 3, op, "stats");
  const auto acc = acc_type_of(logits);
  return {at::Tensor(), grad_parts.to(acc).contiguous(), stats.to(acc).contiguous(),
          at::empty({logits.size(0), logits.size(1)}, logits.options())};
}

}  // namespace fastloss
