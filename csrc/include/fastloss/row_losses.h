// Torch-free per-row maths of the row-loss engine (logits N x C, class dimension last), shared by the CPU
// kernels (csrc/cpu/row_losses.cpp) and the CUDA kernels (csrc/cuda/row_losses.cu).
//
// Every loss has the same three parts:
//   pre-map   z = premap(x)            (logit scale, then softcap; the target margin is subtracted after)
//   row state merged over the row      (LseState for the softmax family; the spherical family is in spherical.h)
//   finalise  -> row loss + saved statistics;  pointwise backward dL/dx_k from (x_k, statistics).
#pragma once
#include "fastloss/macros.h"
#include "fastloss/online_lse.h"

namespace fastloss {

// ---------------------------------------------------------------------------------------------------------
// Cross-entropy family (softmax normaliser)
// ---------------------------------------------------------------------------------------------------------

// Pointwise pre-map applied to every logit, in this order: z = logit_scale * x, then z = c * tanh(z / c).
// tanh comes from expm1(-2|u|) and its derivative from exp(-2|u|), so dz/dx = scale * sech^2(u) keeps its
// digits where tanh saturates (1 - tanh^2 or 1 + expm1 would cancel in fp32 there).
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
      const T v = T(-2) * std::fabs(u);
      const T em = std::expm1(v);  // e^v - 1 in (-1, 0]: tanh without cancellation at small |u|
      const T den = T(2) + em;
      z = std::copysign(softcap * (-em / den), u);
      dz = scale * (T(4) * std::exp(v) / (den * den));  // e^v itself: 1 + em would cancel at large |u|
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
  T ga_target_pm1;  // ga * (p_y - 1), rounded once

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
    g.ga_target_pm1 = g.ga * g.target_pm1;
    return g;
  }

  // dL/dz_k for a non-target class (the -inf lane gives p = 0); V is T or a SIMD vector of T.
  template <bool kFast = false, typename V>
  FL_HD FL_INLINE V other(V z, V w) const {
    V p = fl_exp_if_fast<kFast>(z - m) * inv_d;
    return (ga + gp) * p - gw * w;
  }
  // dL/dz_y for the target class. The fmas are explicit: otherwise the compiler contracts this sum differently
  // in different kernels (seen in the PTX of the CUDA backward's two walks), and their results differ by an ulp.
  FL_HD FL_INLINE T target(T z, T w) const {
    T p = fl_exp(z - m) * inv_d;
    return std::fma(-gw, w, std::fma(gp, p, ga_target_pm1));
  }
};

// ---------------------------------------------------------------------------------------------------------
// Cross-entropy to a target distribution (torch's floating-point "probability" targets)
// ---------------------------------------------------------------------------------------------------------
// With u_k = w_k t_k per class, nll = sum_k u_k (lse - z_k) = S log1p(r) + A, S = sum_k u_k and
// A = sum_k u_k (m - z_k), both next to the online state (m, r). For t, w >= 0 every term of A is >= 0, so
// the loss keeps its digits when the target mass sits on the maximum (the Softmax Collapse regime): the form
// S lse - sum u z would cancel. A is kept relative to the running maximum and re-based when it grows. A class
// with u_k = 0 adds nothing, also where z_k = -inf (0 log 0 = 0; torch's 0 * -inf gives NaN there); u_k > 0
// on a -inf class makes the loss +inf.
template <typename T>
struct ProbSums {
  T S;  // sum u
  T A;  // sum u (m - z), m the maximum this record is relative to

  // The record relative to m_old, re-based to a maximum m >= m_old.
  FL_HD FL_INLINE void rebase(T m_old, T m) {
    if (S != T(0) && m != m_old) A += S * (m - m_old);
  }
  // Adds one class (u, z) below or at the maximum m (m already includes z).
  FL_HD FL_INLINE void add(T u, T z, T m) {
    A += u == T(0) ? T(0) : u * (z == neg_inf<T>() ? std::numeric_limits<T>::infinity() : m - z);
    S += u;
  }
  // Merges o (relative to m_o) into this record (relative to m_self); both end relative to m = max.
  FL_HD FL_INLINE void merge(const ProbSums& o, T m_self, T m_o, T m) {
    rebase(m_self, m);
    ProbSums b = o;
    b.rebase(m_o, m);
    S += b.S;
    A += b.A;
  }
  // nll of the row from the merged state.
  FL_HD FL_INLINE T nll(const LseState<T>& st) const {
    if (st.m == neg_inf<T>()) return A;  // all classes masked: 0, or +inf with target mass on them
    return (S == T(0) ? T(0) : S * fl_log1p(st.r)) + A;
  }
};

// Per-row constants of the probability-target backward: dL/dz_k = gn (S p_k - u_k) + gs (sum_w p_k - w_k)
// + gl p_k with (gn, gs, gl) = dL/d(nll, smooth, lse). On a maximal lane S p_k - u_k is taken as
// (S - u_k) p_k + u_k (p_k - 1) with p_k - 1 = -r / (1 + r), so a one-hot target on the maximum keeps the
// exact gradient -r / (1 + r) that fl(p_k) - 1 would round to 0.
template <typename T>
struct ProbGradRow {
  T m, r, inv_d;
  T gn, gs, S;
  T gp;        // gn S + gs sum_w + gl: the coefficient of p_k
  T gp_other;  // gs sum_w + gl
  T top_pm1;   // p_k - 1 on a maximal lane: -r / (1 + r)

  FL_HD FL_INLINE static ProbGradRow make(T m, T r, T S, T g_nll, T g_smooth, T g_lse, T sum_w) {
    ProbGradRow g;
    g.m = m;
    g.r = r;
    g.inv_d = T(1) / (T(1) + r);
    if (m == neg_inf<T>()) {  // all lanes masked: p = 0 everywhere
      g.m = T(0);
      g.inv_d = T(0);
    }
    g.gn = g_nll;
    g.gs = g_smooth;
    g.S = S;
    g.gp_other = g_smooth * sum_w + g_lse;
    g.gp = g_nll * S + g.gp_other;
    g.top_pm1 = -r * g.inv_d;
    return g;
  }
  // dL/dz_k for logit z, u = w t and class weight w (V is T or a SIMD vector of T).
  template <bool kFast = false, typename V>
  FL_HD FL_INLINE V grad(V z, V u, V w) const {
    const V p = fl_exp_if_fast<kFast>(z - m) * inv_d;
    const V plain = gp * p - (gn * u + gs * w);
    const V top = gn * ((S - u) * p + u * top_pm1) + gp_other * p - gs * w;
    return z >= m ? top : plain;
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

}  // namespace fastloss
