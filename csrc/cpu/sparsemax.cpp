// CPU kernels of sparsemax / entmax-1.5 and their Fenchel-Young losses (maths in fastloss/sparsemax.h).
//
// Forward per row: one pass for the maximum, one pass that keeps the candidates u > -1 (every support
// element is one; usually a small fraction of the row) in a per-thread list, then the Newton passes of
// solve_threshold run over that list only, shrinking it as the threshold rises. Loss backward and the
// activation's output are one pass each, recomputing p from the logits and the saved (m, t).
// The 32-byte vectors of simd.h live only inside this file's inline functions: no ABI crosses a boundary.
#pragma GCC diagnostic ignored "-Wpsabi"
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <type_traits>
#include <vector>

#include "../row_checks.h"
#include "fastloss/sparsemax.h"
#include "simd.h"

namespace fastloss::cpu {
namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

constexpr int64_t kChunk = 512;  // elements converted at a time (a multiple of every SIMD width)

// Newton passes before the exact sort-based fallback (rows seen in tests need at most ~12). The
// FASTLOSS_SPARSEMAX_MAX_ITER variable lowers it so the tests can reach the fallback.
int max_iter() {
  const char* env = std::getenv("FASTLOSS_SPARSEMAX_MAX_ITER");
  return env ? std::max(1, std::atoi(env)) : 100;
}

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

template <typename acc_t>
acc_t row_max(const acc_t* z, int64_t n, acc_t m) {
  using S = Simd<acc_t>;
  using V = typename S::V;
  constexpr int W = S::W;
  int64_t i = 0;
  if constexpr (W > 1) {
    if (n >= W) {
      V mv = S::splat(m);
      for (; i + W <= n; i += W) {
        const V v = S::load(z + i);
        mv = ((v > mv) | (v != v)) ? v : mv;  // a NaN wins
      }
      for (int j = 0; j < W; ++j) m = nan_max(m, acc_t(mv[j]));
    }
  }
  for (; i < n; ++i) m = nan_max(m, z[i]);
  return m;
}

// Exact threshold from a candidate list that holds the whole support (all u > t0): sort descending and take
// the prefix whose closed-form root lies between its last element and the next one. Only used when the
// Newton passes ran out (never seen on real data).
template <bool kEntmax, typename acc_t>
acc_t sorted_threshold(std::vector<acc_t>& cand, acc_t t0) {
  std::sort(cand.begin(), cand.end(), std::greater<acc_t>());
  SupportSums<acc_t> s = SupportSums<acc_t>::empty();
  const size_t n = cand.size();
  for (size_t j = 0; j < n; ++j) {
    s.push(cand[j] - t0);
    acc_t delta;
    Threshold<kEntmax>::step(s, delta);
    const acc_t next = j + 1 < n ? cand[j + 1] - t0 : neg_inf<acc_t>();
    if (delta <= s.vmin && delta >= next) return t0 + delta;
  }
  return t0;
}

// Per-thread solver state: the candidate list of the current row.
template <bool kEntmax, typename acc_t>
struct RowSolver {
  std::vector<acc_t> cand;
  int max_iter_ = 100;

