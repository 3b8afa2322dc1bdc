// Torch-free interface between the contrastive CPU glue (contrastive.cpp) and its epilogues
// (contrastive_kernels.cpp), which are compiled once per instruction set and picked at run time.
#pragma once
#include <cstdint>

#include "fastloss/contrastive.h"

namespace fastloss::cpu {

constexpr int64_t kContrastiveColumnChunk = 256;  // columns per task of the symmetric column pass

// Each kernel runs a range of tile rows [begin, end) (columns: of column chunks) of one block.
template <typename T>
using ContrastiveKernel = void (*)(const contrastive::TileArgs<T>&, int64_t begin, int64_t end);

template <typename T>
struct ContrastiveKernels {
  ContrastiveKernel<T> fwd_rows, columns, bwd_rows;
};

struct ContrastiveKernelSet {
  ContrastiveKernels<float> f32;
  ContrastiveKernels<double> f64;
};

namespace base { extern const ContrastiveKernelSet contrastive_kernels; }
namespace avx2 { extern const ContrastiveKernelSet contrastive_kernels; }

}  // namespace fastloss::cpu
