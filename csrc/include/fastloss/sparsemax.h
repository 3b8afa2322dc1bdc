// Torch-free maths of the threshold normalisers sparsemax (alpha = 2) and entmax-1.5 (alpha = 1.5), shared by
// the CPU kernels (csrc/cpu/sparsemax_kernels.cpp) and the CUDA kernels (csrc/cuda/sparsemax.cu).
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
// equals on S is taken in closed form; when it lies at or below min_S u, S is the true support and that root
// is the exact threshold. For sparsemax the Newton step and the closed form coincide (Michelot's algorithm).
//
// A pass sums the moments of w = u - c over S about a centre c fixed before the pass: c = 0 (the maximum)
// first, then the previous pass's mean of S. The closed form needs the variance of S, and moments about a
// point near the mean keep it accurate when S is large and nearly flat (moments of u - t would cancel there:
// all u - t are close to 1 at t = -1). The sums are a mergeable state, so the CPU (over a compacted candidate
// list) and the CUDA kernels (block reduction over the row) run the same loop, solve_threshold below.
#pragma once
#include "fastloss/macros.h"

namespace fastloss {

template <typename T>
struct SupportSums {
  T k;     // |S|
  T s1;    // sum w
  T s2;    // sum w^2
  T s3;    // sum w^3
  T wmin;  // min w over S (+inf when S is empty)

  FL_HD FL_INLINE static SupportSums empty() {
    return {T(0), T(0), T(0), T(0), std::numeric_limits<T>::infinity()};
  }
  // An element u counts when u > t (so -inf and NaN lanes never do); w = u - c.
  FL_HD FL_INLINE void push(T u, T t, T c) {
    if (u > t) {
      const T w = u - c;
      k += T(1);
      s1 += w;
      s2 += w * w;
      s3 += w * w * w;
      wmin = w < wmin ? w : wmin;
    }
  }
  FL_HD FL_INLINE void merge(const SupportSums& o) {
    k += o.k;
    s1 += o.s1;
    s2 += o.s2;
    s3 += o.s3;
    wmin = o.wmin < wmin ? o.wmin : wmin;
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

  // Root (relative to the centre c) of the polynomial sum_S (w - r)^beta = 1 that f equals when S is the
  // support; false when it has none (then S is not the support). sparsemax: r = (s1 - 1) / k; entmax-1.5: the
  // smaller root mean - sqrt(1/k - var), as in Peters et al. (2019).
  template <typename T>
  FL_HD FL_INLINE static bool closed_form(const SupportSums<T>& s, T& r) {
    if constexpr (!kEntmax) {
      r = (s.s1 - T(1)) / s.k;
      return true;
    } else {
      const T mean = s.s1 / s.k;
      T var = s.s2 / s.k - mean * mean;
      var = var > T(0) ? var : T(0);
      const T d = T(1) / s.k - var;
      r = mean - std::sqrt(d > T(0) ? d : T(0));
      return d >= T(0);
    }
  }

  // One step from the sums over S = {u > t} about the centre c, at a lower bound t. Returns true with `t` set
  // to the exact threshold when S is the support; otherwise moves t by one Newton step (staying a lower
  // bound) and c to the mean of S, and returns false. An empty or NaN S gives t = NaN.
  template <typename T>
  FL_HD FL_INLINE static bool step(const SupportSums<T>& s, T& t, T& c) {
    if (!(s.k > T(0))) {
      t = std::numeric_limits<T>::quiet_NaN();
      return false;
    }
    T r;
    if (closed_form(s, r) && r <= s.wmin) {
      t = c + r;
      return true;
    }
    if constexpr (!kEntmax) {
      t = c + r;  // Michelot: the closed form on a too-large S is itself a lower bound
    } else {
      // f(t) = sum (u - t)^2 - 1 and -f'(t) / 2 = sum (u - t), from the moments about c (e = c - t >= 0).
      const T e = c - t;
      const T a = s.s1 + s.k * e;
      const T f = s.s2 + e * (T(2) * s.s1 + s.k * e) - T(1);
      t += f / (T(2) * a);
    }
    c += s.s1 / s.k;
    return false;
  }

  // Fenchel-Young loss from the sums over S about c = t at the exact t: with q = sum p^alpha = sum v^(beta+1),
  //   L = <p - e_y, z> + (1 - sum p^alpha) / (alpha (alpha - 1))
  //     = (q + t - u_y) / (alpha - 1) + (1 - q) / (alpha (alpha - 1)),
  // using sum p = 1 and p u = p (v + t). u_y = -inf (masked target) gives +inf, never NaN.
  template <typename T>
  FL_HD FL_INLINE static T loss(const SupportSums<T>& s, T t, T u_y) {
    const T q = kEntmax ? s.s3 : s.s2;
    return (q + t - u_y) / T(kScale) + (T(1) - q) / T(kAlpha * kScale);
  }
};

// Newton iterations from t = -1 until the support is exact. reduce_at(t, c) returns the merged SupportSums over
// {u > t} of w = u - c (every CUDA thread of a block receives the same sums, so all take the same branch).
// Returns the threshold t; `converged` is false when max_iter passes ran out or progress stalled in this
// precision (t is then the last lower bound), or the row is NaN (t = NaN).
template <bool kEntmax, typename T, typename ReduceAt>
FL_HD FL_INLINE T solve_threshold(ReduceAt&& reduce_at, int max_iter, bool& converged) {
  T t = T(-1), c = T(0);
  converged = false;
  for (int it = 0; it < max_iter; ++it) {
    const T t_old = t;
    if (Threshold<kEntmax>::step(reduce_at(t, c), t, c)) {
      converged = true;
      return t;
    }
    if (!(t > t_old)) return t == t ? t_old : t;  // no progress left in this precision, or NaN
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
