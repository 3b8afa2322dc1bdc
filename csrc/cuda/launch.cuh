// Host-side launch helpers shared by the row-kernel families (row_losses.cu, stable_softmax.cu, sparsemax.cu):
// the floating-dtype switch, one block per row with a width-dependent block size, and the row stride.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <functional>
#include <map>
#include <mutex>
#include <tuple>

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

// Whether the streaming row kernels that have a staged version (CE and spherical, forward and backward) take it
// (FASTLOSS_ROW_STAGED=0 turns them off).
inline bool row_staged() {
  static const bool on = env_flag("FASTLOSS_ROW_STAGED");
  return on;
}

// A persistent grid for a kernel built on stream_rows_staged: as many blocks as the device holds at once with
// `ring_bytes_per_thread` of dynamic shared memory per thread, at most one per row. ok == false (the caller takes
// its unstaged kernel) when a row is not 16-byte aligned or shorter than one pack, the GPU predates cp.async
// (sm_80), the ring does not fit, the staged kernel would hold fewer threads per SM than the unstaged one (a
// 512-thread ring on GPUs with less shared memory than Hopper's), or FASTLOSS_ROW_STAGED=0.
struct StagedLaunch {
  bool ok = false;
  Launch launch{};
  size_t smem = 0;
};
// Blocks of `threads` per SM for (kernel, device), 0 if it cannot run staged; cached. The function's dynamic
// shared memory limit is raised once per (kernel, device) to the largest ring, so that concurrent host threads
// never see another's smaller limit at launch.
inline int staged_blocks_per_sm(const void* kernel, int device, int threads, int ring_bytes_per_thread,
                                const std::function<int(int)>& occupancy) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, int>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, device, threads, ring_bytes_per_thread);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int per_sm = 0, major = 0, smem_optin = 0;
  const int largest = kMaxRowThreads * ring_bytes_per_thread;
  const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                  cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) ==
                      cudaSuccess &&
                  major >= 8 && largest <= smem_optin &&
                  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, largest) == cudaSuccess;
  if (ok) per_sm = occupancy(threads);
  if (!ok || per_sm < 0) {
    (void)cudaGetLastError();  // a failed query leaves an error behind; the unstaged kernel runs instead
    per_sm = 0;
  }
  // the staged kernel must not hold fewer threads per SM than the unstaged one (kMinRowBlocks: two 512-thread
  // blocks, or their register budget): below 1024 threads per SM it runs unstaged
  if (int64_t(per_sm) * threads < 1024) per_sm = 0;
  cache.emplace(key, per_sm);
  return per_sm;
}

// Rows of t (N, C) all 16-byte aligned and contiguous within.
inline bool rows_aligned16(const at::Tensor& t) {
  const int64_t N = t.size(0), C = t.size(1);
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (C == 1 || t.stride(1) == 1) &&
         (N == 1 || (row_stride_of(t) * t.element_size()) % 16 == 0);
}

// out: a backward's gradient (N, C), written with 16-byte stores: its rows must be aligned too.
template <typename Kernel>
StagedLaunch staged_row_launch(Kernel* kernel, const at::Tensor& x, int ring_bytes_per_thread,
                               const at::Tensor* out = nullptr) {
  StagedLaunch s;
  const int64_t N = x.size(0), C = x.size(1), elem = x.element_size();
  const bool aligned = rows_aligned16(x) && (out == nullptr || rows_aligned16(*out));
  if (!row_staged() || !aligned || C * elem < 16 || N < 1) return s;
  const int device = x.get_device();
  const Launch base = row_launch(x);
  const int threads = static_cast<int>(base.block.x);
  s.smem = size_t(threads) * size_t(ring_bytes_per_thread);
  const int per_sm = staged_blocks_per_sm(
      reinterpret_cast<const void*>(kernel), device, threads, ring_bytes_per_thread, [&](int t) {
        int n = 0;
        return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, t, s.smem) == cudaSuccess ? n : -1;
      });
  int sms = 0;
  if (per_sm < 1 || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return s;
  }
  const int64_t blocks = std::min<int64_t>(N, int64_t(per_sm) * sms);
  s.launch = {dim3(static_cast<unsigned>(blocks)), base.block, base.stream};
  s.ok = true;
  return s;
}

}  // namespace fastloss::cuda
