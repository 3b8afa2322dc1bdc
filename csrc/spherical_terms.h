// The per-row finalisation of the spherical Gram form (fastloss/spherical.h), shared by the CPU and CUDA
// kernels of the op spherical_row_terms: from each row's mean, centred square sum and target outputs to the row
// loss and its partial derivatives [dL/dm2, dL/dmu, B_m, dL/do_{c_j} ...]. B_m = dL/dmu + sum_j dL/do_{c_j},
// formed without cancellation (SphericalLoss::mean_grad), is the coefficient of the weight mean m in dL/dh once
// the target rows are taken relative to m.
#pragma once
#include "fastloss/spherical.h"

namespace fastloss {

template <typename T>
struct SphericalTermsArgs {
  const T *mu, *m2, *oc, *dev;  // (N,), (N,), (N, K), (N, K)
  const int64_t* target;        // (N, K)
  const T* weight;              // (N, K) or nullptr
  int64_t K, ignore_index;
  SphericalLoss<T> loss;
  T* out_loss;  // (N,)
  T* coef;      // (N, 3 + K)
};

template <typename T>
FL_HD FL_INLINE void spherical_terms_row(const SphericalTermsArgs<T>& a, int64_t n) {
  const int64_t K = a.K;
  auto target = [&](int64_t j) -> SphericalTarget<T> {
    const int64_t c = a.target[n * K + j];
    if (c == a.ignore_index) return {false, c, T(0), T(0), T(0)};
    return {true, c, a.oc[n * K + j], a.dev[n * K + j], a.weight ? a.weight[n * K + j] : T(1)};
  };
  SphericalRowGrad<T> g;
  const T m2 = a.m2[n] < T(0) ? T(0) : a.m2[n];  // a Gram-form m2 can round below 0 for a constant row; NaN stays
  a.out_loss[n] = spherical_row(a.loss, a.mu[n], m2, K, target, T(1), &g);
  T* c = a.coef + n * (3 + K);
  c[0] = g.beta / T(2);
  c[1] = g.alpha * a.loss.C;
  T mean = a.loss.averages_targets() ? T(0) : c[1];  // squared error: its R.d_mu once per row
  for (int64_t j = 0; j < K; ++j) {
    const SphericalTarget<T> t = target(j);
    c[3 + j] = t.valid ? g.gw * t.w * a.loss.target_part(t.oc, t.dev, m2).d_oc : T(0);
    if (t.valid) mean += g.gw * t.w * a.loss.mean_grad(a.mu[n], m2, t.oc, t.dev);
  }
  c[2] = mean;
}

}  // namespace fastloss
