// Torch-free maths of the blockwise contrastive engine, shared by the CPU epilogues (csrc/cpu/contrastive.cpp)
// and the CUDA epilogues (csrc/cuda/contrastive.cu).
//
// Logits s_ij = t_i * <q_i, k_j> + b for query rows i and key rows j; the engine never holds more than one
// block of rows of S. Per row (and, for symmetric losses, per column) it keeps a small statistics record:
//   kM         max logit over the record's log-sum-exp lanes: the NEGATIVES (softmax, sigmoid) or every
//              candidate (SupCon); -inf when there is none
//   kAd, kBd   sum of exp(a (s - kM)), a = 1 + beta, and of exp(beta (s - kM)) (HCL only) over those lanes
//   kPos       the positive logit s_p (softmax, sigmoid), or the sum of positive logits (SupCon)
//   kSum       sum of the candidates' logits (label smoothing)
//   kCount     number of negatives (softmax, sigmoid) or of positives (SupCon)
//   kLse       the row's full log-normaliser over its candidates, written by finalisation (return_stats)
// Records are built in ONE pass over the raw dot products (Acc below: online max with a rescale when it
// grows) and merge associatively, so threads, blocks of keys or ranks fold in any fixed order. The positive is
// kept out of the negatives' sum: the loss is then softplus(n - s_p), which stays exact when the positive
// dominates (no Softmax Collapse without the rest-mass bookkeeping).
#pragma once
#include "fastloss/macros.h"

namespace fastloss::contrastive {

enum Kind : int { kSoftmax = 0, kSigmoid = 1, kSupCon = 2 };
enum Stat : int { kM = 0, kAd = 1, kBd = 2, kPos = 3, kSum = 4, kCount = 5, kLse = 6, kStats = 7 };
// Backward coefficients per row / column, stored structure-of-arrays (kCoefs, n) so that a loop over columns
// reads each coefficient contiguously; derived once from the statistics and the upstream gradient:
// the gradient of a negative lane is gA*exp(a*s - Alse) - gB*exp(beta*s - Blse) + gall, a positive lane gets
// gpos (softmax: instead; SupCon: in addition), a sigmoid lane gA*sigmoid(s) (positive: -gA*sigmoid(-s)).
enum Coef : int { cGA = 0, cALse = 1, cGB = 2, cBLse = 3, cGPos = 4, cGAll = 5, kCoefs = 6 };
// Where the backward epilogue writes t_i * G_ij: over the fp32 / fp64 tile, or into a separate fp16 / bf16
// buffer that is the operand of the dq and dk GEMMs (CUDA tensor cores).
enum GradOut : int { kGradInPlace = 0, kGradHalf = 1, kGradBFloat16 = 2 };

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

// m + log(d); -inf for no mass (d = 0), NaN stays NaN.
template <typename T>
FL_HD FL_INLINE T lse_of(T m, T d) {
  return d == T(0) ? neg_inf<T>() : m + std::log(d);
}

// log(1 + e^x) without overflow and exact for very negative x.
template <typename T>
FL_HD FL_INLINE T softplus(T x) {
  return x > T(0) ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x));
}

