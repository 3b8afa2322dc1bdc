// Torch-free maths of the stable-softmax family, shared by csrc/cpu/stable_softmax*.cpp and
// csrc/cuda/stable_softmax.cu.
//
// Additive normalisers (StableMax, Taylor, softplus): p_k = phi(z_k) / S with S = sum_k phi(z_k), no maximum.
//   The row state keeps the target's phi apart from the rest mass R = sum_{k != y} phi(z_k), so
//   loss = log(S) - log phi(z_y) = log1p(R / phi_y) stays exact when the target dominates (the additive twin of
//   the rest-mass log-sum-exp in online_lse.h). The target logit is margin-shifted (SM-Taylor) before phi.
//   -inf logits are masked classes for every kind (phi = 0, gradient 0), also for Taylor where t_n(-inf) = inf.
// Multi-label (ZLPR, decoupled softmax): two online log-sum-exp states over negatives / positives.
#pragma once
#include "fastloss/macros.h"
#include "fastloss/online_lse.h"
#include "fastloss/row_losses.h"

namespace fastloss {

enum class AddKind : int { stablemax = 0, taylor = 1, softplus = 2 };
enum class MlKind : int { zlpr = 0, dexml = 1 };

constexpr int kMaxTaylorOrder = 10;

// Runtime options of the additive kernels (the Taylor order is a runtime loop bound).
template <typename T>
struct AddOpts {
  int order;  // Taylor order n (even, 2..10)
  FL_HD static AddOpts make(int order) { return AddOpts{order}; }
};

// t_n(z) = sum_{i <= n} z^i / i! by Horner: 1 + z (1 + z/2 (1 + ... (1 + z/n))). V is T or a SIMD vector.
// The steps are unrolled with their 1/i as constants and entered at step n (one jump per call): a table of
// 1/i indexed by a runtime counter is loaded at every step, on the device from local memory.
template <typename T, typename V>
FL_HD FL_INLINE V taylor_poly(V z, int n) {
  static_assert(kMaxTaylorOrder == 10, "one case per order below");
  V p = V{} + T(1);
#define FL_HORNER_STEP(i)             \
  case i:                             \
    p = z * (p * (T(1) / T(i))) + T(1); \
    [[fallthrough]];
  switch (n) {
    FL_HORNER_STEP(10)
    FL_HORNER_STEP(9)
    FL_HORNER_STEP(8)
    FL_HORNER_STEP(7)
    FL_HORNER_STEP(6)
    FL_HORNER_STEP(5)
    FL_HORNER_STEP(4)
    FL_HORNER_STEP(3)
    FL_HORNER_STEP(2)
    FL_HORNER_STEP(1)
    default:
      break;
  }
#undef FL_HORNER_STEP
  return p;
}

// phi and phi' per kind, on scalars or SIMD vectors (comparisons select lane-wise). -inf lanes give 0.
template <AddKind K>
struct AddPhi {
  template <typename V, typename T>
  FL_HD FL_INLINE static V phi(V z, const AddOpts<T>& o) {
    if constexpr (K == AddKind::stablemax) {
      return z >= T(0) ? z + T(1) : T(1) / (T(1) - z);  // 1/(1 + inf) = 0 on -inf lanes
    } else if constexpr (K == AddKind::taylor) {
      return z == neg_inf<T>() ? V{} : taylor_poly<T>(z, o.order);
    } else {
      const V a = z < T(0) ? -z : z;
      const V e = fl_exp(-a);  // overflow-safe softplus max(z, 0) + log1p(e^{-|z|}); 0 at -inf
      if constexpr (std::is_same_v<T, float>) return (z > T(0) ? z : V{}) + log1p_unit(e);
      else return (z > T(0) ? z : V{}) + fl_log1p(e);
    }
  }
  template <typename V, typename T>
  FL_HD FL_INLINE static V dphi(V z, const AddOpts<T>& o) {
    if constexpr (K == AddKind::stablemax) {
      const V s = T(1) / (T(1) - z);
      return z >= T(0) ? V{} + T(1) : s * s;
    } else if constexpr (K == AddKind::taylor) {
      return z == neg_inf<T>() ? V{} : taylor_poly<T>(z, o.order - 1);
    } else {
      const V e = fl_exp(z < T(0) ? z : -z);  // e^{-|z|}
      return z >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);  // sigmoid
    }
  }
  // log phi(z), accurate where phi is tiny or huge (scalar, used once per row).
  template <typename T>
  FL_HD FL_INLINE static T log_phi(T z, const AddOpts<T>& o) {
    if constexpr (K == AddKind::stablemax) {
      return z >= T(0) ? fl_log1p(z) : -fl_log1p(-z);  // sign(z) log1p|z|
    } else if constexpr (K == AddKind::taylor) {
      return std::log(phi(z, o));
    } else {
      // softplus(z) = e^z (1 - e^z/2 + ...) for z << 0: log = z - e^z/2 to O(e^{2z})
      return z < T(-20) ? z - T(0.5) * std::exp(z) : std::log(phi(z, o));
    }
  }
  // phi'(z) / phi(z) (scalar).
  template <typename T>
  FL_HD FL_INLINE static T dlog_phi(T z, const AddOpts<T>& o) {
    if constexpr (K == AddKind::stablemax) {
      return T(1) / (T(1) + std::fabs(z));
    } else if constexpr (K == AddKind::taylor) {
      return z == neg_inf<T>() ? T(0) : taylor_poly<T>(z, o.order - 1) / taylor_poly<T>(z, o.order);
    } else {
      return z < T(-20) ? T(1) - T(0.5) * std::exp(z) : dphi(z, o) / phi(z, o);
    }
  }
};

