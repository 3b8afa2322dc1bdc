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

  // Add N elements at once: one maximum per group, so the common case is one exp per element plus one rescale
  // exp per group. Branch-free on purpose: the threads of a GPU warp meet new maxima at different groups, and a
  // branch per case would make the warp run both paths' exps. kFast: see fl_exp_if_fast.
  template <bool kFast, int N>
  FL_HD FL_INLINE void push_n(const T (&z)[N]) {
    T mx = z[0];  // NaN lanes are skipped here (a pack of NaN only gives NaN) and poison the rest below
#pragma unroll
    for (int j = 1; j < N; ++j) mx = fl_fmax(mx, z[j]);
    push_scaled_n<kFast>(z, mx, T(1));
  }

  // push_n of the N lanes z_j = s * x_j for a scale s > 0, given gx = max_j x_j (NaN lanes skipped, as fl_fmax
  // does). Scaling keeps the order, so the group's maximum is s * gx and a lane ties with it exactly when
  // x_j == gx: a kernel takes the maximum of the raw (even packed 2-byte) inputs and folds s into the exp's
  // multiply instead of scaling every lane. (Distinct 2-byte x stay distinct after an fp32 scaling short of
  // overflow or underflow. Past those, lanes that tie only after scaling count their exp instead of exactly 1:
  // about 1 on underflow, 0 when s * x overflows to M = +inf, where the lse is +inf either way.)
  template <bool kFast, int N>
  FL_HD FL_INLINE void push_scaled_n(const T (&x)[N], T gx, T s) {
    const T gz = s * gx;
    const T M = gz > m ? gz : m;
    if (M == neg_inf<T>()) {  // everything so far is -inf: only a NaN can change the state
#pragma unroll
      for (int j = 0; j < N; ++j)
        if (x[j] != x[j]) r = x[j];
      return;
    }
    // Lanes equal to M (the new maximum, or ties with the old one) count exactly 1 each; the others' masses are
    // summed apart, so a tiny rest is never added to 1 first. No lane ties when the old maximum is larger
    // (tie = NaN matches nothing); NaN lanes never tie and poison `other`.
    // P partial sums each: short dependency chains for wide groups.
    const T tie = gz == M ? gx : std::numeric_limits<T>::quiet_NaN();
    constexpr int P = N % 4 == 0 ? 4 : 1;
    T part_other[P], part_ties[P];
#pragma unroll
    for (int q = 0; q < P; ++q) part_other[q] = part_ties[q] = T(0);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const T e = fl_exp_scaled_diff_if_fast<kFast>(x[j], s, M);  // unused for the lanes equal to M
      if (x[j] == tie) {
        part_ties[j % P] += T(1);
      } else {
        part_other[j % P] += e;
      }
    }
    T other = part_other[0], ties = part_ties[0];
#pragma unroll
    for (int q = 1; q < P; ++q) {
      other += part_other[q];
      ties += part_ties[q];
    }
    // New maximum: r' = (1 + r) e^{m - M} + sum_{z != M} e^{z - M} + (ties - 1); the empty state gives 0 * 0.
    const T grown = (T(1) + r) * fl_exp_if_fast<kFast>(m - M) + other + (ties - T(1));
    r = gz > m ? grown : r + (other + ties);
    m = M;
  }

  // Associative merge (warp shuffles, block reductions, cross-thread partials).
  FL_HD FL_INLINE void merge(const LseState& o) {
    if (o.m > m) {
      r = o.r + (T(1) + r) * fl_exp(m - o.m);
      m = o.m;
    } else if (o.m != neg_inf<T>()) {
      r += (T(1) + o.r) * fl_exp(o.m - m);
    } else if (o.r != o.r) {  // a part of NaN (and -inf) only: its max is -inf, yet it must poison the row
      r = o.r;
    }
  }

  // log(sum exp(z)) = m + log1p(r); -inf for an empty or all -inf row.
  FL_HD FL_INLINE T lse() const { return m + fl_log1p(r); }
};

}  // namespace fastloss
