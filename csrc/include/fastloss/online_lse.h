// Online log-sum-exp that keeps the "rest mass" apart from the maximum.
//
// State (m, r): m = max_k z_k, r = sum_{k != argmax} exp(z_k - m), so sum_k exp(z_k - m) = 1 + r.
// Keeping r instead of d = 1 + r is what prevents Softmax Collapse in fp32: when the target is the argmax the
// loss is log1p(r) and the target gradient -r/(1+r), both exact for r far below the unit roundoff, whereas
// fl(1 + r) = 1 would give exactly zero (research/stable_softmax.md, section 6.2).
// The empty state is (-inf, -1): 1 + r = 0 mass. -inf lanes never contribute and never produce NaN.
#pragma once
#include "fastloss/macros.h"

namespace fastloss {

template <typename T>
struct LseState {
  T m;  // running maximum
  T r;  // mass of every element but one copy of the maximum, relative to exp(m)

  FL_HD FL_INLINE static LseState empty() { return {neg_inf<T>(), T(-1)}; }

  // Add one element.
  FL_HD FL_INLINE void push(T z) {
    if (z > m) {
      // The old maximum and its rest become rest mass of the new maximum; exp(-inf) = 0 kills the empty state.
      r = (T(1) + r) * fl_exp(m - z);
      m = z;
    } else if (z != neg_inf<T>()) {  // NaN falls through here and poisons r, as in torch
      r += fl_exp(z - m);
    }
  }

  // Add N elements at once: one maximum per group, so the rescale (and its exp) happens once per group
  // instead of per element, and the common case is one exp per element. kFast: see fl_exp_if_fast.
  template <bool kFast, int N>
  FL_HD FL_INLINE void push_n(const T (&z)[N]) {
    T mx = z[0];
#pragma unroll
    for (int j = 1; j < N; ++j) mx = z[j] > mx ? z[j] : mx;
    if (mx > m) {
      // New maximum M: r' = (1 + r) e^{m - M} + sum_{z != M} e^{z - M} + (ties - 1), summed so that a tiny
      // rest is never added to 1 first.
      T acc = (T(1) + r) * fl_exp_if_fast<kFast>(m - mx), ties = T(0);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const bool top = z[j] == mx;
        acc += top ? T(0) : fl_exp_if_fast<kFast>(z[j] - mx);
        ties += top ? T(1) : T(0);
      }
      r = acc + (ties - T(1));
      m = mx;
    } else if (m != neg_inf<T>()) {
#pragma unroll
      for (int j = 0; j < N; ++j) r += fl_exp_if_fast<kFast>(z[j] - m);  // a tie adds exactly 1; NaN poisons r
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j)  // everything so far is -inf: only a NaN can change the state
        if (z[j] != z[j]) r = z[j];
    }
  }

  // Associative merge (warp shuffles, block reductions, cross-thread partials).
  FL_HD FL_INLINE void merge(const LseState& o) {
    if (o.m > m) {
      r = o.r + (T(1) + r) * fl_exp(m - o.m);
      m = o.m;
    } else if (o.m != neg_inf<T>()) {
      r += (T(1) + o.r) * fl_exp(o.m - m);
    }
  }

  // log(sum exp(z)) = m + log1p(r); -inf for an empty or all -inf row.
  FL_HD FL_INLINE T lse() const { return m + fl_log1p(r); }
};

}  // namespace fastloss
