// CPU epilogues of the contrastive engine (csrc/contrastive_engine.h): at::parallel_for over the rows of a tile,
// over column chunks for the column statistics. Inner loops are branch-free over a row so the compiler
// vectorises them (exp is fastloss's polynomial); the one or two special lanes of a row (its positive, itself)
// are masked in the forward and patched after the generic loop in the backward. `omp simd` (compiled with
// -fopenmp-simd, no OpenMP runtime) lets the row reductions vectorise in a fixed, build-determined order.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../contrastive_engine.h"

namespace fastloss::contrastive {
namespace {

template <typename T>
FL_INLINE T safe_max(T m) {
  return m == neg_inf<T>() ? T(0) : m;  // an all -inf lane set must not produce -inf - -inf
}

template <typename T>
void softmax_row(const TileArgs<T>& a, T* s, int64_t i) {
  const int64_t M = a.M;
  const T t = a.scale[i], b = a.bias_value(), alpha = a.p.a(), beta = a.p.beta;
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < M; ++j) {
    s[j] = t * s[j] + b;
    sum += s[j];
  }
  T* st = a.row_stats + i * kStats;
  if (a.kind == kSupCon) {
    const int64_t li = a.labels_q[i];
    if (a.exclude_self && i < M) s[i] = neg_inf<T>();
    T pos = 0, cnt = 0, m = neg_inf<T>();
#pragma omp simd reduction(+ : pos, cnt) reduction(max : m)
    for (int64_t j = 0; j < M; ++j) {
      const bool eq = a.labels_k[j] == li && !(a.exclude_self && j == i);
      pos += eq ? s[j] : T(0);
      cnt += eq ? T(1) : T(0);
      m = s[j] > m ? s[j] : m;
    }
    const T ms = safe_max(m);
    T d = 0;
#pragma omp simd reduction(+ : d)
    for (int64_t j = 0; j < M; ++j) d += fl_exp(s[j] - ms);
    st[kAm] = m;
    st[kAd] = m == neg_inf<T>() ? T(0) : d;
    st[kBm] = neg_inf<T>();
    st[kBd] = 0;
    st[kPos] = pos;
    st[kSum] = 0;
    st[kCount] = cnt;
    a.row_loss[i] = finalize_supcon(st);
    return;
  }
  const int64_t p = a.positive[i];
  const T sp = s[p];
  const bool self = a.exclude_self && i < M && i != p;
  if (self) sum -= s[i];
  s[p] = neg_inf<T>();
  if (self) s[i] = neg_inf<T>();
  T m = neg_inf<T>();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < M; ++j) m = s[j] > m ? s[j] : m;
  const T am = alpha * safe_max(m), bm = beta * safe_max(m);
  T dA = 0, dB = 0;
#pragma omp simd reduction(+ : dA)
  for (int64_t j = 0; j < M; ++j) dA += fl_exp(alpha * s[j] - am);
  if (a.p.hcl()) {
#pragma omp simd reduction(+ : dB)
    for (int64_t j = 0; j < M; ++j) dB += fl_exp(beta * s[j] - bm);
  }
  const bool empty = m == neg_inf<T>();
  st[kAm] = empty ? neg_inf<T>() : am;
  st[kAd] = empty ? T(0) : dA;
  st[kBm] = empty || !a.p.hcl() ? neg_inf<T>() : bm;
  st[kBd] = empty ? T(0) : dB;
  st[kPos] = sp;
  st[kSum] = sum;
  st[kCount] = T(M - 1 - (self ? 1 : 0));
  a.row_loss[i] = finalize_softmax(st, a.p);
}

template <typename T>
void sigmoid_row(const TileArgs<T>& a, T* s, int64_t i) {
  const T t = a.scale[i], b = a.bias_value();
  const int64_t p = a.positive[i];
  T loss = 0;
  for (int64_t j = 0; j < a.M; ++j) {
    const T x = t * s[j] + b;
    loss += softplus(j == p ? -x : x);
  }
  T* st = a.row_stats + i * kStats;
  for (int k = 0; k < kStats; ++k) st[k] = 0;
  st[kPos] = t * s[p] + b;
  a.row_loss[i] = loss;
}

