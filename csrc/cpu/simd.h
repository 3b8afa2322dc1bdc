// Portable SIMD for the CPU row kernels: GCC/Clang vector extensions, 8 floats wide. The AVX2 build maps a
// vector to one ymm register, the baseline build to two xmm registers; the same source serves both. float64
// rows use width 1 (plain scalars), so one kernel body covers every dtype.
#pragma once
#include <cstdint>
#include <cstring>

#include "fastloss/macros.h"

namespace fastloss::cpu {

using vfloat = float __attribute__((vector_size(32)));
using vint = int32_t __attribute__((vector_size(32)));

template <typename T>
struct Simd {  // width 1: plain scalars (float64)
  static constexpr int W = 1;
  using V = T;
  static FL_INLINE V load(const T* p) { return *p; }
  static FL_INLINE void store(T* p, V v) { *p = v; }
  static FL_INLINE V splat(T x) { return x; }
  static FL_INLINE T sum(V v) { return v; }
  static FL_INLINE T max(V v) { return v; }
};

template <>
struct Simd<float> {
  static constexpr int W = 8;
  using V = vfloat;
  static FL_INLINE V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static FL_INLINE void store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  static FL_INLINE V splat(float x) { return V{} + x; }
  static FL_INLINE float sum(V v) {  // fixed pairwise order
    float a = (v[0] + v[4]) + (v[2] + v[6]), b = (v[1] + v[5]) + (v[3] + v[7]);
    return a + b;
  }
  static FL_INLINE float max(V v) {
    float m = v[0];
    for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
    return m;
  }
};

}  // namespace fastloss::cpu

namespace fastloss {
// fl_exp on a vector of floats: the same polynomial as the scalar host path.
template <>
FL_INLINE cpu::vfloat fl_exp<cpu::vfloat>(cpu::vfloat x) {
  return exp_poly(
      x, [](cpu::vfloat n) { return __builtin_convertvector(n, cpu::vint); },
      [](cpu::vint b) {
        cpu::vfloat f;
        std::memcpy(&f, &b, sizeof(f));
        return f;
      });
}
}  // namespace fastloss
