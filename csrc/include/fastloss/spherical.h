// Torch-free maths of the spherical family (Vincent et al. 2015; de Brebisson & Vincent 2016), shared by the
// row kernels on logits (cpu/row_kernels_isa.cpp, cuda/row_losses.cu) and by the Gram form from hidden
// states (cpu/spherical.cpp, cuda/spherical.cu).
//
// A spherical loss sees a row of outputs o (C classes) only through its mean mu, its centred square sum
// m2 = sum_k (o_k - mu)^2 (so s = C mu and q = m2 + C mu^2) and the target outputs o_{c_j}. Centred
// statistics keep the Z-loss variance exact when |mu| >> std, where q / C - mu^2 would cancel.
//
// With K targets c_j of weights w_j a row's loss is
//     L = R(mu, m2) + sum_j omega_j T(o_{c_j}; mu, m2),   omega_j = w_j / sum_j w_j   (w_j for squared error)
// and its gradient has the closed form
//     dL/do_k = 2 A (o_k - mu) + B / C + sum_j gamma_j [k = c_j],
//     A = dL/dm2,  B = dL/dmu,  gamma_j = omega_j dT_j/do_c.
#pragma once
#include "fastloss/macros.h"
#include "fastloss/row_losses.h"

namespace fastloss {

enum SphericalKind : int {
  kZLoss = 0,             // softplus(a (b - z_c)) / a,  z = (o - mu) / sigma
  kSphericalSoftmax = 1,  // -log((o_c^2 + eps) / sum_k (o_k^2 + eps))
  kTaylorSoftmax = 2,     // -log(t(o_c) / sum_k t(o_k)),  t(x) = 1 + x + x^2 / 2
  kSquaredError = 3,      // sum_k (o_k - y_k)^2,  y = sum_j w_j e_{c_j}
};

// A row's count n, mean and centred square sum m2, with the mean taken relative to a value x0 of the row itself
// (d = mean - x0: the mean keeps its digits when |mean| >> std). m2 never comes from a difference of large
// sums (q - s d, which cancels by ((mean - x0) / std)^2 when x0 is an outlier, and loses the small terms of a
// wide row): each group of values is centred on its own mean (two passes over registers) and groups merge by
// Chan, Golub & LeVeque's pairwise update. Values are pushed already shifted by x0.
template <typename T>
struct SphericalSums {
  T n, d, m2;  // count, mean - x0, sum of squared deviations from the mean

  // Folds in another part of the row (any n >= 0; empty parts change nothing).
  FL_HD FL_INLINE void merge(const SphericalSums& o) {
    const T total = n + o.n;
    // o's share of the merged count; exactly 1 into an empty state (a GPU's fast division need not give n / n = 1)
    const T f = n == T(0) ? T(1) : share(o.n, total);
    const T delta = o.d - d;
    d += delta * f;
    m2 += o.m2 + delta * delta * n * f;  // n o.n / total = n f
    n = total;
  }
  FL_HD FL_INLINE void push(T y) { merge({T(1), y, T(0)}); }
  // part / total: a GPU takes its hardware reciprocal for fp32 (2 instructions, not an IEEE division's ~10 per
  // group of the forward's hot loop); a weight a few ulps off moves the mean by a few ulps of the step. (The
  // emulator rounds twice, as __fdividef's part * rcp(total) does.)
  FL_HD FL_INLINE static T share(T part, T total) {
#if defined(__CUDA_ARCH__)
    if constexpr (std::is_same_v<T, float>) return __fdividef(part, total);
#elif FL_DEVICE_MATH
    if constexpr (std::is_same_v<T, float>) return part * (T(1) / total);
#endif
    return part / total;
  }
  // The first `count` of y[0..L) (count <= L; a full group, count == L, divides by a constant).
  template <int L>
  FL_HD FL_INLINE void push_group(const T (&y)[L], int count) {
    T sum = T(0);
#pragma unroll
    for (int i = 0; i < L; ++i) sum += i < count ? y[i] : T(0);
    const T mean = count == L ? sum * (T(1) / T(L)) : sum / T(count > 0 ? count : 1);
    T dev = T(0);
#pragma unroll
    for (int i = 0; i < L; ++i) {
      const T e = y[i] - mean;
      dev += i < count ? e * e : T(0);
    }
    merge({T(count), mean, dev});
  }
};

// d = mean - x0 and m2 = sum_k (o_k - mean)^2 of a row.
template <typename T>
struct CentredSums {
  T d, m2;
  FL_HD FL_INLINE static CentredSums of(const SphericalSums<T>& st) {
    return {st.d, st.m2 < T(0) ? T(0) : st.m2};  // (m2 >= 0 by construction; a NaN stays NaN)
  }
};

// A term's value and its partial derivatives.
template <typename T>
struct SphericalPart {
  T value, d_oc, d_mu, d_m2;
};

template <typename T>
struct SphericalLoss {
  int kind;
  T a, b, eps;  // Z-loss sharpness and margin; spherical-softmax epsilon
  T C;          // number of classes

