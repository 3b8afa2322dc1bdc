// CPU epilogues of the contrastive engine (csrc/contrastive_engine.h), torch-free and compiled once per
// instruction set (FL_CPU_ISA_NS = base | avx2, like row_kernels_isa.cpp); contrastive.cpp picks the table at
// run time and runs them under at::parallel_for. The forward reads each tile element once per record view
// (row, and column when symmetric) and never writes the tile: W interleaved one-pass accumulators per row
// (lse_fold of fastloss/contrastive.h, the same maths as each CUDA thread), merged in lane order. Masked lanes
// (the positive, the excluded self) enter as -inf, which the fold ignores, so the loops stay branch-free and
// vectorise (exp is fastloss's polynomial; -fno-trapping-math lets GCC if-convert the selects); `omp simd`
// (-fopenmp-simd, no OpenMP runtime) keeps the reduction order fixed by the build. The backward patches its
// one or two special lanes after the loop.
#include <algorithm>
#include <type_traits>

#include "contrastive_kernels.h"
#include "simd.h"

#ifndef FL_CPU_ISA_NS
#error "FL_CPU_ISA_NS must name the instruction-set namespace"
#endif

namespace fastloss::cpu::FL_CPU_ISA_NS {
namespace {

using namespace fastloss::contrastive;

constexpr int kLanes = 16;  // interleaved accumulators per row (two AVX2 float vectors)

// Position of index k in the chunk [j0, j0 + n) as a small int, -1 when outside.
FL_INLINE int lane_in(int64_t k, int64_t j0, int64_t n) { return k >= j0 && k < j0 + n ? int(k - j0) : -1; }

// Explicit 8-float vectors for the whole 16-lane chunks of a float row: GCC 12 leaves the generic lane loops
// below scalar for kHcl = false (measured 11 ns per element instead of 1.4), so the common rows take this form.
// Vector h, lane l is accumulator lane 8h + l of the generic loop: the same interleaving, the same merge order.
using VF = Simd<float>;
constexpr int kVecs = kLanes / VF::W;
static_assert(kVecs * VF::W == kLanes, "kLanes must be a whole number of vectors");

struct LaneVecs {  // one accumulator array of kLanes floats, held in vectors
  VF::V v[kVecs];
  explicit LaneVecs(const float* a) {
    for (int h = 0; h < kVecs; ++h) v[h] = VF::load(a + h * VF::W);
  }
  void store(float* a) const {
    for (int h = 0; h < kVecs; ++h) VF::store(a + h * VF::W, v[h]);
  }
};

// visit(h, s, out, pos) for every vector of the chunks [0, body): s = t x + b, and the lane masks of the
// excluded self and of the positive.
template <typename Visit>
FL_INLINE void vector_chunks_f32(const float* x, int64_t body, int64_t self, int64_t p, float t, float b,
                                 Visit&& visit) {
  const vint iota = {0, 1, 2, 3, 4, 5, 6, 7};
  for (int64_t j0 = 0; j0 < body; j0 += kLanes) {
    const int ws = lane_in(self, j0, kLanes), wp = lane_in(p, j0, kLanes);
    for (int h = 0; h < kVecs; ++h) {
      const vint lane = iota + h * VF::W;
      visit(h, t * VF::load(x + j0 + h * VF::W) + b, vint(lane == ws), vint(lane == wp));
    }
  }
}

// Softmax rows (not SupCon): the accumulators m, dA, dB and the smoothing sum over the whole chunks.
template <bool kHcl>
void softmax_chunks_f32(const float* x, int64_t body, int64_t self, int64_t p, float t, float b, float alpha,
                        float beta, float* m, float* dA, float* dB, float* sum) {
  LaneVecs vm(m), vA(dA), vB(dB), vs(sum);
  const VF::V one = VF::splat(1.0f), ninf = VF::splat(neg_inf<float>());
  vector_chunks_f32(x, body, self, p, t, b, [&](int h, VF::V s, vint out, vint pos) {
    lse_fold<kHcl>(vm.v[h], vA.v[h], vB.v[h], (out | pos) ? ninf : s, one, one, alpha, beta);
    vs.v[h] += out ? VF::V{} : s;
  });
  vm.store(m);
  vA.store(dA);
  vB.store(dB);
  vs.store(sum);
}

// Softmax (InfoNCE, DCL, HCL, smoothing) and SupCon rows: one pass over the raw dot products of row i.
template <typename T, bool kSupConRow, bool kHcl>
void softmax_row(const TileArgs<T>& a, const T* x, int64_t i) {
  constexpr int W = kLanes;
  const int64_t M = a.M;
  const T t = a.scale[i], b = a.bias_value(), alpha = a.p.a(), beta = a.p.beta;
  const int64_t p = a.positive_of(i), self = a.self_lane(i, p);
  const int64_t li = kSupConRow ? a.labels_q[i] : 0;
  const int64_t* lk = a.labels_k;
  T m[W], dA[W], dB[W], sum[W], pos[W], cnt[W];
  for (int w = 0; w < W; ++w) {
    m[w] = neg_inf<T>();
    dA[w] = dB[w] = sum[w] = pos[w] = cnt[w] = T(0);
  }
  // Lane w of the accumulators takes element j = j0 + w; the special lanes are compared as small ints within
  // the chunk (int64 compares keep GCC from vectorising). SupCon: self is out, equal labels are positives (and
  // stay in the log-sum-exp); softmax: self is out, the positive is out of the negatives but in the smoothing
  // sum.
  auto chunk = [&](int64_t j0, int n) __attribute__((always_inline)) {
    const int ws = lane_in(self, j0, n), wp = lane_in(p, j0, n);
    const T* xc = x + j0;
#pragma omp simd
    for (int w = 0; w < n; ++w) {
      const T s = t * xc[w] + b;
      const bool out = w == ws;
      if constexpr (kSupConRow) {
        const bool eq = lk[j0 + w] == li && !out;
        lse_fold<false>(m[w], dA[w], dB[w], out ? neg_inf<T>() : s, T(1), T(1), T(1), T(0));
        pos[w] += eq ? s : T(0);
        cnt[w] += eq ? T(1) : T(0);
      } else {
        lse_fold<kHcl>(m[w], dA[w], dB[w], out || w == wp ? neg_inf<T>() : s, T(1), T(1), alpha, beta);
        sum[w] += out ? T(0) : s;
      }
    }
  };
  const int64_t body = M / W * W;
  int64_t j0 = 0;
  if constexpr (std::is_same_v<T, float> && !kSupConRow) {
    softmax_chunks_f32<kHcl>(x, body, self, p, t, b, alpha, beta, m, dA, dB, sum);
    j0 = body;
  }
  for (; j0 < body; j0 += W) chunk(j0, W);
  if (body < M) chunk(body, int(M - body));
  Acc<T> acc = Acc<T>::empty();
  for (int w = 0; w < W; ++w)
    acc.merge(Acc<T>{m[w], dA[w], dB[w], pos[w], sum[w], cnt[w], T(0)}, alpha, beta, kHcl);
  if (!kSupConRow) acc.pos = t * x[p] + b;
  a.row_loss[i] = finish_row(a.kind, acc, T(M - 1 - (self >= 0 ? 1 : 0)), a.row_stats + i * kStats, a.p);
}

// SigLIP rows: softplus terms (log1p_unit: libm's log1p is a scalar call) and the negatives' m, dA.
void sigmoid_chunks_f32(const float* x, int64_t body, int64_t self, int64_t p, float t, float b, float* m,
                        float* dA, float* loss) {
  LaneVecs vm(m), vA(dA), vl(loss);
  VF::V unused{};
  const VF::V one = VF::splat(1.0f), ninf = VF::splat(neg_inf<float>());
  vector_chunks_f32(x, body, self, p, t, b, [&](int h, VF::V s, vint out, vint pos) {
    const VF::V z = pos ? -s : s;  // softplus(z) = max(z, 0) + log1p(e^{-|z|})
    vl.v[h] += out ? VF::V{} : (z > 0.0f ? z : VF::V{}) + log1p_unit(fl_exp(s < 0.0f ? s : -s));
    lse_fold<false>(vm.v[h], vA.v[h], unused, (out | pos) ? ninf : s, one, one, 1.0f, 0.0f);
  });
  vm.store(m);
  vA.store(dA);
  vl.store(loss);
}

// SigLIP row: the softplus term of every lane but self and, in the same pass, the negatives' log-sum-exp
// (return_stats), in kLanes interleaved accumulators merged in lane order.
template <typename T>
void sigmoid_row(const TileArgs<T>& a, const T* x, int64_t i) {
  constexpr int W = kLanes;
  const int64_t M = a.M;
  const T t = a.scale[i], b = a.bias_value();
  const int64_t p = a.positive_of(i), self = a.self_lane(i, p);
  T m[W], dA[W], dB[W], loss[W];
  for (int w = 0; w < W; ++w) {
    m[w] = neg_inf<T>();
    dA[w] = dB[w] = loss[w] = T(0);
  }
  auto chunk = [&](int64_t j0, int n) {
    const int ws = lane_in(self, j0, n), wp = lane_in(p, j0, n);
    for (int w = 0; w < n; ++w) {
      const T s = t * x[j0 + w] + b;
      const bool out = w == ws, pos = w == wp;
      loss[w] += out ? T(0) : softplus(pos ? -s : s);
      lse_fold<false>(m[w], dA[w], dB[w], out || pos ? neg_inf<T>() : s, T(1), T(1), T(1), T(0));
    }
  };
  const int64_t body = M / W * W;
  int64_t j0 = 0;
  if constexpr (std::is_same_v<T, float>) {
    sigmoid_chunks_f32(x, body, self, p, t, b, m, dA, loss);
    j0 = body;
  }
  for (; j0 < body; j0 += W) chunk(j0, W);
  if (body < M) chunk(body, int(M - body));
  Acc<T> acc = Acc<T>::empty();
  for (int w = 0; w < W; ++w) acc.merge(Acc<T>{m[w], dA[w], dB[w], T(0), T(0), T(0), loss[w]}, T(1), T(0), false);
  acc.pos = t * x[p] + b;
  a.row_loss[i] = finish_row(a.kind, acc, T(M - 1 - (self >= 0 ? 1 : 0)), a.row_stats + i * kStats, a.p);
}

// One row of a whole column chunk (kContrastiveColumnChunk columns) in explicit vectors (as the rows above).
// diag: the lane of the row's diagonal.
template <bool kHcl>
FL_INLINE void column_vectors_f32(const float* x, float t, float b, int diag, float alpha, float beta, float* m,
                                  float* dA, float* dB, float* pos, float* sum) {
  using V = VF::V;
  const V one = VF::splat(1.0f), ninf = VF::splat(neg_inf<float>());
  const vint iota = {0, 1, 2, 3, 4, 5, 6, 7};
  for (int j = 0; j < int(kContrastiveColumnChunk); j += VF::W) {
    V vm = VF::load(m + j), vA = VF::load(dA + j), vB = VF::load(dB + j);
    const V s = t * VF::load(x + j) + b;
    const vint dg = (iota + j) == diag;
    lse_fold<kHcl>(vm, vA, vB, dg ? ninf : s, one, one, alpha, beta);
    VF::store(m + j, vm);
    VF::store(dA + j, vA);
    if constexpr (kHcl) VF::store(dB + j, vB);
    VF::store(pos + j, VF::load(pos + j) + (dg ? s : V{}));
    VF::store(sum + j, VF::load(sum + j) + s);
  }
}

// Folds this tile's rows into the running column accumulators of column chunks [c_lo, c_hi) (symmetric
// softmax: positive = the diagonal, which goes to kPos; every row's logit goes to kSum). col_stats hold
// accumulators until finish_columns.
template <typename T, bool kHcl>
void column_pass(const TileArgs<T>& a, int64_t c_lo, int64_t c_hi) {
  constexpr int64_t W = kContrastiveColumnChunk;
  const int64_t M = a.M, R = a.rows;
  const T alpha = a.p.a(), beta = a.p.beta, b = a.bias_value();
  T m[W], dA[W], dB[W], pos[W], sum[W];
  for (int64_t c = c_lo; c < c_hi; ++c) {
    const int64_t j0 = c * W, w = std::min(W, M - j0);
    for (int64_t j = 0; j < w; ++j) {
      const T* st = a.col_stats + (j0 + j) * kStats;
      m[j] = st[kM];
      dA[j] = st[kAd];
      dB[j] = st[kBd];
      pos[j] = st[kPos];
      sum[j] = st[kSum];
    }
    for (int64_t r = 0; r < R; ++r) {
      const T* x = a.tile + r * M + j0;
      const T t = a.scale[a.row0 + r];
      const int diag = lane_in(a.row0 + r, j0, w);  // lane of this row's diagonal element, -1: none
      if constexpr (std::is_same_v<T, float>) {
        if (w == W) {  // whole chunks in explicit vectors (see softmax_chunks_f32)
          column_vectors_f32<kHcl>(x, t, b, diag, alpha, beta, m, dA, dB, pos, sum);
          continue;
        }
      }
#pragma omp simd
      for (int j = 0; j < int(w); ++j) {
        const T s = t * x[j] + b;
        const bool dg = j == diag;
        lse_fold<kHcl>(m[j], dA[j], dB[j], dg ? neg_inf<T>() : s, T(1), T(1), alpha, beta);
        pos[j] += dg ? s : T(0);
        sum[j] += s;
      }
    }
    for (int64_t j = 0; j < w; ++j) {
      T* st = a.col_stats + (j0 + j) * kStats;
      st[kM] = m[j];
      st[kAd] = dA[j];
      st[kBd] = dB[j];
      st[kPos] = pos[j];
      st[kSum] = sum[j];
    }
  }
}

// The generic lanes of a softmax row's backward: the row's own gradient (its coefficients rc) plus, when
// symmetric, each column's (the positive and the self lane are patched by the caller). The options are template
// parameters so the loop holds no branch and vectorises. The row's smoothing term gAll is added always (0
// without smoothing), the columns' only with kSmooth, as neg_grad and column_lane_grad do.
template <typename T, bool kHcl, bool kSym, bool kSmooth>
void softmax_grad_lanes(const TileArgs<T>& a, T* x, const T* rc, T t, T b, const int64_t (&lane)[2], T& dt,
                        T& db) {
  const int64_t M = a.M;
  const T* cA = a.col_coef;  // SoA rows of the column coefficients (symmetric)
  const int64_t l0 = lane[0], l1 = lane[1];
  T sdt = dt, sdb = db;
#pragma omp simd reduction(+ : sdt, sdb)
  for (int64_t j = 0; j < M; ++j) {
    const T s = t * x[j] + b;
    T g = neg_lane_grad<kHcl, true>(s, rc, 1, a.p);
    if constexpr (kSym) g += neg_lane_grad<kHcl, kSmooth>(s, cA + j, M, a.p);
    const bool skip = j == l0 || j == l1;
    sdt += skip ? T(0) : g * x[j];
    sdb += skip ? T(0) : g;
    x[j] = t * g;
  }
  dt = sdt;
  db = sdb;
}

template <typename T>
void bwd_row(const TileArgs<T>& a, T* x, int64_t i) {
  const int64_t M = a.M, N = a.N;
  const T t = a.scale[i], b = a.bias_value();
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
      const bool skip = j == lane[0] || j == lane[1];
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
    const bool smooth = a.p.eps > T(0);
    auto run = [&](auto hcl, auto sym, auto sm) {
      softmax_grad_lanes<T, decltype(hcl)::value, decltype(sym)::value, decltype(sm)::value>(a, x, rc, t, b, lane,
                                                                                             dt, db);
    };
    using Y = std::true_type;
    using F = std::false_type;
    if (a.p.hcl())
      a.symmetric ? (smooth ? run(Y{}, Y{}, Y{}) : run(Y{}, Y{}, F{})) : run(Y{}, F{}, Y{});
    else
      a.symmetric ? (smooth ? run(F{}, Y{}, Y{}) : run(F{}, Y{}, F{})) : run(F{}, F{}, Y{});
  }
  for (int l = 0; l < 2; ++l) {
    const int64_t j = lane[l];
    if (j < 0) continue;
    const T s = t * xl[l] + b;
    T g = lane_grad(a.kind, s, l == 0, l == 1, rc, a.p);
    if (a.symmetric) g += column_lane_grad(s, j == i, a.col_coef, M, j, a.p);
    dt += g * xl[l];
    db += g;
    x[j] = t * g;
  }
  a.dscale[i] = dt;
  a.dbias_rows[i] = db;
}

template <typename T>
void fwd_rows(const TileArgs<T>& a, int64_t lo, int64_t hi) {
  for (int64_t r = lo; r < hi; ++r) {
    const T* s = a.tile + r * a.M;
    if (a.kind == kSigmoid)
      sigmoid_row(a, s, a.row0 + r);
    else if (a.kind == kSupCon)
      softmax_row<T, true, false>(a, s, a.row0 + r);
    else if (a.p.hcl())
      softmax_row<T, false, true>(a, s, a.row0 + r);
    else
      softmax_row<T, false, false>(a, s, a.row0 + r);
  }
}

template <typename T>
void columns(const TileArgs<T>& a, int64_t c_lo, int64_t c_hi) {
  a.p.hcl() ? column_pass<T, true>(a, c_lo, c_hi) : column_pass<T, false>(a, c_lo, c_hi);
}

template <typename T>
void bwd_rows(const TileArgs<T>& a, int64_t lo, int64_t hi) {
  for (int64_t r = lo; r < hi; ++r) bwd_row(a, a.tile + r * a.M, a.row0 + r);
}

}  // namespace

extern const ContrastiveKernelSet contrastive_kernels = {
    {&fwd_rows<float>, &columns<float>, &bwd_rows<float>},
    {&fwd_rows<double>, &columns<double>, &bwd_rows<double>},
};

}  // namespace fastloss::cpu::FL_CPU_ISA_NS
