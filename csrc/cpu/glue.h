// Helpers shared by the CPU glue files of the row-kernel families (row_losses.cpp, stable_softmax.cpp,
// sparsemax.cpp): instruction-set choice, dtype tag, target validation, the row loop and a page hint.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "row_kernels.h"  // DType

namespace fastloss::cpu {

// AVX2 + FMA kernels when this build has them and the CPU runs them (checked once). FASTLOSS_CPU_ISA=base forces
// the baseline kernels, which an AVX2 machine would otherwise never run (the tests use it).
inline bool use_avx2_kernels() {
#if defined(FL_HAVE_AVX2_KERNELS)
  static const bool yes = [] {
    const char* force = std::getenv("FASTLOSS_CPU_ISA");
    if (force != nullptr && std::strcmp(force, "base") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
#else
  return false;
#endif
}
// The kernel table `name` of the instruction set in use (namespaces base:: and avx2::, see CMakeLists.txt).
#if defined(FL_HAVE_AVX2_KERNELS)
#define FL_CPU_KERNELS(name) (use_avx2_kernels() ? avx2::name : base::name)
#else
#define FL_CPU_KERNELS(name) (base::name)
#endif

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    case at::kHalf: return DType::f16;
    default: return DType::bf16;
  }
}

// CPU contract: a target outside [0, C) that is not ignore_index raises IndexError before any kernel runs.
inline void check_targets(const at::Tensor& target, int64_t C, int64_t ignore_index) {
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t i = 0, n = target.numel(); i < n; ++i) {
    const int64_t y = t[i];
    TORCH_CHECK_INDEX(y == ignore_index || (y >= 0 && y < C), "target ", y, " at position ", i,
                      " is out of bounds for ", C, " classes (and is not ignore_index=", ignore_index, ")");
  }
}

// Runs kernel k over rows [0, N) in parallel chunks of about 32k elements (a.C classes a row).
template <typename Kernel, typename Args>
void run_rows(Kernel k, const Args& a, int64_t N) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(a.C, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) { k(a, begin, end); });
}

// A fresh (N, C) gradient is written exactly once; with 4 KiB pages its first touch costs one page fault per
// 4 KiB, which on a small CPU takes longer than the kernel itself. Asking for transparent huge pages on the
// 2 MiB-aligned interior of the (still untouched) allocation removes nearly all of them. The memory stays
// torch's allocation (its accounting and deleter are unchanged); the advice is harmless if ignored.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = end & ~(kHuge - 1);
  if (hi > lo && hi - lo >= 16 * kHuge) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
}

}  // namespace fastloss::cpu
