// CPU kernels of sparsemax / entmax-1.5 and their Fenchel-Young losses (maths in fastloss/sparsemax.h),
// compiled once per instruction set like row_kernels_isa.cpp (FL_CPU_ISA_NS = base | avx2) and picked at run
// time by the glue in sparsemax.cpp.
//
// Forward per row: one streaming pass finds the maximum and the candidates of the support (usually a tiny
// fraction of the row) in a per-thread list; the Newton passes of solve_threshold then run over that list
// only, shrinking it as the threshold rises. The loss backward and the activation's output are one pass
// each, recomputing p from the logits and the saved (m, t).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#include "fastloss/sparsemax.h"
#include "simd.h"
#include "sparsemax_kernels.h"

#ifndef FL_CPU_ISA_NS
#error "FL_CPU_ISA_NS must name the instruction-set namespace"
#endif

namespace fastloss::cpu::FL_CPU_ISA_NS {
namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

constexpr int64_t kChunk = 512;  // elements converted at a time (a multiple of every SIMD width)

// Calls fn(z, k0, n) for consecutive chunks of a row as acc_t (the row itself when no conversion is needed).
template <typename scalar_t, typename F>
FL_INLINE void for_chunks(const scalar_t* x, int64_t C, F&& fn) {
  using acc_t = acc_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    fn(x, int64_t(0), C);
  } else {
    acc_t buf[kChunk];
    for (int64_t k0 = 0; k0 < C; k0 += kChunk) {
      const int64_t n = std::min(kChunk, C - k0);
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(x[k0 + i]);
      fn(static_cast<const acc_t*>(buf), k0, n);
    }
  }
}

// Writes out[k0 + i] = g(z_i vector) chunk by chunk: SIMD over acc_t, stored in scalar_t.
template <typename scalar_t, typename G, typename GS>
FL_INLINE void map_row(const scalar_t* x, scalar_t* out, int64_t C, G&& g, GS&& g_scalar) {
  using acc_t = acc_type<scalar_t>;
  using S = Simd<acc_t>;
  constexpr int W = S::W;
  for_chunks(x, C, [&](const acc_t* z, int64_t k0, int64_t n) {
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
      const int64_t m = std::min(kChunk, n - c0);
      acc_t tmp[kChunk];
      acc_t* dst = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(out + k0 + c0) : tmp;
      int64_t i = 0;
      for (; i + W <= m; i += W) S::store(dst + i, g(S::load(z + c0 + i)));
      for (; i < m; ++i) dst[i] = g_scalar(z[c0 + i]);
      if constexpr (!std::is_same_v<scalar_t, acc_t>)
        for (i = 0; i < m; ++i) out[k0 + c0 + i] = static_cast<scalar_t>(tmp[i]);
    }
  });
}

// True when any lane of a comparison result is set (bool for the width-1 scalar path).
FL_INLINE bool any_lane(bool b) { return b; }
FL_INLINE bool any_lane(vint m) {
  uint64_t w[4];
  std::memcpy(w, &m, sizeof(w));
  return (w[0] | w[1] | w[2] | w[3]) != 0;
}

// Exact threshold from a candidate list that holds the whole support: sort descending and take the prefix
// whose closed-form root lies between its last element and the next one. Only used when the Newton passes
// ran out (never seen on real data; the tests force it).
template <bool kEntmax, typename acc_t>
acc_t sorted_threshold(std::vector<acc_t>& cand, acc_t t_lower) {
  std::sort(cand.begin(), cand.end(), std::greater<acc_t>());
  SupportSums<acc_t> s = SupportSums<acc_t>::empty();
  const size_t n = cand.size();
  for (size_t j = 0; j < n; ++j) {
    s.push(cand[j], neg_inf<acc_t>(), acc_t(0));
    acc_t r;
    const acc_t next = j + 1 < n ? cand[j + 1] : neg_inf<acc_t>();
    if (Threshold<kEntmax>::closed_form(s, r) && r <= cand[j] && r >= next) return r;
  }
  return t_lower;
}

// Per-thread solver state: the candidate list of the current row.
template <bool kEntmax, typename acc_t>
struct RowSolver {
  std::vector<acc_t> cand;
  int max_iter_ = 100;