// Folds this tile's rows into the running column statistics (symmetric softmax; the row pass has already
// turned the tile into logits with the diagonal masked to -inf).
template <typename T>
void column_pass(const TileArgs<T>& a) {
  constexpr int64_t W = 256;
  const int64_t M = a.M, R = a.rows;
  const T alpha = a.p.a(), beta = a.p.beta;
  const bool hcl = a.p.hcl(), smooth = a.p.eps > T(0);
  at::parallel_for(0, (M + W - 1) / W, 1, [&](int64_t c_lo, int64_t c_hi) {
    T bmax[W], am[W], bm[W], dA[W], dB[W], sum[W];
    for (int64_t c = c_lo; c < c_hi; ++c) {
      const int64_t j0 = c * W, w = std::min(W, M - j0);
      for (int64_t j = 0; j < w; ++j) {
        bmax[j] = neg_inf<T>();
        dA[j] = dB[j] = sum[j] = 0;
      }
      for (int64_t r = 0; r < R; ++r) {
        const T* s = a.tile + r * M + j0;
        for (int64_t j = 0; j < w; ++j) bmax[j] = s[j] > bmax[j] ? s[j] : bmax[j];
      }
      for (int64_t j = 0; j < w; ++j) {
        T* st = a.col_stats + (j0 + j) * kStats;
        const T nm = bmax[j] == neg_inf<T>() ? st[kAm] : std::max(st[kAm], alpha * bmax[j]);
        if (nm != st[kAm]) {  // rescale the running sums to the new maximum
          st[kAd] = st[kAm] == neg_inf<T>() ? T(0) : st[kAd] * std::exp(st[kAm] - nm);
          if (hcl) {
            const T nb = beta / alpha * nm;
            st[kBd] = st[kBm] == neg_inf<T>() ? T(0) : st[kBd] * std::exp(st[kBm] - nb);
            st[kBm] = nb;
          }
          st[kAm] = nm;
        }
        am[j] = safe_max(st[kAm]);
        bm[j] = safe_max(st[kBm]);
      }
      for (int64_t r = 0; r < R; ++r) {
        const T* s = a.tile + r * M + j0;
        for (int64_t j = 0; j < w; ++j) dA[j] += fl_exp(alpha * s[j] - am[j]);
        if (hcl)
          for (int64_t j = 0; j < w; ++j) dB[j] += fl_exp(beta * s[j] - bm[j]);
        if (smooth)
          for (int64_t j = 0; j < w; ++j) sum[j] += s[j] == neg_inf<T>() ? T(0) : s[j];
      }
      for (int64_t j = 0; j < w; ++j) {
        T* st = a.col_stats + (j0 + j) * kStats;
        st[kAd] += dA[j];
        st[kBd] += dB[j];
        st[kSum] += sum[j];
      }
    }
  });
}

template <typename T>
void bwd_row(const TileArgs<T>& a, T* x, int64_t i) {
  const int64_t M = a.M, N = a.N;
  const T t = a.scale[i], b = a.bias_value(), alpha = a.p.a(), beta = a.p.beta;
  T rc[kCoefs];
  load_coef(a.row_coef, N, i, rc);
  // Special lanes: the positive and the excluded self (at most two), patched after the generic loop.
  int64_t lane[2] = {-1, -1};
  if (a.kind != kSupCon) lane[0] = a.positive[i];
  if (a.exclude_self && i < M && i != lane[0]) lane[1] = i;
  T xl[2] = {lane[0] >= 0 ? x[lane[0]] : T(0), lane[1] >= 0 ? x[lane[1]] : T(0)};
  T dt = 0, db = 0;
  if (a.kind == kSigmoid) {
#pragma omp simd reduction(+ : dt, db)
    for (int64_t j = 0; j < M; ++j) {
      const T s = t * x[j] + b, e = fl_exp(-std::abs(s));  // branch-free sigmoid, so the loop vectorises
      const T g = rc[cGA] * (s >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e));
      const bool skip = j == lane[0];
      dt += skip ? T(0) : g * x[j];
      db += skip ? T(0) : g;
      x[j] = t * g;
    }
  } else if (a.kind == kSupCon) {
    const int64_t li = a.labels_q[i];
#pragma omp simd reduction(+ : dt, db)
    for (int64_t j = 0; j < M; ++j) {
      const T s = t * x[j] + b;
      const T g = rc[cGA] * fl_exp(s - rc[cALse]) + (a.labels_k[j] == li ? rc[cGPos] : T(0));
      const bool skip = j == lane[1];
      dt += skip ? T(0) : g * x[j];
      db += skip ? T(0) : g;
      x[j] = t * g;
    }
  } else {
    const T* cA = a.col_coef;  // SoA rows of the column coefficients (symmetric)
#pragma omp simd reduction(+ : dt, db)
    for (int64_t j = 0; j < M; ++j) {
      const T s = t * x[j] + b;
      T g = rc[cGA] * fl_exp(alpha * s - rc[cALse]) + rc[cGAll];
      if (a.p.hcl()) g -= rc[cGB] * fl_exp(beta * s - rc[cBLse]);
      if (a.symmetric) {
        g += cA[cGA * M + j] * fl_exp(alpha * s - cA[cALse * M + j]) + cA[cGAll * M + j];
        if (a.p.hcl()) g -= cA[cGB * M + j] * fl_exp(beta * s - cA[cBLse * M + j]);
      }
      const bool skip = j == lane[0] || j == lane[1];
      dt += skip ? T(0) : g * x[j];
      db += skip ? T(0) : g;
      x[j] = t * g;
    }
  }
  for (int l = 0; l < 2; ++l) {
    const int64_t j = lane[l];
    if (j < 0) continue;
    const T s = t * xl[l] + b;
    T g = lane_grad(a.kind, s, l == 0, l == 1, rc, a.p);
    if (a.symmetric) {
      T cc[kCoefs];
      load_coef(a.col_coef, M, j, cc);
      g += lane_grad(a.kind, s, j == i, false, cc, a.p);
    }
    dt += g * xl[l];
    db += g;
    x[j] = t * g;
  }
  a.dscale[i] = dt;
  a.dbias_rows[i] = db;
}

