// Torch-free interface between the sparsemax glue (sparsemax.cpp) and its kernels (sparsemax_kernels.cpp),
// which are compiled once per instruction set and picked at run time, like the row-loss kernels.
#pragma once
#include <cstdint>

#include "row_kernels.h"  // DType

namespace fastloss::cpu {

// One launch over rows [begin, end). Accumulation type acc: double for f64, float otherwise.
struct SparsemaxArgs {
  DType dtype;
  bool entmax15;           // false: sparsemax
  const void* in;          // logits (N, C) with class stride 1, or probs (activation backward)
  int64_t row_stride, C;   // elements between rows of `in`
  const int64_t* target;   // loss: (N,)
  int64_t ignore_index;
  const void* grad_in;     // loss backward: (N,) acc; activation backward: (N, C) contiguous, dtype
  void* out;               // loss forward: (N,) acc; otherwise (N, C) contiguous, dtype
  void* stats;             // loss: (N, 2) acc = [max, threshold relative to it]
  int max_iter;            // Newton passes before the exact sort fallback
};

using SparsemaxKernel = void (*)(const SparsemaxArgs&, int64_t begin, int64_t end);

struct SparsemaxKernels {
  SparsemaxKernel act_fwd, act_bwd, loss_fwd, loss_bwd;
};

namespace base { extern const SparsemaxKernels sparsemax_kernels; }
namespace avx2 { extern const SparsemaxKernels sparsemax_kernels; }

}  // namespace fastloss::cpu