  FL_HD FL_INLINE bool averages_targets() const { return kind != kSquaredError; }

  // R(mu, m2): the part shared by every target of the row (the log-normaliser; q for squared error).
  FL_HD FL_INLINE SphericalPart<T> row_part(T mu, T m2) const {
    SphericalPart<T> p{T(0), T(0), T(0), T(0)};
    if (kind == kSphericalSoftmax) {  // log(q + C eps),  q = m2 + C mu^2
      const T z = m2 + C * (mu * mu + eps);
      p.value = std::log(z);
      p.d_m2 = T(1) / z;
      p.d_mu = T(2) * C * mu / z;
    } else if (kind == kTaylorSoftmax) {  // log(C + s + q / 2) = log(C ((1 + mu)^2 + 1) / 2 + m2 / 2)
      const T u = T(1) + mu;
      const T z = T(0.5) * (C * (u * u + T(1)) + m2);
      p.value = std::log(z);
      p.d_m2 = T(0.5) / z;
      p.d_mu = C * u / z;
    } else if (kind == kSquaredError) {  // q (the |y|^2 constant is added by the row driver)
      p.value = m2 + C * mu * mu;
      p.d_m2 = T(1);
      p.d_mu = T(2) * C * mu;
    }
    return p;
  }

  // T(o_c; mu, m2) for one target; dev = o_c - mu, passed in because callers compute it without cancellation.
  FL_HD FL_INLINE SphericalPart<T> target_part(T oc, T dev, T m2) const {
    SphericalPart<T> p{T(0), T(0), T(0), T(0)};
    if (kind == kZLoss) {
      if (m2 == T(0)) {  // constant row: z := 0, gradient 0 (a NaN m2 falls through and propagates)
        p.value = softplus(a * b) / a;
        return p;
      }
      const T sigma = std::sqrt(m2 / C);
      const T z = dev / sigma;
      const T g = sigmoid(a * (b - z));
      p.value = softplus(a * (b - z)) / a;
      p.d_oc = -g / sigma;
      p.d_mu = g / sigma;
      p.d_m2 = g * z / (T(2) * m2);
    } else if (kind == kSphericalSoftmax) {
      const T t = oc * oc + eps;
      p.value = -std::log(t);
      p.d_oc = T(-2) * oc / t;
    } else if (kind == kTaylorSoftmax) {  // t = ((1 + o)^2 + 1) / 2 >= 1/2: no epsilon needed
      const T u = T(1) + oc;
      const T t = T(0.5) * (u * u + T(1));
      p.value = -std::log(t);
      p.d_oc = -u / t;
    } else {  // squared error: -2 o_c (times w_j)
      p.value = T(-2) * oc;
      p.d_oc = T(-2);
    }
    return p;
  }

