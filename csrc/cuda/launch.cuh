// Host-side launch helpers shared by the row-kernel families (row_losses.cu, stable_softmax.cu, sparsemax.cu):
// the floating-dtype switch, one block per row with a width-dependent block size, and the row stride.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "common.cuh"

namespace fastloss::cuda {

// Calls f(scalar_t{}) for the four floating dtypes the row kernels take.
template <typename F>
void dispatch_float(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: TORCH_CHECK(false, "fastloss: unsupported dtype ", st);
  }
}

struct Launch {
  dim3 grid, block;
  cudaStream_t stream;
};

// One block per row of x (N, C) (grid-stride beyond 2^30 rows), threads by the row's width in bytes.
inline Launch row_launch(const at::Tensor& x) {
  const int64_t blocks = std::min<int64_t>(std::max<int64_t>(x.size(0), 1), int64_t(1) << 30);
  return {dim3(static_cast<unsigned>(blocks)), dim3(row_block_threads(x.size(1), x.element_size())),
          c10::cuda::getCurrentCUDAStream(x.get_device()).stream()};
}

// Elements between rows (a single row may have any stride(0)).
inline int64_t row_stride_of(const at::Tensor& x) { return x.size(0) > 1 ? x.stride(0) : x.size(1); }

}  // namespace fastloss::cuda
