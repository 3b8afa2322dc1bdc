// Torch-free interface between the CPU glue of the stable-softmax family (stable_softmax.cpp) and its row
// kernels (stable_softmax_isa.cpp, compiled once per instruction set like row_kernels_isa.cpp).
#pragma once
#include <cstdint>

#include "row_kernels.h"

namespace fastloss::cpu {

struct StableArgs {
  DType dtype;
  const void* logits;  // (N, C), class stride 1
  int64_t row_stride;
  int64_t C;
  const int64_t* target;  // additive: (N,) class indices
  int64_t ignore_index;
  const uint8_t* mask;  // multi-label: (N, C) bool, class stride 1
  int64_t mask_stride;
  int order;  // Taylor order
  double scale, margin;
  void* loss;              // forward: (N,) in acc
  void* stats;             // forward output / backward input: additive (N, 2), multi-label (N, 4)
  const void* grad_loss;   // backward: (N,) in acc
  void* grad_logits;       // backward: (N, C) contiguous, logits dtype
};

using StableKernel = void (*)(const StableArgs&, int64_t begin, int64_t end);

// Indexed by AddKind / MlKind (fastloss/stable_softmax.h).
struct StableKernels {
  StableKernel add_fwd[3], add_bwd[3], ml_fwd[2], ml_bwd[2];
};

namespace base { extern const StableKernels stable_kernels; }
namespace avx2 { extern const StableKernels stable_kernels; }

}  // namespace fastloss::cpu