  // Returns m (max logit) and t; with `sums`, also the sums over the support at t (for the loss).
  template <typename scalar_t>
  void solve(const scalar_t* x, int64_t C, acc_t& m, acc_t& t, SupportSums<acc_t>* sums) {
    using S = Simd<acc_t>;
    using V = typename S::V;
    constexpr int W = S::W;
    const acc_t scale = acc_t(Threshold<kEntmax>::kScale);
    m = neg_inf<acc_t>();
    for_chunks(x, C, [&](const acc_t* z, int64_t, int64_t n) { m = row_max(z, n, m); });
    if (m == neg_inf<acc_t>() || m != m || m == -neg_inf<acc_t>()) {
      // No finite maximum: all lanes masked (p = 0), or a NaN / +inf row (NaN, as softmax gives).
      t = m == neg_inf<acc_t>() ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN();
      if (sums) *sums = SupportSums<acc_t>::empty();
      return;
    }
    cand.clear();
    for_chunks(x, C, [&](const acc_t* z, int64_t, int64_t n) {
      int64_t i = 0;
      const V mv = S::splat(m), sv = S::splat(scale), lo = S::splat(acc_t(-1));
      for (; i + W <= n; i += W) {
        const V u = sv * (S::load(z + i) - mv);
        const auto keep = u > lo;
        bool any = false;
        if constexpr (W == 1) any = keep;
        else
          for (int j = 0; j < W; ++j) any |= keep[j] != 0;
        if (any)
          for (int j = 0; j < W; ++j) {
            const acc_t uj = scale * (z[i + j] - m);
            if (uj > acc_t(-1)) cand.push_back(uj);
          }
      }
      for (; i < n; ++i) {
        const acc_t u = scale * (z[i] - m);
        if (u > acc_t(-1)) cand.push_back(u);
      }
    });
    // One pass: drop the candidates at or below t (they never return), sum the rest.
    auto reduce_at = [&](acc_t tt) {
      SupportSums<acc_t> s = SupportSums<acc_t>::empty();
      size_t w = 0;
      for (size_t j = 0; j < cand.size(); ++j) {
        const acc_t v = cand[j] - tt;
        if (v > acc_t(0)) {
          cand[w++] = cand[j];
          s.push(v);
        }
      }
      cand.resize(w);
      return s;
    };
    bool converged;
    t = solve_threshold<kEntmax, acc_t>(reduce_at, max_iter_, converged);
    if (!converged && t == t) t = sorted_threshold<kEntmax>(cand, t);
    if (sums) *sums = reduce_at(t);
  }
};

// -------------------------------------------------------------------------------------------------- kernels

struct LossArgs {
  const void* logits;
  int64_t row_stride, C;
  const int64_t* target;
  int64_t ignore_index;
  void* loss;         // (N,) acc
  void* stats;        // (N, 2) acc: [m, t]
  const void* gloss;  // (N,) acc, backward
  void* grad;         // (N, C) logits dtype, backward
};

template <bool kEntmax, typename scalar_t>
void loss_fwd_rows(const LossArgs& a, int64_t begin, int64_t end, int iters_cap) {
  using acc_t = acc_type<scalar_t>;
  RowSolver<kEntmax, acc_t> solver;
  solver.max_iter_ = iters_cap;
  auto* loss = static_cast<acc_t*>(a.loss);
  auto* stats = static_cast<acc_t*>(a.stats);
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* x = static_cast<const scalar_t*>(a.logits) + row * a.row_stride;
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
void loss_bwd_rows(const LossArgs& a, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  using S = Simd<acc_t>;
  using V = typename S::V;
  const auto* stats = static_cast<const acc_t*>(a.stats);
  const auto* gloss = static_cast<const acc_t*>(a.gloss);
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* x = static_cast<const scalar_t*>(a.logits) + row * a.row_stride;
    scalar_t* out = static_cast<scalar_t*>(a.grad) + row * a.C;
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

struct ActArgs {
  const void* in;  // forward: logits; backward: probs
  int64_t row_stride, C;
  const void* grad_out;  // backward: dL/dp (N, C), row stride C
  void* out;             // (N, C) contiguous
};

template <bool kEntmax, typename scalar_t>
void act_fwd_rows(const ActArgs& a, int64_t begin, int64_t end, int iters_cap) {
  using acc_t = acc_type<scalar_t>;
  using S = Simd<acc_t>;
  using V = typename S::V;
  RowSolver<kEntmax, acc_t> solver;
  solver.max_iter_ = iters_cap;
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
void act_bwd_rows(const ActArgs& a, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* p = static_cast<const scalar_t*>(a.in) + row * a.C;
    const scalar_t* g = static_cast<const scalar_t*>(a.grad_out) + row * a.C;
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

// ------------------------------------------------------------------------------------------------------ glue

template <typename F>
void dispatch(at::ScalarType st, bool entmax, F&& f) {
  auto go = [&](auto tag) {
    using scalar_t = decltype(tag);
    if (entmax) f(std::true_type{}, scalar_t{});
    else f(std::false_type{}, scalar_t{});
  };
  switch (st) {
    case at::kFloat: return go(float{});
    case at::kDouble: return go(double{});
    case at::kHalf: return go(c10::Half{});
    case at::kBFloat16: return go(c10::BFloat16{});
    default: TORCH_CHECK(false, "fastloss: unsupported dtype ", st);
  }
}

template <typename F>
void run_rows(int64_t N, int64_t C, F&& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) { f(begin, end); });
}

void check_targets(const at::Tensor& target, int64_t C, int64_t ignore_index) {
  const int64_t* t = target.data_ptr<int64_t>();
  for (int64_t i = 0, n = target.numel(); i < n; ++i) {
    const int64_t y = t[i];
    TORCH_CHECK_INDEX(y == ignore_index || (y >= 0 && y < C), "target ", y, " at position ", i,
                      " is out of bounds for ", C, " classes (and is not ignore_index=", ignore_index, ")");
  }
}

int64_t row_stride_of(const at::Tensor& x) { return x.size(0) > 1 ? x.stride(0) : x.size(1); }

void check_act_input(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be 2-D (N, C), got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) >= 1, op, ": ", name, " need at least one class");
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) == 1, op, ": ", name, " need a contiguous class dimension");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", st);
}