// kFast: the hardware exp for logits of fp16 / bf16 features (CUDA; see fl_exp_if_fast).
template <bool kFast = false, typename T>
FL_HD FL_INLINE T sigmoid(T x) {
  const T e = fl_exp_if_fast<kFast>(x >= T(0) ? -x : x);  // e^{-|x|} <= 1: no overflow
  return x >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

// softplus(s) of a SigLIP negative; kFast (logits of fp16 / bf16 features, float): the hardware exp and the
// log1p_unit polynomial instead of two accurate libm calls.
template <bool kFast, typename T>
FL_HD FL_INLINE T negative_softplus(T s) {
  if constexpr (kFast && std::is_same_v<T, float>) {
    return (s > 0.0f ? s : 0.0f) + log1p_unit(fl_exp_if_fast<true>(s > 0.0f ? -s : s));
  } else {
    return softplus(s);
  }
}

// Folds a part (om, oA, oB) -- a max and the sums exp(a (s - om)), exp(beta (s - om)) over its lanes -- into
// (m, dA, dB); one lane s is the part (s, 1, 1). Branch-free (selects only), one exp per sum: the smaller max is
// rescaled to the larger. A -inf part (a masked lane, an empty state) changes nothing; NaN poisons the sums.
// Associative: any fixed merge order is deterministic. kHcl: also the B sum. V is the scalar S itself, or a
// GCC vector of S (the CPU's explicit SIMD lanes, csrc/cpu/simd.h): the same selects then run per lane.
template <bool kHcl, typename V, typename S>
FL_HD FL_INLINE void lse_fold(V& m, V& dA, V& dB, V om, V oA, V oB, S a, S beta) {
  const auto up = !(om <= m);  // true for a NaN part, which then reaches the sums
  const V hi = up ? om : m, lo = up ? m : om;
  const V gap = hi == neg_inf<S>() ? V{} + neg_inf<S>() : lo - hi;  // both empty: no -inf - -inf; exp(-inf) = 0
  const V eA = fl_exp(a * gap);
  dA = up ? dA * eA + oA : dA + oA * eA;
  if constexpr (kHcl) {
    const V eB = fl_exp(beta * gap);
    dB = up ? dB * eB + oB : dB + oB * eB;
  }
  m = hi;
}

template <typename T>
FL_HD FL_INLINE void lse_fold(T& m, T& dA, T& dB, T om, T oA, T oB, T a, T beta, bool hcl) {
  if (hcl)
    lse_fold<true>(m, dA, dB, om, oA, oB, a, beta);
  else
    lse_fold<false>(m, dA, dB, om, oA, oB, a, beta);
}

// The part (gm, oA, oB) of a group of V finite lanes s[] for lse_fold: gm = their max, oA = sum exp(a (s - gm)),
// oB = sum exp(beta (s - gm)) (kHcl; without HCL a = 1). One exp per lane and one rescale in the fold, instead
// of the fold's selects per lane: the CUDA epilogues' common path, once a pack holds no masked, non-finite or
// special lane (the caller checks gm, which is infinite otherwise, and falls back to lane-wise folds; fmax skips
// a NaN lane, whose exp then makes oA NaN: the sums, and so the loss, are NaN as with lane-wise folds).
// kFast: the hardware exp, for logits of fp16 / bf16 features (fl_exp_diff_if_fast; exact maths on the host).
template <bool kHcl, bool kFast, int V, typename T>
FL_HD FL_INLINE T lse_group(const T (&s)[V], T a, T beta, T& oA, T& oB) {
  T gm = s[0];
#pragma unroll
  for (int v = 1; v < V; ++v) gm = fl_fmax(gm, s[v]);
  oA = T(0);
  oB = T(0);
#pragma unroll
  for (int v = 0; v < V; ++v) {
    if constexpr (kHcl) {
      oA += fl_exp_diff_if_fast<kFast>(a * s[v], a * gm);
      oB += fl_exp_diff_if_fast<kFast>(beta * s[v], beta * gm);
    } else {
      oA += fl_exp_diff_if_fast<kFast>(s[v], gm);
    }
  }
  return gm;
}

// One-pass accumulator of a record (one thread's share of a row, a column, or a merged block).
template <typename T>
struct Acc {
  T m, dA, dB;  // log-sum-exp state, as kM / kAd / kBd
  T pos;        // positive logit (softmax, sigmoid; one lane writes it, merging adds zeros) / SupCon sum
  T sum;        // sum of the candidates' logits (label smoothing; symmetric columns)
  T cnt;        // SupCon: positives seen
  T loss;       // sigmoid: sum of the softplus terms

  FL_HD FL_INLINE static Acc empty() { return {neg_inf<T>(), T(0), T(0), T(0), T(0), T(0), T(0)}; }
  FL_HD FL_INLINE static Acc from_record(const T* st) {
    return {st[kM], st[kAd], st[kBd], st[kPos], st[kSum], T(0), T(0)};
  }
  FL_HD FL_INLINE void push(T s, T a, T beta, bool hcl) { lse_fold(m, dA, dB, s, T(1), T(1), a, beta, hcl); }
  // SigLIP lane: its softplus term, and for a negative also the log-sum-exp (return_stats).
  FL_HD FL_INLINE void push_sigmoid(T s, bool positive) {
    if (positive) {
      pos = s;
      loss += softplus(-s);
    } else {
      loss += softplus(s);
      push(s, T(1), T(0), false);
    }
  }
  FL_HD FL_INLINE void merge(const Acc& o, T a, T beta, bool hcl) {
    lse_fold(m, dA, dB, o.m, o.dA, o.dB, a, beta, hcl);
    pos += o.pos;
    sum += o.sum;
    cnt += o.cnt;
    loss += o.loss;
  }
  FL_HD FL_INLINE void to_record(T* st, T count) const {
    st[kM] = m;
    st[kAd] = dA;
    st[kBd] = dB;
    st[kPos] = pos;
    st[kSum] = sum;
    st[kCount] = count;
  }
};

// Fused GEMM epilogue (CUDA sm_90, csrc/cuda/contrastive_sm90.cu): a tile of raw dot products that never leaves
// the chip is reduced to one partial record per row and per column, (m, dA, pos, sum) as in Acc, for the plain
// softmax kind (no HCL, no SupCon; NT-Xent's self lane is left out). Partials merge with Acc::merge.
constexpr int kLineStats = 4;

template <typename T>
FL_HD FL_INLINE Acc<T> acc_of_line(const T* part) {
  return {part[0], part[1], T(0), part[2], part[3], T(0), T(0)};
}

// Folds one line (a row or a column) of n raw products x[k * stride]: s_k = scale(k) * x + b; lane pos_lane (any
// value; outside [0, n) means the positive lies in another tile) is the positive, lane self_lane (likewise) is
// left out (NT-Xent's own view), every other lane a negative. Whole finite groups of 8 negatives fold at once
// (lse_group), the rest lane by lane: the CUDA row epilogue's maths.
template <bool kFast, typename T, typename Scale>
FL_HD FL_INLINE Acc<T> fold_line(const T* x, int64_t stride, int n, Scale&& scale, T b, int64_t pos_lane,
                                 int64_t self_lane = -1) {
  constexpr int G = 8;
  Acc<T> acc = Acc<T>::empty();
  auto lane = [&](int k, T s) {
    if (k == self_lane) return;
    acc.sum += s;
    if (k == pos_lane)
      acc.pos = s;
    else
      acc.push(s, T(1), T(0), false);
  };
  int k = 0;
  for (; k + G <= n; k += G) {
    T s[G];
#pragma unroll
    for (int v = 0; v < G; ++v) s[v] = scale(k + v) * x[int64_t(k + v) * stride] + b;
    if (uint64_t(pos_lane - k) >= uint64_t(G) && uint64_t(self_lane - k) >= uint64_t(G)) {
      T oA, oB;
      const T gm = lse_group<false, kFast>(s, T(1), T(0), oA, oB);
      if (gm > neg_inf<T>() && gm < pos_inf<T>()) {  // NaN or infinite lanes: lane by lane below
#pragma unroll
        for (int v = 0; v < G; ++v) acc.sum += s[v];
        lse_fold<false>(acc.m, acc.dA, acc.dB, gm, oA, oB, T(1), T(0));
        continue;
      }
    }
#pragma unroll
    for (int v = 0; v < G; ++v) lane(k + v, s[v]);
  }
  for (; k < n; ++k) lane(k, scale(k) * x[int64_t(k) * stride] + b);
  return acc;
}

template <typename T>
FL_HD FL_INLINE void store_line(const Acc<T>& acc, T* part) {
  part[0] = acc.m;
  part[1] = acc.dA;
  part[2] = acc.pos;
  part[3] = acc.sum;
}

// log-mass n of the negatives: LSE_A, or with HCL (Nn sum e^{a s} / sum e^{beta s}) in log space.
template <typename T>
FL_HD FL_INLINE T neg_log_mass(const T* st, const Params<T>& p) {
  const T A = lse_of(p.a() * st[kM], st[kAd]);
  if (!p.hcl()) return A;
  if (!(st[kCount] > T(0))) return neg_inf<T>();
  return A - lse_of(p.beta * st[kM], st[kBd]) + std::log(st[kCount]);
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
  const T l = lse_of(st[kM], st[kAd]);
  st[kLse] = l;
  return st[kCount] > T(0) ? l - st[kPos] / st[kCount] : T(0);
}

// Writes a row's record from its merged accumulator and returns the row loss. negatives: the number of
// negative lanes (softmax, sigmoid). The sigmoid record's kLse is log(e^{s_p} + sum_neg e^s) (return_stats).
template <typename T>
FL_HD FL_INLINE T finish_row(int kind, const Acc<T>& acc, T negatives, T* st, const Params<T>& p) {
  acc.to_record(st, kind == kSupCon ? acc.cnt : negatives);
  if (kind == kSupCon) return finalize_supcon(st);
  if (kind == kSigmoid) {
    finalize_softmax(st, Params<T>{T(0), T(0), false});
    return acc.loss;
  }
  return finalize_softmax(st, p);
}

// Column record after the last row block (symmetric softmax): the column pass has put the diagonal logit in
// kPos and every row's logit in kSum.
template <typename T>
FL_HD FL_INLINE T finalize_column(T* st, T rows, const Params<T>& p) {
  st[kCount] = rows - T(1);
  return finalize_softmax(st, p);
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
    c[cALse] = lse_of(p.a() * st[kM], st[kAd]);
    if (p.hcl()) {
      c[cGB] = g * cn * p.beta;
      c[cBLse] = lse_of(p.beta * st[kM], st[kBd]);
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

// dL/ds of a negative (non-positive, non-self) softmax lane from its record's coefficients (gA, aLse, gB, bLse,
// gAll as in Coef): the HCL and label-smoothing terms only where compiled in, so that a loop over lanes holds no
// per-lane branch (the CPU loops vectorise; unused coefficient reads vanish). kFast: the hardware exp for logits
// of fp16 / bf16 features (CUDA; see fl_exp_diff_if_fast).
template <bool kHcl, bool kSmooth, bool kFast = false, typename T>
FL_HD FL_INLINE T neg_lane_grad(T s, T gA, T aLse, T gB, T bLse, T gAll, const Params<T>& p) {
  T g = gA * fl_exp_diff_if_fast<kFast>(p.a() * s, aLse);
  if constexpr (kSmooth) g += gAll;
  if constexpr (kHcl) g -= gB * fl_exp_diff_if_fast<kFast>(p.beta * s, bLse);
  return g;
}

// The same from a coefficient array c[kCoefs] (with strides 1) or a (kCoefs, n) table (stride n, column j).
template <bool kHcl, bool kSmooth, bool kFast = false, typename T>
FL_HD FL_INLINE T neg_lane_grad(T s, const T* c, int64_t stride, const Params<T>& p) {
  return neg_lane_grad<kHcl, kSmooth, kFast>(s, c[cGA * stride], c[cALse * stride], c[cGB * stride],
                                             c[cBLse * stride], c[cGAll * stride], p);
}

// Gradient of a negative lane of a softmax / SupCon record (options chosen at run time).
template <bool kFast = false, typename T>
FL_HD FL_INLINE T neg_grad(T s, const T* c, const Params<T>& p) {
  return p.hcl() ? neg_lane_grad<true, true, kFast>(s, c, 1, p) : neg_lane_grad<false, true, kFast>(s, c, 1, p);
}

// dL/ds of one lane for one record (row or column view). is_pos: the record's positive (softmax: its one
// positive; SupCon: same label); is_self: excluded from the record entirely.
template <bool kFast = false, typename T>
FL_HD FL_INLINE T lane_grad(int kind, T s, bool is_pos, bool is_self, const T* c, const Params<T>& p) {
  if (is_self) return T(0);
  if (kind == kSigmoid) return is_pos ? -c[cGA] * sigmoid<kFast>(-s) : c[cGA] * sigmoid<kFast>(s);
  if (kind == kSupCon) return c[cGA] * fl_exp_diff_if_fast<kFast>(s, c[cALse]) + (is_pos ? c[cGPos] : T(0));
  return is_pos ? c[cGPos] : neg_grad<kFast>(s, c, p);
}

// The column view's dL/ds of lane j (symmetric softmax), reading from the (kCoefs, n) table only the
// coefficients this lane needs: a backward that streams them per element moves 8 bytes per lane in plain CLIP
// instead of all 6 coefficients. Equal to lane_grad(kSoftmax, s, is_pos, false, column j's coefficients, p)
// (without smoothing gall is 0).
template <bool kFast = false, typename T>
FL_HD FL_INLINE T column_lane_grad(T s, bool is_pos, const T* soa, int64_t n, int64_t j, const Params<T>& p) {
  if (is_pos) return soa[cGPos * n + j];
  const T* c = soa + j;
  if (p.hcl())
    return p.eps > T(0) ? neg_lane_grad<true, true, kFast>(s, c, n, p) : neg_lane_grad<true, false, kFast>(s, c, n, p);
  return p.eps > T(0) ? neg_lane_grad<false, true, kFast>(s, c, n, p) : neg_lane_grad<false, false, kFast>(s, c, n, p);
}

// Everything an epilogue needs about one block of rows: raw dot products tile[r * M + j] = <q_{row0+r}, k_j>
// (read-only in the forward), the global per-row scales, and the statistics / outputs of the whole problem.
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
  T* col_stats;              // (M, kStats), symmetric only: running column accumulators, then records
  T* row_loss;               // (N,)
  T* row_coef;               // (kCoefs, N), backward (fwd_grad_tile writes its block's columns)
  const T* col_coef;         // (kCoefs, M), backward, symmetric only
  T* dscale;                 // (N,) backward: sum_j G_ij <q_i, k_j>
  T* dbias_rows;             // (N,) backward: sum_j G_ij
  void* grad_out;            // backward: (rows, M) t_i * G_ij, in T over the tile or fp16 / bf16 (GradOut)
  int grad_kind;             // GradOut
  bool fast_exp;             // the tile holds logits of fp16 / bf16 features: the CUDA epilogues take the
                             // hardware exp (its ~2 ulp are far below the features' own rounding)
  Params<T> p;
  int kind;
  bool symmetric, exclude_self;
  FL_HD FL_INLINE T bias_value() const { return bias ? *bias : T(0); }
  // The row's positive key (softmax, sigmoid; -1 for SupCon) and whether it is out of [0, M).
  FL_HD FL_INLINE int64_t positive_of(int64_t i) const { return kind == kSupCon ? -1 : positive[i]; }
  FL_HD FL_INLINE bool bad_positive(int64_t p) const { return kind != kSupCon && (p < 0 || p >= M); }
  // The lane excluded as "self" for row i (-1: none): j == i when exclude_self, unless it is the positive.
  FL_HD FL_INLINE int64_t self_lane(int64_t i, int64_t p) const {
    return exclude_self && i < M && (kind == kSupCon || i != p) ? i : -1;
  }
};

}  // namespace fastloss::contrastive

namespace fastloss::contrastive {

// --- The fused GEMM epilogue's lane maths (CUDA: csrc/cuda/contrastive_sm90.cu; its CPU twin: csrc/cpu/
// contrastive.cpp, FASTLOSS_CONTRASTIVE_FUSED=1). Tiles of S are kFusedTileM x kFusedTileN; every row and column
// of a tile leaves one partial (fold_line above for the forward, grad_line below for the backward), merged later
// in tile order, so S is never needed as a whole block.
constexpr int kFusedTileM = 128, kFusedTileN = 128;
constexpr int kGradPart = 8;  // floats per backward partial: dscale, dbias, then (with the forward) m, dA, pos, loss

// Row i of a block over one tile's n lanes x[c] = <q_i, k_{c0 + c}>, in place: x[c] <- t_i G_ij, with the row's
// partial d scale = sum_j G_ij x_ij and d bias = sum_j G_ij in part[0..1]; kFwd (SigLIP's one pass, coefficients
// of a unit upstream gradient) also the row's partial record (m, dA, pos, loss) in part[2..5]. A row whose
// positive is out of range gives G = 0 (its merge makes d scale / d bias NaN). The lanes are row_bwd_kernel's.
template <bool kFast, bool kFwd, typename T>
FL_HD FL_INLINE void grad_line(T* x, int n, int64_t c0, int64_t i, T ti, const TileArgs<T>& a, T* part) {
  const T b = a.bias_value();
  const int64_t p = a.positive_of(i);
  const bool bad = a.bad_positive(p);
  const int64_t self = a.self_lane(i, p);
  T rc[kCoefs];
  if constexpr (kFwd)
    make_coef(kSigmoid, static_cast<const T*>(nullptr), T(1), a.p, rc);  // reads no record
  else
    load_coef(a.row_coef, a.N, i, rc);
  T dscale = T(0), dbias = T(0);
  Acc<T> fwd = Acc<T>::empty();
  auto lane = [&](int64_t j, T raw) {  // t_i G_ij of lane j, with the row's sums
    const T s = ti * raw + b;
    const bool is_self = j == self, is_pos = j == p;
    T g = T(0);
    if constexpr (kFwd) {  // SigLIP: the lane's gradient and loss from one e = exp(-|s|)
      if (!is_self) {
        const T e = fl_exp_if_fast<kFast>(s >= T(0) ? -s : s), inv = T(1) / (T(1) + e);
        const T up = s >= T(0) ? inv : e * inv, down = s >= T(0) ? e * inv : inv;  // sigmoid(s), sigmoid(-s)
        T log1p_e;
        if constexpr (kFast && std::is_same_v<T, float>)
          log1p_e = log1p_unit(e);
        else
          log1p_e = std::log1p(e);
        g = is_pos ? -rc[cGA] * down : rc[cGA] * up;
        if (is_pos) {
          fwd.pos = s;
          fwd.loss += (s < T(0) ? -s : T(0)) + log1p_e;  // softplus(-s)
        } else {
          fwd.loss += (s > T(0) ? s : T(0)) + log1p_e;  // softplus(s)
          fwd.push(s, T(1), T(0), false);
        }
      }
    } else {
      g = lane_grad<kFast>(a.kind, s, is_pos, is_self, rc, a.p);
      if (a.symmetric) g += column_lane_grad<kFast>(s, j == i, a.col_coef, a.M, j, a.p);
    }
    g = bad ? T(0) : g;
    dscale += g * raw;
    dbias += g;
    return ti * g;
  };
  // Chunks of 8 lanes: all loads of a chunk before its stores, so that a GPU thread has 8 in flight.
  constexpr int G = 8;
  int c = 0;
  for (; c + G <= n; c += G) {
    T raw[G], out[G];
#pragma unroll
    for (int v = 0; v < G; ++v) raw[v] = x[c + v];
#pragma unroll
    for (int v = 0; v < G; ++v) out[v] = lane(c0 + c + v, raw[v]);
#pragma unroll
    for (int v = 0; v < G; ++v) x[c + v] = out[v];
  }
  for (; c < n; ++c) x[c] = lane(c0 + c, x[c]);
  part[0] = dscale;
  part[1] = dbias;
  if constexpr (kFwd) {
    part[2] = fwd.m;
    part[3] = fwd.dA;
    part[4] = fwd.pos;
    part[5] = fwd.loss;
  }
}

template <typename T>
FL_HD FL_INLINE Acc<T> fwd_of_grad_part(const T* part) {
  return {part[2], part[3], T(0), part[4], T(0), T(0), part[5]};
}

// Row i's record and loss from its merged forward partials (plain softmax); an out-of-range positive gives a NaN
// record and loss, as row_fwd_kernel.
template <typename T>
FL_HD FL_INLINE void finish_fold_row(const TileArgs<T>& a, int64_t i, const Acc<T>& acc) {
  T* st = a.row_stats + i * kStats;
  const int64_t p = a.positive_of(i);
  if (a.bad_positive(p)) {
    const T nan = std::numeric_limits<T>::quiet_NaN();
    for (int k = 0; k < kStats; ++k) st[k] = nan;
    a.row_loss[i] = nan;
    return;
  }
  a.row_loss[i] = finish_row(kSoftmax, acc, T(a.M - 1 - (a.self_lane(i, p) >= 0 ? 1 : 0)), st, a.p);
}

// Row i's d scale / d bias (and, kFwd, SigLIP record and loss) from its merged backward partials; NaN for an
// out-of-range positive, as row_bwd_kernel.
template <bool kFwd, typename T>
FL_HD FL_INLINE void finish_grad_row(const TileArgs<T>& a, int64_t i, T dscale, T dbias, const Acc<T>& fwd) {
  const int64_t p = a.positive_of(i);
  if (a.bad_positive(p)) {
    const T nan = std::numeric_limits<T>::quiet_NaN();
    a.dscale[i] = a.dbias_rows[i] = nan;
    if constexpr (kFwd) {
      for (int k = 0; k < kStats; ++k) a.row_stats[i * kStats + k] = nan;
      a.row_loss[i] = nan;
    }
    return;
  }
  a.dscale[i] = dscale;
  a.dbias_rows[i] = dbias;
  if constexpr (kFwd) {
    const int64_t self = a.self_lane(i, p);
    a.row_loss[i] = finish_row(kSigmoid, fwd, T(a.M - 1 - (self >= 0 ? 1 : 0)), a.row_stats + i * kStats, a.p);
  }
}

}  // namespace fastloss::contrastive