int64_t row_grain(int64_t M) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(M, 1)); }

struct CpuBackend {
  static constexpr int64_t kTileElems = int64_t(1) << 22;
  static constexpr bool kMixedGemm = false;  // CPU BLAS in fp32 is faster and exact

  static void check_positive(const Inputs& in) {
    if (!in.positive.defined()) return;
    const int64_t* p = in.positive.data_ptr<int64_t>();
    for (int64_t i = 0; i < in.N; ++i)
      TORCH_CHECK_INDEX(p[i] >= 0 && p[i] < in.M, "contrastive: positive ", p[i], " of row ", i,
                        " is out of bounds for ", in.M, " keys");
  }

  template <typename T>
  static void fwd_tile(const TileArgs<T>& a) {
    at::parallel_for(0, a.rows, row_grain(a.M), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        T* s = a.tile + r * a.M;
        if (a.kind == kSigmoid)
          sigmoid_row(a, s, a.row0 + r);
        else
          softmax_row(a, s, a.row0 + r);
      }
    });
    if (a.symmetric) column_pass(a);
  }

  template <typename T>
  static void finish_columns(const TileArgs<T>& a) {
    for (int64_t j = 0; j < a.M; ++j)
      a.row_loss[j] = finalize_column(a.col_stats + j * kStats, a.row_stats[j * kStats + kPos], T(a.N), a.p);
  }

  template <typename T>
  static void coefs(int kind, const T* stats, const T* grad, int64_t n, const Params<T>& p, T* out,
                    const at::Tensor&) {
    for (int64_t i = 0; i < n; ++i) {
      T c[kCoefs];
      make_coef(kind, stats + i * kStats, grad[i], p, c);
      for (int k = 0; k < kCoefs; ++k) out[k * n + i] = c[k];
    }
  }

  template <typename T>
  static void bwd_tile(const TileArgs<T>& a) {
    at::parallel_for(0, a.rows, row_grain(a.M), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) bwd_row(a, a.tile + r * a.M, a.row0 + r);
    });
  }
};

Options options(int64_t kind, bool symmetric, bool exclude_self, bool decoupled, double beta, double eps,
                int64_t block_rows) {
  return Options{kind, symmetric, exclude_self, decoupled, beta, eps, block_rows};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_fwd(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& positive, const std::optional<at::Tensor>& labels_q,
    const std::optional<at::Tensor>& labels_k, int64_t kind, bool symmetric, bool exclude_self, bool decoupled,
    double beta, double label_smoothing, int64_t block_rows) {
  return forward<CpuBackend>(query, key, scale, bias, positive, labels_q, labels_k,
                             options(kind, symmetric, exclude_self, decoupled, beta, label_smoothing, block_rows));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_bwd(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& scale, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& positive,
    const std::optional<at::Tensor>& labels_q, const std::optional<at::Tensor>& labels_k,
    const at::Tensor& row_stats, const at::Tensor& col_stats, int64_t kind, bool symmetric, bool exclude_self,
    bool decoupled, double beta, double label_smoothing, int64_t block_rows) {
  return backward<CpuBackend>(grad_row, grad_col, query, key, scale, bias, positive, labels_q, labels_k, row_stats,
                              col_stats,
                              options(kind, symmetric, exclude_self, decoupled, beta, label_smoothing, block_rows));
}

}  // namespace
}  // namespace fastloss::contrastive

TORCH_LIBRARY_IMPL(fastloss, CPU, m) {
  m.impl("contrastive_fwd", &fastloss::contrastive::contrastive_fwd);
  m.impl("contrastive_bwd", &fastloss::contrastive::contrastive_bwd);
}
