// Torch-free interface between the CPU glue (row_losses.cpp) and the row kernels, which are compiled once per
// instruction set (row_kernels_isa.cpp built as a baseline and an AVX2+FMA object) and picked at run time.
#pragma once
#include <cstdint>

namespace fastloss::cpu {

enum class DType : int { f32, f64, f16, bf16 };

// Arguments of one launch over rows. Accumulation type `acc` is double for f64 logits and float otherwise;
// weight, margin, parts, stats and grad_parts are contiguous arrays of acc.
struct RowArgs {
  DType dtype;
  const void* logits;  // (N, C), class stride 1
  int64_t row_stride;  // elements between rows
  int64_t C;
  const int64_t* target;  // (N,) for cross-entropy; (N, K) for the spherical family
  int64_t K;              // targets per row
  int64_t ignore_index;
  // cross-entropy options
  const void* weight;  // (C,) or nullptr
  const void* margin;  // (C,) or nullptr
  double margin_scalar, scale, softcap, sum_w;
  bool with_smoothing;
  // spherical-family options (fastloss/spherical.h)
  int kind;
  double a, b, eps;
  const void* target_weight;  // (N, K) of acc, or nullptr for weight 1
  // probability targets (cross_entropy_prob_*): (N, C) contiguous, of the logits' dtype or (prob_is_acc) of acc
  const void* prob;
  bool prob_is_acc;
  // outputs / backward inputs
  void* parts;            // forward: CE (N,3) [nll, smooth, lse]; spherical (N,) loss
  void* stats;            // forward output / backward input: CE (N,3) [m, r, z_y] (probability targets
                          // [m, r, sum_k w_k t_k]); spherical (N,2) [mean - x_0, m2]
  const void* grad_parts; // backward: dL/dparts, same layout as parts
  void* grad_logits;      // backward: (N, C) contiguous, logits dtype
};

using RowKernel = void (*)(const RowArgs&, int64_t begin, int64_t end);

struct RowKernels {
  RowKernel ce_fwd, ce_bwd, spherical_fwd, spherical_bwd, ce_prob_fwd, ce_prob_bwd;
};

namespace base { extern const RowKernels kernels; }
namespace avx2 { extern const RowKernels kernels; }

}  // namespace fastloss::cpu
