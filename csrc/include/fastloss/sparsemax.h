// Torch-free maths of the threshold normalisers sparsemax (alpha = 2) and entmax-1.5 (alpha = 1.5), shared by
// the CPU kernels (csrc/cpu/sparsemax.cpp) and the CUDA kernels (csrc/cuda/sparsemax.cu).
//
// Per row, with m = max_k z_k and u_k = (alpha - 1)(z_k - m) <= 0:
//   p_k = [u_k - t]_+^beta,   beta = 1 / (alpha - 1)  (1 for sparsemax, 2 for entmax-1.5),
// where the threshold t in [-1, 0) makes sum_k p_k = 1. Working relative to the maximum keeps the digits of p
// when |m| is large, and a -inf logit is just u = -inf (never in the support, never NaN).
//
// Threshold search, sort-free and exact: f(t) = sum_k [u_k - t]_+^beta - 1 is convex and decreasing, and
// f(-1) >= 0 (the maximum alone contributes 1). Newton's method started there climbs monotonically towards
// the root without passing it (a tangent of a convex function lies below it), so every iterate is a lower
// bound and the support S = {u > t} only shrinks. After each pass over S the root of the polynomial that f
// equals on S is taken in closed form; when it lies at or below min_S (u - t), S is the true support and
// that root is the exact threshold. For sparsemax the Newton step and the closed form coincide (Michelot's
// algorithm). A pass needs only (|S|, sum v, sum v^2, min v) over v = u - t > 0: a mergeable state, so the
// CPU (over a compacted candidate list) and the CUDA kernels (block reduction over the row) run the same
// loop, solve_threshold below.
#pragma once
#include "fastloss/macros.h"

namespace fastloss {

template <typename T>
struct SupportSums {
  T k;     // |S|, the number of v > 0
  T a;     // sum v
  T b;     // sum v^2
  T c;     // sum v^3
  T vmin;  // min v over S (+inf when S is empty)

  FL_HD FL_INLINE static SupportSums empty() { return {T(0), T(0), T(0), T(0), std::numeric_limits<T>::infinity()}; }
  // v = u - t; -inf (masked) and NaN lanes fail v > 0 and do not count.
  FL_HD FL_INLINE void push(T v) {
    if (v > T(0)) {
      k += T(1);
      a += v;
      b += v * v;
      c += v * v * v;
      vmin = v < vmin ? v : vmin;
    }
  }
  FL_HD FL_INLINE void merge(const SupportSums& o) {
    k += o.k;
    a += o.a;
    b += o.b;
    c += o.c;
    vmin = o.vmin < vmin ? o.vmin : vmin;
  }
};

// kEntmax = false: sparsemax; true: entmax-1.5. Everything that differs between the two lives here.
template <bool kEntmax>
struct Threshold {
  static constexpr double kScale = kEntmax ? 0.5 : 1.0;  // alpha - 1
  static constexpr double kAlpha = kEntmax ? 1.5 : 2.0;

  // p = v^beta for v = u - t > 0.
  template <typename T>
  FL_HD FL_INLINE static T power(T v) {
    if constexpr (kEntmax) return v * v;
    else return v;
  }
  // p_k from v_k = u_k - t: 0 off the support (also for masked lanes), NaN stays NaN.
  template <typename T>
  FL_HD FL_INLINE static T prob(T v) {
    return v > T(0) ? power(v) : (v == v ? T(0) : v);
  }
  // Weight of the activation's backward, p^(2 - alpha): the support indicator for sparsemax, sqrt(p) = v for
  // entmax-1.5; dz = w * g - (<w, g> / sum w) * w.
  template <typename T>
  FL_HD FL_INLINE static T weight(T p) {
    if constexpr (kEntmax) return std::sqrt(p);
    else return p > T(0) ? T(1) : (p == p ? T(0) : p);
  }

  // One step from the sums over S at a lower bound t. Returns true with `delta` = tau - t when S is the
  // true support (exact), else false with `delta` = the Newton step (> 0, or NaN for an empty/NaN row).
  template <typename T>
  FL_HD FL_INLINE static bool step(const SupportSums<T>& s, T& delta) {
    if (!(s.k > T(0))) {
      delta = std::numeric_limits<T>::quiet_NaN();
      return false;
    }
    if constexpr (!kEntmax) {
      delta = (s.a - T(1)) / s.k;  // sum (v - delta) = 1 on S
      return delta <= s.vmin;
    } else {
      // sum (v - delta)^2 = 1 on S: k delta^2 - 2 a delta + (b - 1) = 0, smaller root in the cancellation-free
      // form (b - 1) / (a + sqrt(a^2 - k (b - 1))); b - 1 = f(t) >= 0 at a lower bound.
      const T f = s.b - T(1);
      const T disc = s.a * s.a - s.k * f;
      if (disc >= T(0)) {
        delta = f / (s.a + std::sqrt(disc));
        if (delta <= s.vmin) return true;
      }
      delta = f / (T(2) * s.a);  // Newton: f'(t) = -2 sum v
      return false;
    }
  }

  // Fenchel-Young loss from the final sums over S at the exact t: with c = sum p^alpha = sum v^(beta + 1),
  //   L = <p - e_y, z> + (1 - sum p^alpha) / (alpha (alpha - 1))
  //     = (c + t - u_y) / (alpha - 1) + (1 - c) / (alpha (alpha - 1)),
  // using sum p = 1 and p v = p (u - t). u_y = -inf (masked target) gives +inf, never NaN.
  template <typename T>
  FL_HD FL_INLINE static T loss(const SupportSums<T>& s, T t, T u_y) {
    const T c = kEntmax ? s.c : s.b;
    return (c + t - u_y) / T(kScale) + (T(1) - c) / T(kAlpha * kScale);
  }
};

// Newton iterations from t = -1 until the support is exact. reduce_at(t) returns the merged SupportSums of
// v = u - t over the row (every CUDA thread of a block receives the same sums, so all take the same branch).
// Returns the threshold t; `converged` is false when max_iter passes ran out (rounding stalls or adversarial
// rows) or the row has no finite maximum, and t is then the last lower bound (NaN for a NaN row).
template <bool kEntmax, typename T, typename ReduceAt>
FL_HD FL_INLINE T solve_threshold(ReduceAt&& reduce_at, int max_iter, bool& converged) {
  T t = T(-1);
  converged = false;
  for (int it = 0; it < max_iter; ++it) {
    const SupportSums<T> s = reduce_at(t);
    T delta;
    if (Threshold<kEntmax>::step(s, delta)) {
      converged = true;
      return t + delta;
    }
    if (!(delta > T(0))) return delta == delta ? t : delta;  // no progress left in this precision, or NaN
    t += delta;
  }
  return t;
}

// Per-row view of the saved statistics (m, t): p_k of a raw logit x_k. A row without a finite maximum (all
// lanes -inf) has p = 0 everywhere.
template <bool kEntmax, typename T>
struct ThresholdRow {
  T m, t;
  bool empty;
  FL_HD FL_INLINE static ThresholdRow make(T m, T t) { return {m, t, m == neg_inf<T>()}; }
  FL_HD FL_INLINE T u(T x) const { return T(Threshold<kEntmax>::kScale) * (x - m); }
  FL_HD FL_INLINE T prob(T x) const { return empty ? T(0) : Threshold<kEntmax>::prob(u(x) - t); }
};

// Max that lets a NaN win, so a NaN row stays NaN instead of being solved without the NaN.
template <typename T>
FL_HD FL_INLINE T nan_max(T m, T x) {
  return (x > m || x != x) ? x : m;
}

}  // namespace fastloss
