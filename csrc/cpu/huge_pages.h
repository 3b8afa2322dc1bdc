// Allocation hint shared by the CPU glue files (row_losses.cpp, sparsemax.cpp, stable_softmax.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastloss::cpu {

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