  // Returns m (max logit) and t; with `sums`, also the sums over the support at t (for the loss).
  //
  // One streaming pass finds the maximum and the candidates together: an element can be in the support only
  // if u > -1, i.e. z > m - 1 / (alpha - 1), and the running maximum never exceeds the final one, so keeping
  // every z above (running max - reach) keeps a superset. Whole blocks below that bar cost one compare per
  // element; the few blocks with a candidate (or a NaN) take the scalar path that also moves the maximum.
  template <typename scalar_t>
  void solve(const scalar_t* x, int64_t C, acc_t& m, acc_t& t, SupportSums<acc_t>* sums) {
    using S = Simd<acc_t>;
    using V = typename S::V;
    constexpr int W = S::W, B = 4 * W;
    const acc_t scale = acc_t(Threshold<kEntmax>::kScale), reach = acc_t(1) / scale;
    m = neg_inf<acc_t>();
    acc_t bar = neg_inf<acc_t>();
    bool nan = false;
    cand.clear();
    auto slow = [&](acc_t z) {
      if (z != z) nan = true;
      else if (z > bar) {
        cand.push_back(z);
        if (z > m) {
          m = z;
          // A little below m - reach, so rounding here never drops an element the exact test keeps.
          bar = m - reach - (std::fabs(m) + reach) * acc_t(1.0 / (1 << 20));
        }
      }
    };
    for_chunks(x, C, [&](const acc_t* z, int64_t, int64_t n) {
      int64_t i = 0;
      for (; i + B <= n; i += B) {
        const V bv = S::splat(bar);
        const V v0 = S::load(z + i), v1 = S::load(z + i + W), v2 = S::load(z + i + 2 * W),
                v3 = S::load(z + i + 3 * W);
        // NaN fails v > bar but not v != v.
        const auto hit = (v0 > bv) | (v1 > bv) | (v2 > bv) | (v3 > bv) | (v0 != v0) | (v1 != v1) | (v2 != v2) |
                         (v3 != v3);
        if (any_lane(hit))
          for (int j = 0; j < B; ++j) slow(z[i + j]);
      }
      for (; i < n; ++i) slow(z[i]);
    });
    if (nan) m = std::numeric_limits<acc_t>::quiet_NaN();
    if (m == neg_inf<acc_t>() || m != m || m == -neg_inf<acc_t>()) {
      // No finite maximum: all lanes masked (p = 0), or a NaN / +inf row (NaN, as softmax gives).
      t = m == neg_inf<acc_t>() ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
      if (sums) *sums = SupportSums<acc_t>::empty();
      return;
    }
    for (acc_t& c : cand) c = scale * (c - m);  // stale candidates get u <= -1 and leave at the first pass
    // One pass: drop the candidates at or below t (they never return), sum the rest about c.
    auto reduce_at = [&](acc_t tt, acc_t cc) {
      SupportSums<acc_t> s = SupportSums<acc_t>::empty();
      size_t w = 0;
      for (size_t j = 0; j < cand.size(); ++j) {
        if (cand[j] > tt) {
          cand[w++] = cand[j];
          s.push(cand[j], tt, cc);
        }
      }
      cand.resize(w);
      return s;
    };
    bool converged;
    t = solve_threshold<kEntmax, acc_t>(reduce_at, max_iter_, converged);
    if (!converged && t == t) t = sorted_threshold<kEntmax>(cand, t);
    if (sums) *sums = reduce_at(t, t);  // moments of v = u - t: what the loss needs
  }
};

// -------------------------------------------------------------------------------------------------- kernels

template <bool kEntmax, typename scalar_t>
void loss_fwd_rows(const SparsemaxArgs& a, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  RowSolver<kEntmax, acc_t> solver;
  solver.max_iter_ = a.max_iter;
  auto* loss = static_cast<acc_t*>(a.out);
  auto* stats = static_cast<acc_t*>(a.stats);
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* x = static_cast<const scalar_t*>(a.in) + row * a.row_stride;
    const int64_t y = a.target[row];
    if (y == a.ignore_index) {  // no gradient, no loss: skip the search
      loss[row] = acc_t(0);
      stats[2 * row] = neg_inf<acc_t>();
      stats[2 * row + 1] = acc_t(0);
      continue;
    }
    acc_t m, t;
    SupportSums<acc_t> s;
    solver.solve(x, a.C, m, t, &s);
    stats[2 * row] = m;
    stats[2 * row + 1] = t;
    const acc_t u_y = acc_t(Threshold<kEntmax>::kScale) * (static_cast<acc_t>(x[y]) - m);
    if (m == neg_inf<acc_t>()) loss[row] = std::numeric_limits<acc_t>::infinity();  // target is masked too
    else loss[row] = Threshold<kEntmax>::loss(s, t, u_y);
  }
}