// Row loss from the rest mass R and the target's phi_y (log phi_y given separately for accuracy).
// single_class: C = 1, where p_y = 1 even if phi_y underflows.
template <typename T>
FL_HD FL_INLINE T additive_loss(T rest, T phi_y, T log_phi_y, bool single_class) {
  // R <= phi_y: log1p(R / phi_y) keeps every digit of a tiny loss (0 when every other class is masked);
  // otherwise the loss is >= log 2 and the plain difference is safe (and survives phi_y underflowing to 0).
  if (single_class) return T(0);
  if (phi_y >= rest && phi_y > T(0)) return fl_log1p(rest / phi_y);
  return std::log(rest + phi_y) - log_phi_y;
}

// Per-row constants of the additive backward:
//   dL/dz_k = g phi'(z_k) / S (k != y),   dL/dz_y = -g (phi'/phi)(z_y) R / S.
template <typename T>
struct AddGradRow {
  T coef;    // g / S
  T target;  // dL/dz_y (before the pre-map's dz/dx)
};

template <AddKind K, typename T>
FL_HD FL_INLINE AddGradRow<T> additive_grad_row(T g, T rest, T phi_y, T z_y, const AddOpts<T>& o) {
  const T S = rest + phi_y;
  AddGradRow<T> r;
  if (S == T(0)) return {T(0), T(0)};  // nothing but underflowed mass: no gradient instead of 0 * inf
  r.coef = g / S;
  r.target = rest == T(0) ? T(0) : -g * AddPhi<K>::dlog_phi(z_y, o) * (rest / S);
  return r;
}

// ---------------------------------------------------------------------------------------------------------
// Multi-label on s = scale (z -/+ margin): s_p = scale (z_p - margin) for positives, s_n = scale (z_n + margin)
// for negatives.
// ZLPR:  loss = log(1 + sum_n e^{s_n}) + log(1 + sum_p e^{-s_p}); both states are seeded with the implicit
//        zero logit, LseState{0, 0} (one element at 0, no rest).
// DEXML: loss = (1/|P|) sum_p softplus(lse_N - s_p), lse_N over negatives only (-inf when there are none);
//        rows without positives have loss 0 and are left out of the mean.
// Saved stats (4 per row): ZLPR [m_n, r_n, m_p, r_p]; DEXML [m_N, r_N, A = sum_p sigmoid(lse_N - s_p), |P|].
// ---------------------------------------------------------------------------------------------------------

template <typename T>
struct MlOpts {
  T scale, margin;
  FL_HD FL_INLINE T s_neg(T z) const { return scale * (z + margin); }
  FL_HD FL_INLINE T s_pos(T z) const { return scale * (z - margin); }
};

// Backward row constants. Negatives: dL/dz_n = neg_coef * exp(s_n - m_neg).
// ZLPR positives: dL/dz_p = pos_coef * exp(-s_p - m_pos); DEXML positives: pos_coef * sigmoid(lse_N - s_p).
template <typename T>
struct MlGradRow {
  T m_neg, neg_coef, m_pos, pos_coef, lse_neg;

  template <MlKind K>
  FL_HD FL_INLINE static MlGradRow make(const T* st, T g, T scale) {
    MlGradRow r{};
    if constexpr (K == MlKind::zlpr) {
      r.m_neg = st[0];
      r.neg_coef = g * scale / (T(1) + st[1]);
      r.m_pos = st[2];
      r.pos_coef = -g * scale / (T(1) + st[3]);
    } else {
      const T m = st[0], count = st[3];
      const bool none = !(count > T(0)) || m == neg_inf<T>();  // no positives, or no negatives at all
      r.m_neg = none ? T(0) : m;
      r.lse_neg = m + fl_log1p(st[1]);
      const T inv_p = count > T(0) ? T(1) / count : T(0);
      r.neg_coef = none ? T(0) : g * scale * st[2] * inv_p / (T(1) + st[1]);
      r.pos_coef = -g * scale * inv_p;
      r.m_pos = T(0);
    }
    return r;
  }
  template <MlKind K>
  FL_HD FL_INLINE T pos(T s) const {
    if constexpr (K == MlKind::zlpr) return pos_coef * fl_exp(-s - m_pos);
    else return pos_coef * sigmoid(lse_neg - s);
  }
};

}  // namespace fastloss
