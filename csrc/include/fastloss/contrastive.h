// Torch-free maths of the blockwise contrastive engine, shared by the CPU epilogues (csrc/cpu/contrastive.cpp)
// and the CUDA epilogues (csrc/cuda/contrastive.cu).
//
// Logits s_ij = t_i * <q_i, k_j> + b for query rows i and key rows j; the engine never holds more than one
// block of rows of S. Per row (and, for symmetric losses, per column) it keeps a small statistics record:
//   kAm, kAd   log-sum-exp state (max, sum of exp(x - max)) over the NEGATIVES of x = a*s, a = 1 + beta
//   kBm, kBd   the same over x = beta*s (HCL only)
//   kPos       the positive logit s_p (softmax), or the sum of positive logits (SupCon)
//   kSum       sum of the candidates' logits (label smoothing)
//   kCount     number of negatives (softmax) or of positives (SupCon)
//   kLse       the row's full log-normaliser, written by finalisation (return_stats)
// Both states are plain (max, sum) pairs merged associatively, so blocks of keys (or ranks) can be folded in
// any fixed order. The positive is kept out of the negatives' sum: the loss is then softplus(n - s_p), which
// stays exact when the positive dominates (no Softmax Collapse without the rest-mass bookkeeping).
#pragma once
#include "fastloss/macros.h"

namespace fastloss::contrastive {

enum Kind : int { kSoftmax = 0, kSigmoid = 1, kSupCon = 2 };
enum Stat : int { kAm = 0, kAd = 1, kBm = 2, kBd = 3, kPos = 4, kSum = 5, kCount = 6, kLse = 7, kStats = 8 };
// Backward coefficients per row / column, stored structure-of-arrays (kCoefs, n) so that a loop over columns
// reads each coefficient contiguously; derived once from the statistics and the upstream gradient:
// the gradient of a negative lane is gA*exp(a*s - Alse) - gB*exp(beta*s - Blse) + gall, a positive lane gets
// gpos (softmax: instead; SupCon: in addition), a sigmoid lane gA*sigmoid(s) (positive: -gA*sigmoid(-s)).
enum Coef : int { cGA = 0, cALse = 1, cGB = 2, cBLse = 3, cGPos = 4, cGAll = 5, kCoefs = 6 };

template <typename T>
struct Params {
  T beta;  // HCL hardness (0: plain InfoNCE)
  T eps;   // label smoothing
  bool decoupled;
  FL_HD FL_INLINE T a() const { return T(1) + beta; }
  FL_HD FL_INLINE bool hcl() const { return beta > T(0); }
};

template <typename T>
FL_HD FL_INLINE T pos_inf() {
  return std::numeric_limits<T>::infinity();
}

template <typename T>
FL_HD FL_INLINE T lse_of(T m, T d) {
  return d > T(0) ? m + std::log(d) : neg_inf<T>();
}

// log(1 + e^x) without overflow and exact for very negative x.
template <typename T>
FL_HD FL_INLINE T softplus(T x) {
  return x > T(0) ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x));
}

template <typename T>
FL_HD FL_INLINE T sigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + std::exp(-x));
  const T e = std::exp(x);
  return e / (T(1) + e);
}

// Merge a (max, sum) pair into another (associative; -inf maxima carry no mass).
template <typename T>
FL_HD FL_INLINE void merge_lse(T& m, T& d, T om, T od) {
  if (om == neg_inf<T>() || !(od > T(0))) return;
  if (om > m) {
    d = d * (m == neg_inf<T>() ? T(0) : std::exp(m - om)) + od;
    m = om;
  } else {
    d += od * std::exp(om - m);
  }
}

// log-mass n of the negatives: LSE_A, or with HCL (Nn sum e^{a s} / sum e^{beta s}) in log space.
template <typename T>
FL_HD FL_INLINE T neg_log_mass(const T* st, const Params<T>& p) {
  const T A = lse_of(st[kAm], st[kAd]);
  if (!p.hcl()) return A;
  if (!(st[kCount] > T(0))) return neg_inf<T>();
  return A - lse_of(st[kBm], st[kBd]) + std::log(st[kCount]);
}

// Row loss of a softmax record; also writes its full log-normaliser into st[kLse].
// L = log([not decoupled] e^{s_p} + e^n) - s_p + eps (s_p - mean of the candidates' logits).
template <typename T>
FL_HD FL_INLINE T finalize_softmax(T* st, const Params<T>& p) {
  const T n = neg_log_mass(st, p), sp = st[kPos];
  T loss, lse;
  if (p.decoupled) {
    lse = n;
    loss = n - sp;
  } else {
    loss = n == neg_inf<T>() ? T(0) : softplus(n - sp);
    lse = sp + loss;
  }
  if (p.eps > T(0)) loss += p.eps * (sp - st[kSum] / (st[kCount] + T(1)));
  st[kLse] = lse;
  return loss;
}

