// Shared by g++ and nvcc: the torch-free maths in this folder is compiled for the CPU kernels and the CUDA
// kernels alike, so both devices run the same formulas.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FL_HD __host__ __device__
#define FL_INLINE __forceinline__
#else
#define FL_HD
#define FL_INLINE inline __attribute__((always_inline))
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace fastloss {

template <typename T>
FL_HD FL_INLINE T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Branch-free expf (Cody-Waite reduction + degree-6 polynomial, about 1 ulp). F is float or a GCC vector of
// floats (csrc/cpu/simd.h), so the CPU SIMD loops and the scalar host code evaluate the same polynomial;
// std::exp would stay a scalar libm call. Results below FLT_MIN flush to 0.
// to_int(F) -> integer vector of the same width, as_float(integer vector) -> F (bit cast).
template <typename F, typename ToInt, typename AsFloat>
FL_INLINE F exp_poly(F x, ToInt to_int, AsFloat as_float) {
  const F z0 = F{};  // 0 or a zero vector: the base for broadcasting constants
  const float hi = 88.3762626647949f, lo = -87.3365478515625f;
  F xc = x < lo ? z0 + lo : (x > hi ? z0 + hi : x);
  F n = xc * 1.44269504088896341f;
  n = (n + 12582912.0f) - 12582912.0f;  // round to nearest integer (|n| < 2^22)
  F r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  F p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  F y = p * as_float((to_int(n) + 127) << 23);
  y = x < lo ? z0 : y;
  return x > hi ? z0 + std::numeric_limits<float>::infinity() : y;  // NaN stays NaN through p
}

FL_INLINE float exp_poly(float x) {
  return exp_poly(
      x, [](float n) { return static_cast<int32_t>(n); },
      [](int32_t b) {
        float f;
        std::memcpy(&f, &b, sizeof(f));
        return f;
      });
}

// log1p(u) for u in [0, 1] in float (scalar or SIMD vector): the cephes logf polynomial on f = u, or on
// f = (u - 1) / 2 plus ln 2 above sqrt(2) - 1, so small u keeps every digit (no 1 + u rounding). About 2 ulp;
// vectorisable where libm's log1p is a scalar call.
template <typename V>
FL_HD FL_INLINE V log1p_unit(V u) {
  const auto hi = u > 0.41421356f;
  const V f = hi ? (u - 1.0f) * 0.5f : u;
  const V z = f * f;
  V p = f * 7.0376836292e-2f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const V r = f + (p * f * z - 0.5f * z);
  return hi ? r + 0.693147180559945f : r;
}

// exp and log1p in the accumulation type. On the device they are CUDA's accurate expf/exp; on the host the
// float exp is the vectorisable polynomial above.
template <typename T>
FL_HD FL_INLINE T fl_exp(T x) {
  return std::exp(x);
}
template <>
FL_HD FL_INLINE float fl_exp<float>(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  return exp_poly(x);
#endif
}
// The fast exps below are the device's: an FFMA or FMUL into the hardware ex2. The tests' CUDA emulator
// (tests/cuemu) defines FL_EMULATE_DEVICE_MATH to take the same paths on the host, with the same fp32
// roundings of the argument (the bias M log2(e) rounded once: the fast paths' largest error) and ex2.approx's
// error bound; the CPU kernels keep the accurate fl_exp.
#if defined(__CUDA_ARCH__) || defined(FL_EMULATE_DEVICE_MATH)
#define FL_DEVICE_MATH 1
#else
#define FL_DEVICE_MATH 0
#endif

// ex2.approx.ftz.f32: 2^v within about 2 ulp, results below FLT_MIN flushed to 0. The host form (the emulator's)
// is 2 ulp high everywhere: the bound's worst case for the sums the kernels take. (The tests pass with it
// 2 ulp low as well.)
FL_HD FL_INLINE float fl_ex2_approx_ftz(float v) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(v));
  return y;
#else
  const float y = std::exp2(v);
  return y < std::numeric_limits<float>::min() ? 0.f : y * (1.0f + 0x1p-22f);  // (a NaN stays NaN)
#endif
}

// exp where a few ulp do not matter (logits read from fp16/bf16): one multiply and the hardware ex2 on the
// device (~2 ulp near 0), flushing results below FLT_MIN to 0 as the host polynomial does (__expf would take
// the non-flushing ex2 and a range fix-up per call unless the whole build used -ftz=true); the accurate fl_exp
// everywhere else.
template <bool kFast, typename T>
FL_HD FL_INLINE T fl_exp_if_fast(T x) {
#if FL_DEVICE_MATH
  if constexpr (kFast && std::is_same_v<T, float>) return fl_ex2_approx_ftz(x * 1.44269504088896341f);
#endif
  return fl_exp(x);
}

// exp(z - M) for a lane z below a maximum M. Fast: one FFMA into the hardware ex2 (M * log2(e) is shared by all
// lanes); its absolute error ~|M| * 2^-24 in the exponent is far below the rounding of the 2-byte logits it
// serves. Otherwise the exact difference into fl_exp.
template <bool kFast, typename T>
FL_HD FL_INLINE T fl_exp_diff_if_fast(T z, T M) {
#if FL_DEVICE_MATH
  if constexpr (kFast && std::is_same_v<T, float>) {
    constexpr float kLog2e = 1.44269504088896341f;
    return fl_ex2_approx_ftz(fmaf(z, kLog2e, -M * kLog2e));
  }
#endif
  return fl_exp(z - M);
}

// exp(s * x - M) for a lane s * x strictly below a maximum M, s > 0 (the caller counts lanes equal to M
// apart). Fast: the scale rides in the FFMA's multiplier (s * log2(e) is shared by all lanes), so scaled lanes
// cost what unscaled ones do. The bias -M log2(e) overflows to +inf for M below about -2.36e38 (bf16 logits
// masked with finfo.min), where a -inf lane would give -inf + inf = NaN: clamped to FLT_MAX, every lane below
// such an M still gives 0, as it should (2-byte neighbours of M lie ~2^-9 |M| below it).
template <bool kFast, typename T>
FL_HD FL_INLINE T fl_exp_scaled_diff_if_fast(T x, T s, T M) {
#if FL_DEVICE_MATH
  if constexpr (kFast && std::is_same_v<T, float>) {
    constexpr float kLog2e = 1.44269504088896341f;
    return fl_ex2_approx_ftz(fmaf(x, s * kLog2e, fminf(-M * kLog2e, std::numeric_limits<float>::max())));
  }
#endif
  return fl_exp(s * x - M);
}

// max(a, b) ignoring a NaN operand (IEEE maxNum): one FMNMX on the device.
template <typename T>
FL_HD FL_INLINE T fl_fmax(T a, T b) {
  return std::fmax(a, b);
}

template <typename T>
FL_HD FL_INLINE T fl_log1p(T x) {
  return std::log1p(x);
}

}  // namespace fastloss
