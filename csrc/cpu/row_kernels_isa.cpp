// CPU row kernels, compiled once per instruction set (FL_CPU_ISA_NS = base | avx2; see CMakeLists.txt).
// Rows are walked in chunks that stay in L1: each chunk is loaded once from memory (converted to the
// accumulation type and pre-mapped when needed), then reduced or mapped with explicit SIMD vectors
// (simd.h) whose lanes run the shared torch-free maths of fastloss/row_losses.h. Lane sums are combined in a
// fixed order, so results are bit-reproducible for a given build and instruction set.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "fastloss/row_losses.h"
#include "fastloss/spherical.h"
#include "row_kernels.h"
#include "simd.h"

#ifndef FL_CPU_ISA_NS
#error "FL_CPU_ISA_NS must name the instruction-set namespace"
#endif

namespace fastloss::cpu::FL_CPU_ISA_NS {
namespace {

constexpr int64_t kChunk = 512;  // elements per chunk (2 KiB of fp32), a multiple of every SIMD width

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Loads chunk [k0, k0 + n) of one row as acc_t with the pre-map applied. Returns the row itself when the
// logits already are acc_t and the pre-map is the identity. With softcap on, dz/dx lands in `dz`.
template <typename scalar_t>
struct ChunkLoader {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* row;
  PreMap<acc_t> pm;
  bool identity, has_softcap;
  acc_t buf[kChunk], dz[kChunk];