  // The coefficient of the weight mean m in one target's share of dL/dh once its weight row is written
  // w_c = m + (w_c - m) (Gram form): T.d_mu + T.d_oc, plus R.d_mu for the kinds that average their targets
  // (their weights sum to 1). When the logits' mean dwarfs their spread (o_c ~ mu) these terms nearly cancel,
  // and their fp32 sum times a large m would swamp the gradient; so each kind's sum is formed in closed form
  // from dev = o_c - mu. Squared error: -2 (its R.d_mu = 2 C mu is added once per row).
  FL_HD FL_INLINE T mean_grad(T mu, T m2, T oc, T dev) const {
    // (the divisions one at a time: z t overflows long before either does)
    if (kind == kSphericalSoftmax) {  // 2 C mu / z - 2 o_c / t = 2 (C dev (mu o_c - eps) - o_c m2) / (z t)
      const T z = m2 + C * (mu * mu + eps), t = oc * oc + eps;
      return T(2) * ((C * dev * (mu * oc - eps) - oc * m2) / z) / t;
    }
    if (kind == kTaylorSoftmax) {  // C u / z - u_c / t = (C dev (u u_c - 1) - u_c m2) / (2 z t)
      const T u = T(1) + mu, uc = T(1) + oc;
      const T z = T(0.5) * (C * (u * u + T(1)) + m2), t = T(0.5) * (uc * uc + T(1));
      return ((C * dev * (u * uc - T(1)) - uc * m2) / (T(2) * z)) / t;
    }
    if (kind == kSquaredError) return T(-2);
    return m2 != m2 ? m2 : T(0);  // Z-loss: R = 0 and T depends on o_c - mu only (a NaN row stays NaN)
  }
};

// Per-row gradient coefficients (scaled by the upstream gradient g):
//   dL/do_k = beta (o_k - mu) + alpha + sum_{j: c_j = k} gw w_j dT_j/do_c,   gw = g / sum_j w_j (g for squared error).
template <typename T>
struct SphericalRowGrad {
  T alpha, beta, gw;
};

// One target of a row as the row driver sees it.
template <typename T>
struct SphericalTarget {
  bool valid;  // not ignore_index
  int64_t c;   // class index
  T oc, dev;   // o_c and o_c - mu (computed by the caller without cancellation)
  T w;         // target weight
};

// Evaluates one row: `target(j)` returns target j as a SphericalTarget. With `grad` non-null, also returns
// the gradient coefficients for upstream gradient g. Rows without a valid target have loss 0 and gradient
// 0; so do averaging rows whose target weights sum to 0.
template <typename T, typename TargetFn>
FL_HD FL_INLINE T spherical_row(const SphericalLoss<T>& L, T mu, T m2, int64_t K, const TargetFn& target,
                                T g = T(0), SphericalRowGrad<T>* grad = nullptr) {
  T wsum = T(0);
  bool any = false;
  for (int64_t j = 0; j < K; ++j) {
    const SphericalTarget<T> t = target(j);
    if (t.valid) {
      any = true;
      wsum += t.w;
    }
  }
  if (grad != nullptr) *grad = {T(0), T(0), T(0)};
  if (!any || (L.averages_targets() && wsum == T(0))) return T(0);
  const T inv_w = L.averages_targets() ? T(1) / wsum : T(1);
  const SphericalPart<T> r = L.row_part(mu, m2);
  T loss = r.value, A = r.d_m2, B = r.d_mu;
  for (int64_t j = 0; j < K; ++j) {
    const SphericalTarget<T> t = target(j);
    if (!t.valid) continue;
    const T omega = t.w * inv_w;
    const SphericalPart<T> p = L.target_part(t.oc, t.dev, m2);
    loss += omega * p.value;
    A += omega * p.d_m2;
    B += omega * p.d_mu;
    if (L.kind == kSquaredError) {  // |y|^2 = sum_j w_j^2 + 2 sum_{i < j, c_i = c_j} w_i w_j
      T same = t.w;
      for (int64_t i = 0; i < j; ++i) {
        const SphericalTarget<T> u = target(i);
        if (u.valid && u.c == t.c) same += T(2) * u.w;
      }
      loss += t.w * same;
    }
  }
  if (grad != nullptr) *grad = {g * B / L.C, T(2) * g * A, g * inv_w};
  return loss;
}

// The target part of dL/do_c for class c: sum over the valid targets equal to c of gw w_j dT_j/do_c.
template <typename T, typename TargetFn>
FL_HD FL_INLINE T spherical_target_grad(const SphericalLoss<T>& L, T m2, int64_t K, const TargetFn& target,
                                        T gw, int64_t c) {
  T sum = T(0);
  for (int64_t j = 0; j < K; ++j) {
    const SphericalTarget<T> t = target(j);
    if (t.valid && t.c == c) sum += t.w * L.target_part(t.oc, t.dev, m2).d_oc;
  }
  return gw * sum;
}

}  // namespace fastloss

namespace fastloss {

// ---------------------------------------------------------------------------------------------------------
// Gram form (python/fastloss/linear_spherical.py): per-element terms of the row kernels over the hidden width
// d. stat = [m (d), bm, u (d), beta]: the centred-weight mean, bias mean, u = W_c' b_c and beta = |b_c|^2.
// ---------------------------------------------------------------------------------------------------------

// One element of a target output's two dot products, in double: the centred o_c - mu += (w_ci - center_i) h_i
// and the raw o_c += w_ci h_i. Double keeps both exact to their final rounding: o_c near 0 beside a large row
// mean must not inherit the mean's rounding (mu + (o_c - mu) would), since o_c^2 + eps divides in the spherical
// softmax. The gather is N·K·d work, negligible next to the Gram's products.
FL_HD FL_INLINE void gram_target_terms(double w, double center, double h, double& dev, double& raw) {
  dev += (w - center) * h;
  raw += w * h;
}

// [mu, m2] partial sums, one element: mu += h_i m_i, m2 += (hq_i + 2 u_i) h_i  (hq = H Q_c). mu in double: with h
// nearly orthogonal to a large weight mean m its terms reach |h||m| while mu stays small, and their rounding
// would reach the hidden gradient through B_m (mean_grad).
template <typename T>
FL_HD FL_INLINE void gram_stats_terms(T h, T hq, T m, T u, double& mu, T& m2) {
  mu += static_cast<double>(h) * static_cast<double>(m);
  m2 += (hq + T(2) * u) * h;
}

// One target's share of dL/dh_i: gamma (w_ci - m_i); its m_i share is in the dense part's B_m (mean_grad).
template <typename T>
FL_HD FL_INLINE T gram_grad_target(T gamma, T w, T m) {
  return gamma * (w - m);
}

// dL/dh_i without its target part: 2A (hq_i + u_i) + B_m m_i.
template <typename T>
FL_HD FL_INLINE T gram_grad_dense(T A, T B, T hq, T u, T m) {
  return T(2) * A * (hq + u) + B * m;
}

// One element of the weight gradient from its GEMM part g = (W 2G + target rows)_rj: + row_j (the same for every
// weight row: the mean and centring terms) + 2 b_r v_j (the bias term), rounded once into the weight's dtype.
template <typename T>
FL_HD FL_INLINE T gram_weight_grad_term(T g, T row, T two_bias, T v) {
  return g + row + two_bias * v;
}

}  // namespace fastloss
