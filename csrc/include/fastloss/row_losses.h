// Torch-free per-row maths of the row-loss engine (logits N x C, class dimension last), shared by the CPU
// kernels (csrc/cpu/row_losses.cpp) and the CUDA kernels (csrc/cuda/row_losses.cu).
//
// Every loss has the same three parts:
//   pre-map   z = premap(x)            (logit scale, then softcap; the target margin is subtracted after)
//   row state merged over the row      (LseState for the softmax family, SphericalSums for the spherical family)
//   finalise  -> row loss + saved statistics;  pointwise backward dL/dx_k from (x_k, statistics).
#pragma once
#include "fastloss/macros.h"
#include "fastloss/online_lse.h"

namespace fastloss {

// ---------------------------------------------------------------------------------------------------------
// Cross-entropy family (softmax normaliser)
// ---------------------------------------------------------------------------------------------------------

// Pointwise pre-map applied to every logit, in this order: z = logit_scale * x, then z = c * tanh(z / c).
// tanh and its derivative come from one expm1 of -2|u|, so dz/dx = scale * sech^2(u) stays accurate where
// tanh saturates (1 - tanh^2 would cancel to 0 in fp32 there).
template <typename T>
struct PreMap {
  T scale;       // logit_scale
  T softcap;     // c > 0, or 0 for none
  T inv_softcap; // 1 / c (0 when softcap is off)

  // kSoftcap = false promises softcap == 0, so a kernel's inner loop carries no softcap code at all.
  template <bool kSoftcap = true>
  FL_HD FL_INLINE void value_and_grad(T x, T& z, T& dz) const {
    const T s = scale * x;
    if (kSoftcap && softcap > T(0)) {
      const T u = s * inv_softcap;
      const T em = std::expm1(T(-2) * std::fabs(u));  // e^{-2|u|} - 1, in (-1, 0]
      const T den = T(2) + em;
      z = std::copysign(softcap * (-em / den), u);
      dz = scale * (T(4) * (T(1) + em) / (den * den));
    } else {
      z = s;
      dz = scale;
    }
  }
  template <bool kSoftcap = true>
  FL_HD FL_INLINE T value(T x) const {
    T z, dz;
    value_and_grad<kSoftcap>(x, z, dz);
    return z;
  }
  FL_HD FL_INLINE T operator()(T x) const { return value(x); }
};

// Row-level results of the cross-entropy forward. parts are what the op returns per row; the Python side
// combines them into the requested loss (so reductions, smoothing weights and the lse^2 penalty stay plain
// differentiable torch ops, and the op's backward receives dL/dparts).
template <typename T>
struct CeParts {
  T nll;     // w_y * (lse - z_y)                   (0 on ignored rows)
  T smooth;  // sum_k w_k (lse - z_k)                (0 on ignored rows or when smoothing is off)
  T lse;     // log sum_k exp(z_k)                   (every row)
};

// nll from the state: (m - z_y) + log1p(r) is exact when the target is the argmax (m - z_y = 0), which is
// the Softmax Collapse regime.
template <typename T>
FL_HD FL_INLINE CeParts<T> ce_finalize(const LseState<T>& st, T z_target, T w_target, T sum_wz, T sum_w,
                                       bool ignored, bool with_smoothing) {
  CeParts<T> out;
  out.lse = st.lse();
  if (ignored) {
    out.nll = T(0);
    out.smooth = T(0);
    return out;
  }
  out.nll = w_target * ((st.m - z_target) + fl_log1p(st.r));
  out.smooth = with_smoothing ? sum_w * out.lse - sum_wz : T(0);
  return out;
}

// Per-row constants of the backward: dL/dz_k = ga (p_k - [k=y]) + gp p_k - gw w_k, where
//   ga = dL/dnll * w_y,  gp = dL/dsmooth * sum_w + dL/dlse,  gw = dL/dsmooth.
// z_target is the forward's own value of the (pre-mapped, margin-shifted) target logit, saved in the stats,
// so the argmax test below agrees with the forward bit for bit whatever the compiler contracts.
template <typename T>
struct CeGradRow {
  T m, r, inv_d;   // state and 1 / (1 + r)
  T ga, gp, gw;
  T target_pm1;    // p_y - 1, computed without cancellation

