// Transparent-huge-page advice for a freshly allocated, still untouched CPU tensor that a kernel writes once
// (an N x C gradient): with 4 KiB pages its first touch costs one page fault per 4 KiB, which on a small CPU
// can take longer than the kernel itself. Only the 2 MiB-aligned interior is advised; the memory stays
// torch's allocation, and the advice is harmless where it is ignored. (Same rationale as row_losses.cpp.)
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastloss::cpu {

inline void advise_huge_pages_for(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = end & ~(kHuge - 1);
  if (hi > lo && hi - lo >= 16 * kHuge) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
}

}  // namespace fastloss::cpu