  const acc_t* load(int64_t k0, int64_t n) {
    const scalar_t* x = row + k0;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (identity) return x;
    }
    if (identity) {
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(x[i]);
    } else if (!has_softcap) {
      for (int64_t i = 0; i < n; ++i) buf[i] = pm.scale * static_cast<acc_t>(x[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) pm.value_and_grad(static_cast<acc_t>(x[i]), buf[i], dz[i]);
    }
    return buf;
  }
  // Writable copy of the chunk (to apply the target margin to one element).
  acc_t* load_mutable(int64_t k0, int64_t n) {
    const acc_t* z = load(k0, n);
    if (z != buf) std::copy(z, z + n, buf);
    return buf;
  }
};

template <typename scalar_t>
ChunkLoader<scalar_t> make_loader(const RowArgs& a) {
  using acc_t = acc_type<scalar_t>;
  ChunkLoader<scalar_t> L;
  L.row = static_cast<const scalar_t*>(a.logits);
  L.pm = {acc_t(a.scale), acc_t(a.softcap), a.softcap > 0 ? acc_t(1.0 / a.softcap) : acc_t(0)};
  L.has_softcap = a.softcap > 0;
  L.identity = a.scale == 1.0 && !L.has_softcap;
  return L;
}

// Stores acc_t values as scalar_t.
template <typename scalar_t, typename acc_t>
FL_INLINE void store_chunk(const acc_t* d, int64_t n, scalar_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(d[i]);
}

// ------------------------------------------------------------------------------------------------ CE

// Folds one chunk into the online state: the chunk's own (max, rest) is exact, then LseState::merge. Returns
// the chunk's maximum (-inf for a chunk of -inf and NaN only).
template <typename acc_t>
acc_t ce_reduce_chunk(const acc_t* z, const acc_t* w, int64_t n, bool smoothing, LseState<acc_t>& st,
                      acc_t& sum_wz) {
  using S = Simd<acc_t>;
  using V = typename S::V;
  constexpr int W = S::W;
  int64_t i = 0;
  V mv = S::splat(neg_inf<acc_t>());
  for (; i + W <= n; i += W) {
    V v = S::load(z + i);
    mv = v > mv ? v : mv;
  }
  acc_t cm = S::max(mv);
  for (; i < n; ++i) cm = z[i] > cm ? z[i] : cm;

  if (cm != neg_inf<acc_t>()) {
    const V cmv = S::splat(cm), zero = S::splat(0), one = S::splat(1);
    V rv = zero, tv = zero;
    for (i = 0; i + W <= n; i += W) {
      V v = S::load(z + i);
      rv += v == cmv ? zero : fl_exp(v - cmv);  // a NaN logit makes r NaN
      tv += v == cmv ? one : zero;
    }
    acc_t r = S::sum(rv), ties = S::sum(tv);
    for (; i < n; ++i) {
      r += z[i] == cm ? acc_t(0) : fl_exp(z[i] - cm);
      ties += z[i] == cm ? acc_t(1) : acc_t(0);
    }
    st.merge({cm, r + (ties - acc_t(1))});
  } else {
    // All -inf (masked), or NaN next to -inf only: let a NaN reach the state.
    for (i = 0; i < n; ++i)
      if (z[i] != z[i]) st.r = z[i];
  }
  if (smoothing) {
    V sv = S::splat(0);
    for (i = 0; i + W <= n; i += W) sv += (w ? S::load(w + i) : S::splat(1)) * S::load(z + i);
    acc_t s = S::sum(sv);
    for (; i < n; ++i) s += (w ? w[i] : acc_t(1)) * z[i];
    sum_wz += s;
  }
  return cm;
}

template <typename scalar_t>
void ce_fwd_rows(const RowArgs& a, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  const acc_t* weight = static_cast<const acc_t*>(a.weight);
  const acc_t* margin = static_cast<const acc_t*>(a.margin);
  acc_t* parts = static_cast<acc_t*>(a.parts);
  acc_t* stats = static_cast<acc_t*>(a.stats);
  const int64_t C = a.C;
  auto L = make_loader<scalar_t>(a);
  for (int64_t row = begin; row < end; ++row) {
    L.row = static_cast<const scalar_t*>(a.logits) + row * a.row_stride;
    const int64_t y = a.target[row];
    const bool ignored = y == a.ignore_index;
    const acc_t margin_y = ignored ? acc_t(0) : (margin ? margin[y] : acc_t(a.margin_scalar));
    LseState<acc_t> st = LseState<acc_t>::empty();
    acc_t sum_wz = 0, z_y = 0;
    for (int64_t k0 = 0; k0 < C; k0 += kChunk) {
      const int64_t n = std::min(kChunk, C - k0);
      const acc_t* z;
      if (!ignored && y >= k0 && y < k0 + n) {
        acc_t* zm = L.load_mutable(k0, n);
        zm[y - k0] -= margin_y;
        z_y = zm[y - k0];
        z = zm;
      } else {
        z = L.load(k0, n);
      }
      ce_reduce_chunk<acc_t>(z, weight ? weight + k0 : nullptr, n, a.with_smoothing, st, sum_wz);
    }
    const acc_t w_y = (ignored || !weight) ? acc_t(1) : weight[y];
    CeParts<acc_t> p = ce_finalize<acc_t>(st, z_y, w_y, sum_wz, acc_t(a.sum_w), ignored, a.with_smoothing);
    parts[3 * row + 0] = p.nll;
    parts[3 * row + 1] = p.smooth;
    parts[3 * row + 2] = p.lse;
    stats[3 * row + 0] = st.m;
    stats[3 * row + 1] = st.r;
    stats[3 * row + 2] = z_y;
  }
}

// d = dL/dz * dz/dx for one chunk; dzdx is the loader's derivative buffer (softcap) or the scale.
template <typename acc_t, bool kSoftcap, bool kWeight>
void ce_bwd_chunk(const CeGradRow<acc_t>& g, acc_t scale, const acc_t* z, const acc_t* dzdx, const acc_t* w,
                  int64_t n, acc_t* d) {
  using S = Simd<acc_t>;
  int64_t i = 0;
  for (; i + S::W <= n; i += S::W) {
    const auto dv = g.other(S::load(z + i), kWeight ? S::load(w + i) : S::splat(1));
    S::store(d + i, kSoftcap ? dv * S::load(dzdx + i) : dv * scale);
  }
  for (; i < n; ++i) {
    const acc_t dv = g.other(z[i], kWeight ? w[i] : acc_t(1));
    d[i] = kSoftcap ? dv * dzdx[i] : dv * scale;
  }
}

template <typename scalar_t>
void ce_bwd_rows(const RowArgs& a, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  const acc_t* weight = static_cast<const acc_t*>(a.weight);
  const acc_t* stats = static_cast<const acc_t*>(a.stats);
  const acc_t* gparts = static_cast<const acc_t*>(a.grad_parts);
  const int64_t C = a.C;
  auto L = make_loader<scalar_t>(a);
  acc_t d[kChunk];
  for (int64_t row = begin; row < end; ++row) {
    L.row = static_cast<const scalar_t*>(a.logits) + row * a.row_stride;
    scalar_t* out = static_cast<scalar_t*>(a.grad_logits) + row * C;
    const int64_t y = a.target[row];
    const bool ignored = y == a.ignore_index;
    const acc_t z_y = stats[3 * row + 2];
    acc_t z_unused, dz_y = 0, w_y = 1;  // only dz/dx of the target is needed: z_y comes from the stats
    if (!ignored) {
      L.pm.value_and_grad(static_cast<acc_t>(L.row[y]), z_unused, dz_y);
      if (weight) w_y = weight[y];
    }
    const auto g = CeGradRow<acc_t>::make(stats[3 * row], stats[3 * row + 1], gparts[3 * row],
                                          gparts[3 * row + 1], gparts[3 * row + 2], w_y, acc_t(a.sum_w),
                                          z_y, ignored);
    if (g.ga + g.gp == acc_t(0) && g.gw == acc_t(0)) {  // ignored row with no use of its lse
      std::fill(out, out + C, static_cast<scalar_t>(0));
      continue;
    }
    for (int64_t k0 = 0; k0 < C; k0 += kChunk) {
      const int64_t n = std::min(kChunk, C - k0);
      const acc_t* z = L.load(k0, n);
      const acc_t* w = weight ? weight + k0 : nullptr;
      acc_t* dst = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(out + k0) : d;
      const acc_t sc = L.pm.scale;
      if (L.has_softcap)
        w ? ce_bwd_chunk<acc_t, true, true>(g, sc, z, L.dz, w, n, dst)
          : ce_bwd_chunk<acc_t, true, false>(g, sc, z, L.dz, w, n, dst);
      else
        w ? ce_bwd_chunk<acc_t, false, true>(g, sc, z, L.dz, w, n, dst)
          : ce_bwd_chunk<acc_t, false, false>(g, sc, z, L.dz, w, n, dst);
      if (!std::is_same_v<scalar_t, acc_t>) store_chunk(d, n, out + k0);
    }
    if (!ignored) out[y] = static_cast<scalar_t>(g.target(z_y, w_y) * dz_y);
  }
}

// ------------------------------------------------------------------------------------ CE, probability targets

// u_k = w_k t_k of chunk [k0, k0 + n) of a row of probability targets, as acc_t: the targets themselves when
// they are acc_t and unweighted, else written to buf.
template <typename scalar_t, typename acc_t>
FL_INLINE const acc_t* prob_chunk(const RowArgs& a, int64_t row, int64_t k0, int64_t n, const acc_t* w, acc_t* buf) {
  const int64_t off = row * a.C + k0;
  acc_t* u = buf;
  if (a.prob_is_acc || std::is_same_v<scalar_t, acc_t>) {
    const acc_t* t = static_cast<const acc_t*>(a.prob) + off;
    if (!w) return t;
    for (int64_t i = 0; i < n; ++i) u[i] = w[i] * t[i];
  } else {
    const scalar_t* t = static_cast<const scalar_t*>(a.prob) + off;
    for (int64_t i = 0; i < n; ++i) u[i] = w ? w[i] * static_cast<acc_t>(t[i]) : static_cast<acc_t>(t[i]);
  }
  return u;
}

// The chunk's ProbSums relative to its own maximum cm.
template <typename acc_t>
ProbSums<acc_t> prob_chunk_sums(const acc_t* z, const acc_t* u, int64_t n, acc_t cm) {
  ProbSums<acc_t> c{acc_t(0), acc_t(0)};
  if (cm == neg_inf<acc_t>()) {  // a masked (or NaN) chunk: the scalar rule for -inf classes
    for (int64_t i = 0; i < n; ++i) c.add(u[i], z[i], cm);
    return c;
  }
  using S = Simd<acc_t>;
  using V = typename S::V;
  const V cmv = S::splat(cm), zero = S::splat(0);
  V sv = zero, av = zero;
  int64_t i = 0;
  for (; i + S::W <= n; i += S::W) {
    const V uv = S::load(u + i);
    sv += uv;
    av += uv == zero ? zero : uv * (cmv - S::load(z + i));  // cm - (-inf) = +inf
  }
  c.S = S::sum(sv);
  c.A = S::sum(av);
  for (; i < n; ++i) c.add(u[i], z[i], cm);
  return c;
}

template <typename scalar_t>
void ce_prob_fwd_rows(const RowArgs& a, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  const acc_t* weight = static_cast<const acc_t*>(a.weight);
  acc_t* parts = static_cast<acc_t*>(a.parts);
  acc_t* stats = static_cast<acc_t*>(a.stats);
  const int64_t C = a.C;
  auto L = make_loader<scalar_t>(a);
  acc_t ubuf[kChunk];
  for (int64_t row = begin; row < end; ++row) {
    L.row = static_cast<const scalar_t*>(a.logits) + row * a.row_stride;
    LseState<acc_t> st = LseState<acc_t>::empty();
    ProbSums<acc_t> ps{acc_t(0), acc_t(0)};
    acc_t sum_wz = 0;
    for (int64_t k0 = 0; k0 < C; k0 += kChunk) {
      const int64_t n = std::min(kChunk, C - k0);
      const acc_t* w = weight ? weight + k0 : nullptr;
      const acc_t* z = L.load(k0, n);
      const acc_t* u = prob_chunk<scalar_t>(a, row, k0, n, w, ubuf);
      const acc_t m_old = st.m;
      const acc_t cm = ce_reduce_chunk<acc_t>(z, w, n, a.with_smoothing, st, sum_wz);
      ps.merge(prob_chunk_sums(z, u, n, cm), m_old, cm, st.m);
    }
    const acc_t lse = st.lse();
    parts[3 * row + 0] = ps.nll(st);
    parts[3 * row + 1] = a.with_smoothing ? acc_t(a.sum_w) * lse - sum_wz : acc_t(0);
    parts[3 * row + 2] = lse;
    stats[3 * row + 0] = st.m;
    stats[3 * row + 1] = st.r;
    stats[3 * row + 2] = ps.S;
  }
}

template <typename acc_t, bool kSoftcap>
void ce_prob_bwd_chunk(const ProbGradRow<acc_t>& g, acc_t scale, const acc_t* z, const acc_t* dzdx, const acc_t* u,
                       const acc_t* w, int64_t n, acc_t* d) {
  using S = Simd<acc_t>;
  int64_t i = 0;
  for (; i + S::W <= n; i += S::W) {
    const auto dv = g.grad(S::load(z + i), S::load(u + i), w ? S::load(w + i) : S::splat(1));
    S::store(d + i, kSoftcap ? dv * S::load(dzdx + i) : dv * scale);
  }
  for (; i < n; ++i) {
    const acc_t dv = g.grad(z[i], u[i], w ? w[i] : acc_t(1));
    d[i] = kSoftcap ? dv * dzdx[i] : dv * scale;
  }
}

template <typename scalar_t>
void ce_prob_bwd_rows(const RowArgs& a, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  const acc_t* weight = static_cast<const acc_t*>(a.weight);
  const acc_t* stats = static_cast<const acc_t*>(a.stats);
  const acc_t* gparts = static_cast<const acc_t*>(a.grad_parts);
  const int64_t C = a.C;
  auto L = make_loader<scalar_t>(a);
  acc_t d[kChunk], ubuf[kChunk];
  for (int64_t row = begin; row < end; ++row) {
    L.row = static_cast<const scalar_t*>(a.logits) + row * a.row_stride;
    scalar_t* out = static_cast<scalar_t*>(a.grad_logits) + row * C;
    const auto g = ProbGradRow<acc_t>::make(stats[3 * row], stats[3 * row + 1], stats[3 * row + 2], gparts[3 * row],
                                            gparts[3 * row + 1], gparts[3 * row + 2], acc_t(a.sum_w));
    for (int64_t k0 = 0; k0 < C; k0 += kChunk) {
      const int64_t n = std::min(kChunk, C - k0);
      const acc_t* w = weight ? weight + k0 : nullptr;
      const acc_t* z = L.load(k0, n);
      const acc_t* u = prob_chunk<scalar_t>(a, row, k0, n, w, ubuf);
      acc_t* dst = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(out + k0) : d;
      if (L.has_softcap)
        ce_prob_bwd_chunk<acc_t, true>(g, L.pm.scale, z, L.dz, u, w, n, dst);
      else
        ce_prob_bwd_chunk<acc_t, false>(g, L.pm.scale, z, L.dz, u, w, n, dst);
      if (!std::is_same_v<scalar_t, acc_t>) store_chunk(d, n, out + k0);
    }
  }
}

// ------------------------------------------------------------------------------------------ spherical family

// Target j of a row for the spherical row driver; x0 is the shift of the sums (the row's first value).
template <typename scalar_t, typename acc_t>
struct SphericalRowTargets {
  const scalar_t* row;
  const int64_t* target;  // K entries
  const acc_t* weight;    // K entries or nullptr
  int64_t ignore_index;
  acc_t x0, d;            // d = mean - x0
  SphericalTarget<acc_t> operator()(int64_t j) const {
    const int64_t c = target[j];
    if (c == ignore_index) return {false, c, acc_t(0), acc_t(0), acc_t(0)};
    const acc_t oc = static_cast<acc_t>(row[c]);
    return {true, c, oc, (oc - x0) - d, weight ? weight[j] : acc_t(1)};
  }
};

template <typename acc_t>
SphericalLoss<acc_t> spherical_loss_of(const RowArgs& a) {
  return {a.kind, acc_t(a.a), acc_t(a.b), acc_t(a.eps), acc_t(a.C)};
}

template <typename scalar_t>
void spherical_fwd_rows(const RowArgs& a, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  using S = Simd<acc_t>;
  using V = typename S::V;
  acc_t* loss = static_cast<acc_t*>(a.parts);
  acc_t* stats = static_cast<acc_t*>(a.stats);
  const int64_t C = a.C;
  const auto sl = spherical_loss_of<acc_t>(a);
  auto L = make_loader<scalar_t>(a);
  for (int64_t row = begin; row < end; ++row) {
    L.row = static_cast<const scalar_t*>(a.logits) + row * a.row_stride;
    const acc_t K = static_cast<acc_t>(L.row[0]);  // shift: a value of the row itself
    const V Kv = S::splat(K);
    // each chunk centred on its own mean (two passes), then merged in double: a wide row merges thousands of
    // chunks, and the running mean would gather each merge's rounding in fp32
    SphericalSums<double> st{0, 0, 0};
    for (int64_t k0 = 0; k0 < C; k0 += kChunk) {
      const int64_t n = std::min(kChunk, C - k0);
      const acc_t* z = L.load(k0, n);
      V sv = S::splat(0);
      int64_t i = 0;
      for (; i + S::W <= n; i += S::W) sv += S::load(z + i) - Kv;
      acc_t sum = S::sum(sv);
      for (; i < n; ++i) sum += z[i] - K;
      const acc_t mean = sum / acc_t(n);
      const V Mv = S::splat(mean);  // (not z - (K + mean): K + mean would round at K's scale)
      V qv = S::splat(0);
      for (i = 0; i + S::W <= n; i += S::W) {
        const V e = (S::load(z + i) - Kv) - Mv;
        qv += e * e;
      }
      acc_t dev = S::sum(qv);
      for (; i < n; ++i) dev += ((z[i] - K) - mean) * ((z[i] - K) - mean);
      st.merge({double(n), double(mean), double(dev)});
    }
    const auto cs = CentredSums<acc_t>::of({acc_t(st.n), acc_t(st.d), acc_t(st.m2)});
    const SphericalRowTargets<scalar_t, acc_t> tg{
        L.row, a.target + row * a.K,
        a.target_weight ? static_cast<const acc_t*>(a.target_weight) + row * a.K : nullptr, a.ignore_index, K,
        cs.d};
    loss[row] = spherical_row(sl, K + cs.d, cs.m2, a.K, tg);
    stats[2 * row + 0] = cs.d;
    stats[2 * row + 1] = cs.m2;
  }
}

template <typename scalar_t>
void spherical_bwd_rows(const RowArgs& a, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  using S = Simd<acc_t>;
  const acc_t* stats = static_cast<const acc_t*>(a.stats);
  const acc_t* gloss = static_cast<const acc_t*>(a.grad_parts);
  const int64_t C = a.C;
  const auto sl = spherical_loss_of<acc_t>(a);
  auto L = make_loader<scalar_t>(a);
  acc_t d[kChunk];
  for (int64_t row = begin; row < end; ++row) {
    L.row = static_cast<const scalar_t*>(a.logits) + row * a.row_stride;
    scalar_t* out = static_cast<scalar_t*>(a.grad_logits) + row * C;
    const acc_t K = static_cast<acc_t>(L.row[0]);
    const acc_t dm = stats[2 * row], m2 = stats[2 * row + 1];
    const SphericalRowTargets<scalar_t, acc_t> tg{
        L.row, a.target + row * a.K,
        a.target_weight ? static_cast<const acc_t*>(a.target_weight) + row * a.K : nullptr, a.ignore_index, K, dm};
    SphericalRowGrad<acc_t> g;
    spherical_row(sl, K + dm, m2, a.K, tg, gloss[row], &g);
    if (g.alpha == acc_t(0) && g.beta == acc_t(0) && g.gw == acc_t(0)) {
      std::fill(out, out + C, static_cast<scalar_t>(0));
      continue;
    }
    // dense part beta (x - mean) + alpha = beta ((x - K) - d) + alpha
    const acc_t off = g.alpha - g.beta * dm;
    for (int64_t k0 = 0; k0 < C; k0 += kChunk) {
      const int64_t n = std::min(kChunk, C - k0);
      const acc_t* z = L.load(k0, n);
      acc_t* dst = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(out + k0) : d;
      int64_t i = 0;
      const auto Kv = S::splat(K), bv = S::splat(g.beta), ov = S::splat(off);
      for (; i + S::W <= n; i += S::W) S::store(dst + i, bv * (S::load(z + i) - Kv) + ov);
      for (; i < n; ++i) dst[i] = g.beta * (z[i] - K) + off;
      if (!std::is_same_v<scalar_t, acc_t>) store_chunk(d, n, out + k0);
    }
    // target classes: the whole derivative in acc_t, rounded once
    for (int64_t j = 0; j < a.K; ++j) {
      const auto t = tg(j);
      if (!t.valid) continue;
      out[t.c] = static_cast<scalar_t>(g.beta * t.dev + g.alpha + spherical_target_grad(sl, m2, a.K, tg, g.gw, t.c));
    }
  }
}

// ------------------------------------------------------------------------------------------------ dtype

template <template <typename> class Fn>
void by_dtype(const RowArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case DType::f32: return Fn<float>::run(a, begin, end);
    case DType::f64: return Fn<double>::run(a, begin, end);
    case DType::f16: return Fn<c10::Half>::run(a, begin, end);
    case DType::bf16: return Fn<c10::BFloat16>::run(a, begin, end);
  }
}

#define FL_ROW_KERNEL(name)                                                                      \
  template <typename scalar_t>                                                                   \
  struct name##_k {                                                                              \
    static void run(const RowArgs& a, int64_t b, int64_t e) { name##_rows<scalar_t>(a, b, e); } \
  };
FL_ROW_KERNEL(ce_fwd)
FL_ROW_KERNEL(ce_bwd)
FL_ROW_KERNEL(spherical_fwd)
FL_ROW_KERNEL(spherical_bwd)
FL_ROW_KERNEL(ce_prob_fwd)
FL_ROW_KERNEL(ce_prob_bwd)
#undef FL_ROW_KERNEL

}  // namespace

extern const RowKernels kernels{&by_dtype<ce_fwd_k>,        &by_dtype<ce_bwd_k>,     &by_dtype<spherical_fwd_k>,
                                &by_dtype<spherical_bwd_k>, &by_dtype<ce_prob_fwd_k>, &by_dtype<ce_prob_bwd_k>};

}  // namespace fastloss::cpu::FL_CPU_ISA_NS
