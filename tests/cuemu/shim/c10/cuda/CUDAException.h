// cuemu (tests/cuemu): the emulator raises on a bad launch itself.
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "cuemu: ", #expr, " failed")
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