  FL_HD FL_INLINE static CeGradRow make(T m, T r, T g_nll, T g_smooth, T g_lse, T w_target, T sum_w,
                                        T z_target, bool ignored) {
    CeGradRow g;
    g.m = m;
    g.r = r;
    g.inv_d = T(1) / (T(1) + r);
    if (m == neg_inf<T>()) {  // all lanes masked: p = 0 everywhere instead of exp(-inf - -inf) = NaN
      g.m = T(0);
      g.inv_d = T(0);
    }
    g.ga = ignored ? T(0) : g_nll * w_target;
    g.gw = ignored ? T(0) : g_smooth;
    g.gp = g.gw * sum_w + g_lse;
    // Target is the argmax: p_y - 1 = -r / (1 + r) exactly; otherwise p_y <= 1/2 and the difference is safe.
    g.target_pm1 = (z_target >= m) ? -r * g.inv_d : fl_exp(z_target - m) * g.inv_d - T(1);
    return g;
  }

  // dL/dz_k for a non-target class (the -inf lane gives p = 0); V is T or a SIMD vector of T.
  template <bool kFast = false, typename V>
  FL_HD FL_INLINE V other(V z, V w) const {
    V p = fl_exp_if_fast<kFast>(z - m) * inv_d;
    return (ga + gp) * p - gw * w;
  }
  // dL/dz_y for the target class.
  FL_HD FL_INLINE T target(T z, T w) const {
    T p = fl_exp(z - m) * inv_d;
    return ga * target_pm1 + gp * p - gw * w;
  }
};

// ---------------------------------------------------------------------------------------------------------
// Spherical family: statistics s = sum o, q = sum o^2 taken relative to a row value K (shifted sums), so
// the variance keeps its digits when |mean| >> std (no q/C - mu^2 on raw values).
// ---------------------------------------------------------------------------------------------------------

template <typename T>
struct SphericalSums {
  T s;  // sum_k (o_k - K)
  T q;  // sum_k (o_k - K)^2
  FL_HD FL_INLINE void push(T y) {
    s += y;
    q += y * y;
  }
  FL_HD FL_INLINE void merge(const SphericalSums& o) {
    s += o.s;
    q += o.q;
  }
};

template <typename T>
FL_HD FL_INLINE T softplus(T t) {
  return (t > T(0) ? t : T(0)) + fl_log1p(fl_exp(-std::fabs(t)));
}
template <typename T>
FL_HD FL_INLINE T sigmoid(T t) {
  if (t >= T(0)) return T(1) / (T(1) + fl_exp(-t));
  T e = fl_exp(t);
  return e / (T(1) + e);
}

// Saved per-row statistics of the Z-loss: d = mean - K and sigma (population std). A constant row
// (sigma = 0) has no z-score: the convention is z = 0 there, loss softplus(a b)/a and gradient 0.
template <typename T>
struct ZLossRow {
  T d, sigma, inv_sigma;  // inv_sigma = 1 / sigma, or 0 for a constant row

  FL_HD FL_INLINE static ZLossRow from_saved(T d, T sigma) {
    return {d, sigma, sigma == T(0) ? T(0) : T(1) / sigma};
  }
  FL_HD FL_INLINE static ZLossRow from_sums(const SphericalSums<T>& st, int64_t C) {
    T inv_c = T(1) / T(C);
    T d = st.s * inv_c;
    T var = st.q * inv_c - d * d;
    return from_saved(d, var > T(0) ? std::sqrt(var) : T(0));
  }
  // z-score of o given its shifted value y = o - K; V is T or a SIMD vector of T.
  template <typename V>
  FL_HD FL_INLINE V zscore(V y) const {
    return (y - d) * inv_sigma;
  }
};

// loss = softplus(a (b - z_c)) / a
template <typename T>
FL_HD FL_INLINE T zloss_value(T zc, T a, T b) {
  return softplus(a * (b - zc)) / a;
}

// dL/do_k = (g / (C sigma)) (1 + z_c z_k) - (g / sigma) [k = c],  g = sigmoid(a (b - z_c)) * upstream.
template <typename T>
struct ZLossGradRow {
  T zc, coef, target_coef;  // coef = g / (C sigma), target_coef = g / sigma
  ZLossRow<T> row;

  FL_HD FL_INLINE static ZLossGradRow make(const ZLossRow<T>& row, T yc, T a, T b, T upstream, int64_t C,
                                           bool ignored) {
    ZLossGradRow g;
    g.row = row;
    g.zc = row.zscore(yc);
    if (ignored || row.sigma == T(0)) {  // NaN sigma still propagates
      g.coef = T(0);
      g.target_coef = T(0);
    } else {
      T gs = sigmoid(a * (b - g.zc)) * upstream;
      g.target_coef = gs * row.inv_sigma;
      g.coef = g.target_coef / T(C);
    }
    return g;
  }
  template <typename V>
  FL_HD FL_INLINE V other(V y) const {
    return coef * (T(1) + zc * row.zscore(y));
  }
  FL_HD FL_INLINE T target(T y) const { return other(y) - target_coef; }
};

}  // namespace fastloss