template <bool kEntmax, typename scalar_t>
void loss_bwd_rows(const SparsemaxArgs& a, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  using S = Simd<acc_t>;
  using V = typename S::V;
  const auto* stats = static_cast<const acc_t*>(a.stats);
  const auto* gloss = static_cast<const acc_t*>(a.grad_in);
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* x = static_cast<const scalar_t*>(a.in) + row * a.row_stride;
    scalar_t* out = static_cast<scalar_t*>(a.out) + row * a.C;
    const int64_t y = a.target[row];
    if (y == a.ignore_index) {
      std::fill(out, out + a.C, scalar_t(0));
      continue;
    }
    const auto r = ThresholdRow<kEntmax, acc_t>::make(stats[2 * row], stats[2 * row + 1]);
    if (r.empty) {  // all lanes masked: the loss is the constant +inf, gradient 0
      std::fill(out, out + a.C, scalar_t(0));
      continue;
    }
    const acc_t g = gloss[row];
    // dL/dz = g (p - e_y)
    const V mv = S::splat(r.m), tv = S::splat(r.t), scv = S::splat(acc_t(Threshold<kEntmax>::kScale)),
            gv = S::splat(g), zero = S::splat(acc_t(0));
    map_row(
        x, out, a.C,
        [&](V z) {
          const V v = scv * (z - mv) - tv;
          const V p = kEntmax ? v * v : v;
          return gv * (v > zero ? p : (v == v ? zero : v));
        },
        [&](acc_t z) { return g * r.prob(z); });
    // The target term, in acc_t before rounding (p_y - 1 must not cancel in low precision).
    out[y] = static_cast<scalar_t>(g * (r.prob(static_cast<acc_t>(x[y])) - acc_t(1)));
  }
}

template <bool kEntmax, typename scalar_t>
void act_fwd_rows(const SparsemaxArgs& a, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  using S = Simd<acc_t>;
  using V = typename S::V;
  RowSolver<kEntmax, acc_t> solver;
  solver.max_iter_ = a.max_iter;
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* x = static_cast<const scalar_t*>(a.in) + row * a.row_stride;
    scalar_t* out = static_cast<scalar_t*>(a.out) + row * a.C;
    acc_t m, t;
    solver.solve(x, a.C, m, t, nullptr);
    const auto r = ThresholdRow<kEntmax, acc_t>::make(m, t);
    if (r.empty) {
      std::fill(out, out + a.C, scalar_t(0));
      continue;
    }
    const V mv = S::splat(m), tv = S::splat(t), scv = S::splat(acc_t(Threshold<kEntmax>::kScale)),
            zero = S::splat(acc_t(0));
    map_row(
        x, out, a.C,
        [&](V z) {
          const V v = scv * (z - mv) - tv;
          const V p = kEntmax ? v * v : v;
          return v > zero ? p : (v == v ? zero : v);
        },
        [&](acc_t z) { return r.prob(z); });
  }
}

// dz = w g - (<w, g> / sum w) w with w = p^(2 - alpha), one reduction pass and one map pass per row.
template <bool kEntmax, typename scalar_t>
void act_bwd_rows(const SparsemaxArgs& a, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* p = static_cast<const scalar_t*>(a.in) + row * a.C;
    const scalar_t* g = static_cast<const scalar_t*>(a.grad_in) + row * a.C;
    scalar_t* out = static_cast<scalar_t*>(a.out) + row * a.C;
    acc_t swg = 0, sw = 0;
    for (int64_t k = 0; k < a.C; ++k) {
      const acc_t w = Threshold<kEntmax>::weight(static_cast<acc_t>(p[k]));
      swg += w * static_cast<acc_t>(g[k]);
      sw += w;
    }
    const acc_t q = sw > acc_t(0) ? swg / sw : acc_t(0);  // an all-masked row (p = 0) has gradient 0
    for (int64_t k = 0; k < a.C; ++k) {
      const acc_t w = Threshold<kEntmax>::weight(static_cast<acc_t>(p[k]));
      out[k] = static_cast<scalar_t>(w * (static_cast<acc_t>(g[k]) - q));
    }
  }
}

template <template <bool, typename> class K>
void by_kind_dtype(const SparsemaxArgs& a, int64_t begin, int64_t end) {
  auto go = [&](auto tag) {
    using scalar_t = decltype(tag);
    if (a.entmax15) K<true, scalar_t>::run(a, begin, end);
    else K<false, scalar_t>::run(a, begin, end);
  };
  switch (a.dtype) {
    case DType::f32: return go(float{});
    case DType::f64: return go(double{});
    case DType::f16: return go(c10::Half{});
    case DType::bf16: return go(c10::BFloat16{});
  }
}

template <bool E, typename S>
struct ActFwd { static void run(const SparsemaxArgs& a, int64_t b, int64_t e) { act_fwd_rows<E, S>(a, b, e); } };
template <bool E, typename S>
struct ActBwd { static void run(const SparsemaxArgs& a, int64_t b, int64_t e) { act_bwd_rows<E, S>(a, b, e); } };
template <bool E, typename S>
struct LossFwd { static void run(const SparsemaxArgs& a, int64_t b, int64_t e) { loss_fwd_rows<E, S>(a, b, e); } };
template <bool E, typename S>
struct LossBwd { static void run(const SparsemaxArgs& a, int64_t b, int64_t e) { loss_bwd_rows<E, S>(a, b, e); } };

}  // namespace

extern const SparsemaxKernels sparsemax_kernels{&by_kind_dtype<ActFwd>, &by_kind_dtype<ActBwd>,
                                                &by_kind_dtype<LossFwd>, &by_kind_dtype<LossBwd>};

}  // namespace fastloss::cpu::FL_CPU_ISA_NS