std::tuple<at::Tensor, at::Tensor> sparsemax_loss_fwd(const at::Tensor& logits, const at::Tensor& target,
                                                      int64_t ignore_index, bool entmax15) {
  constexpr const char* op = "fastloss.sparsemax_loss_fwd";
  check_row_inputs(logits, target, op);
  const int64_t N = logits.size(0), C = logits.size(1);
  auto t = target.contiguous();
  check_targets(t, C, ignore_index);
  auto opts = logits.options().dtype(acc_type_of(logits));
  at::Tensor loss = at::empty({N}, opts), stats = at::empty({N, 2}, opts);
  LossArgs a{logits.data_ptr(), row_stride_of(logits), C, t.data_ptr<int64_t>(), ignore_index,
             loss.data_ptr(), stats.data_ptr(), nullptr, nullptr};
  const int cap = max_iter();
  dispatch(logits.scalar_type(), entmax15, [&](auto kind, auto tag) {
    run_rows(N, C, [&](int64_t b, int64_t e) { loss_fwd_rows<decltype(kind)::value, decltype(tag)>(a, b, e, cap); });
  });
  return {loss, stats};
}

at::Tensor sparsemax_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                              const at::Tensor& stats, int64_t ignore_index, bool entmax15) {
  constexpr const char* op = "fastloss.sparsemax_loss_bwd";
  auto in = prepare_row_backward(grad_loss, 1, logits, target, stats, 2, op);
  check_targets(in.target, logits.size(1), ignore_index);
  const int64_t N = logits.size(0), C = logits.size(1);
  LossArgs a{logits.data_ptr(), row_stride_of(logits), C, in.target.data_ptr<int64_t>(), ignore_index,
             nullptr, in.stats.data_ptr(), in.grad_rows.data_ptr(), in.grad_logits.data_ptr()};
  dispatch(logits.scalar_type(), entmax15, [&](auto kind, auto tag) {
    run_rows(N, C, [&](int64_t b, int64_t e) { loss_bwd_rows<decltype(kind)::value, decltype(tag)>(a, b, e); });
  });
  return in.grad_logits;
}

at::Tensor sparsemax_fwd(const at::Tensor& logits, bool entmax15) {
  constexpr const char* op = "fastloss.sparsemax_fwd";
  check_act_input(logits, op, "logits");
  const int64_t N = logits.size(0), C = logits.size(1);
  at::Tensor out = at::empty({N, C}, logits.options());
  ActArgs a{logits.data_ptr(), row_stride_of(logits), C, nullptr, out.data_ptr()};
  const int cap = max_iter();
  dispatch(logits.scalar_type(), entmax15, [&](auto kind, auto tag) {
    run_rows(N, C, [&](int64_t b, int64_t e) { act_fwd_rows<decltype(kind)::value, decltype(tag)>(a, b, e, cap); });
  });
  return out;
}

at::Tensor sparsemax_bwd(const at::Tensor& grad, const at::Tensor& probs, bool entmax15) {
  constexpr const char* op = "fastloss.sparsemax_bwd";
  check_act_input(probs, op, "probs");
  TORCH_CHECK(grad.sizes() == probs.sizes(), op, ": grad has shape ", grad.sizes(), ", probs ", probs.sizes());
  TORCH_CHECK(grad.device() == probs.device(), op, ": grad and probs are on different devices");
  const auto p = probs.contiguous();
  const auto g = grad.to(probs.scalar_type()).contiguous();
  const int64_t N = p.size(0), C = p.size(1);
  at::Tensor out = at::empty({N, C}, p.options());
  ActArgs a{p.data_ptr(), C, C, g.data_ptr(), out.data_ptr()};
  dispatch(p.scalar_type(), entmax15, [&](auto kind, auto tag) {
    run_rows(N, C, [&](int64_t b, int64_t e) { act_bwd_rows<decltype(kind)::value, decltype(tag)>(a, b, e); });
  });
  return out;
}

}  // namespace
}  // namespace fastloss::cpu

TORCH_LIBRARY_IMPL(fastloss, CPU, m) {
  m.impl("sparsemax_fwd", &fastloss::cpu::sparsemax_fwd);
  m.impl("sparsemax_bwd", &fastloss::cpu::sparsemax_bwd);
  m.impl("sparsemax_loss_fwd", &fastloss::cpu::sparsemax_loss_fwd);
  m.impl("sparsemax_loss_bwd", &fastloss::cpu::sparsemax_loss_bwd);
}