// SupCon L_out: LSE over every other row minus the mean positive logit; anchors without positives give 0.
template <typename T>
FL_HD FL_INLINE T finalize_supcon(T* st) {
  const T l = lse_of(st[kAm], st[kAd]);
  st[kLse] = l;
  return st[kCount] > T(0) ? l - st[kPos] / st[kCount] : T(0);
}

// Backward coefficients from a finalised record and the upstream gradient g of its loss.
template <typename T>
FL_HD FL_INLINE void make_coef(int kind, const T* st, T g, const Params<T>& p, T* c) {
  for (int k = 0; k < kCoefs; ++k) c[k] = T(0);
  c[cALse] = pos_inf<T>();  // exp(x - inf) = 0: unused terms vanish without 0 * inf
  c[cBLse] = pos_inf<T>();
  if (kind == kSigmoid) {
    c[cGA] = g;
    return;
  }
  if (kind == kSupCon) {
    if (st[kCount] > T(0)) {
      c[cGA] = g;
      c[cALse] = st[kLse];
      c[cGPos] = -g / st[kCount];
    }
    return;
  }
  const T n = neg_log_mass(st, p), sp = st[kPos];
  const T cn = p.decoupled ? T(1) : sigmoid(n - sp);  // dL/dn
  const T K = st[kCount] + T(1);                       // candidates in the smoothing mean
  if (n != neg_inf<T>()) {
    c[cGA] = g * cn * p.a();
    c[cALse] = lse_of(st[kAm], st[kAd]);
    if (p.hcl()) {
      c[cGB] = g * cn * p.beta;
      c[cBLse] = lse_of(st[kBm], st[kBd]);
    }
  }
  const T dpos = p.decoupled ? T(-1) : -sigmoid(n - sp);  // d(lse - s_p)/ds_p
  c[cGPos] = g * (dpos + p.eps - p.eps / K);
  c[cGAll] = -g * p.eps / K;
}

template <typename T>
FL_HD FL_INLINE void load_coef(const T* soa, int64_t n, int64_t idx, T* c) {
  for (int k = 0; k < kCoefs; ++k) c[k] = soa[k * n + idx];
}

// Gradient of a negative (non-positive, non-self) lane of a softmax / SupCon record.
template <typename T>
FL_HD FL_INLINE T neg_grad(T s, const T* c, const Params<T>& p) {
  T g = c[cGA] * fl_exp(p.a() * s - c[cALse]) + c[cGAll];
  if (p.hcl()) g -= c[cGB] * fl_exp(p.beta * s - c[cBLse]);
  return g;
}

// dL/ds of one lane for one record (row or column view). is_pos: the record's positive (softmax: its one
// positive; SupCon: same label); is_self: excluded from the record entirely.
template <typename T>
FL_HD FL_INLINE T lane_grad(int kind, T s, bool is_pos, bool is_self, const T* c, const Params<T>& p) {
  if (is_self) return T(0);
  if (kind == kSigmoid) return is_pos ? -c[cGA] * sigmoid(-s) : c[cGA] * sigmoid(s);
  if (kind == kSupCon) return c[cGA] * fl_exp(s - c[cALse]) + (is_pos ? c[cGPos] : T(0));
  return is_pos ? c[cGPos] : neg_grad(s, c, p);
}

// Column record after the last row block: its positive is the diagonal lane, whose logit the row pass kept.
template <typename T>
FL_HD FL_INLINE T finalize_column(T* st, T diag_logit, T rows, const Params<T>& p) {
  st[kPos] = diag_logit;
  st[kSum] += diag_logit;  // the column sums skip the diagonal, which the row pass masked
  st[kCount] = rows - T(1);
  return finalize_softmax(st, p);
}

// Everything an epilogue needs about one block of rows: raw dot products tile[r * M + j] = <q_{row0+r}, k_j>
// (overwritten in place), the global per-row scales, and the statistics / outputs of the whole problem.
template <typename T>
struct TileArgs {
  T* tile;
  int64_t rows, row0, N, M;
  const T* scale;            // (N,)
  const T* bias;             // scalar or nullptr
  const int64_t* positive;   // (N,) key index of each row's positive (softmax, sigmoid)
  const int64_t* labels_q;   // (N,) SupCon labels of the rows
  const int64_t* labels_k;   // (M,) SupCon labels of the keys
  T* row_stats;              // (N, kStats)
  T* col_stats;              // (M, kStats), symmetric only
  T* row_loss;               // (N,)
  const T* row_coef;         // (kCoefs, N), backward
  const T* col_coef;         // (kCoefs, M), backward, symmetric only
  T* dscale;                 // (N,) backward: sum_j G_ij <q_i, k_j>
  T* dbias_rows;             // (N,) backward: sum_j G_ij
  Params<T> p;
  int kind;
  bool symmetric, exclude_self;
  FL_HD FL_INLINE T bias_value() const { return bias ? *bias : T(0); }
};

}  // namespace fastloss::contrastive
