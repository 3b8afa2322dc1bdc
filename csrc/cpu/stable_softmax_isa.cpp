// CPU row kernels of the stable-softmax family, compiled once per instruction set (FL_CPU_ISA_NS = base |
// avx2; see CMakeLists.txt). One additive-state kernel templated on the normaliser kind (StableMax, Taylor,
// softplus) and one two-state log-sum-exp kernel templated on the multi-label kind (ZLPR, decoupled
// softmax). Rows are walked in L1-sized chunks converted to the accumulation type; the per-element maths is
// fastloss/stable_softmax.h evaluated on SIMD vectors (simd.h), lane sums combined in a fixed order.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "simd.h"
#include "stable_softmax_kernels.h"

#include "fastloss/stable_softmax.h"

#ifndef FL_CPU_ISA_NS
#error "FL_CPU_ISA_NS must name the instruction-set namespace"
#endif

namespace fastloss::cpu::FL_CPU_ISA_NS {
namespace {

constexpr int64_t kChunk = 512;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// buf[i] = scale * x[i] in the accumulation type.
template <typename scalar_t, typename acc_t>
FL_INLINE void load_scaled(const scalar_t* x, int64_t n, acc_t scale, acc_t* buf) {
  if (scale == acc_t(1)) {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(x[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = scale * static_cast<acc_t>(x[i]);
  }
}

template <typename scalar_t, typename acc_t>
FL_INLINE void store_chunk(const acc_t* d, int64_t n, scalar_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(d[i]);
}

// ------------------------------------------------------------------------------------------ additive

template <AddKind K, typename scalar_t>
void add_fwd_rows(const StableArgs& a, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  using S = Simd<acc_t>;
  using V = typename S::V;
  using Phi = AddPhi<K>;
  const auto o = AddOpts<acc_t>::make(a.order);
  const acc_t scale = acc_t(a.scale), margin = acc_t(a.margin);
  acc_t* loss = static_cast<acc_t*>(a.loss);
  acc_t* stats = static_cast<acc_t*>(a.stats);
  alignas(64) acc_t buf[kChunk];
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* x = static_cast<const scalar_t*>(a.logits) + row * a.row_stride;
    const int64_t y = a.target[row];
    if (y == a.ignore_index) {
      loss[row] = stats[2 * row] = stats[2 * row + 1] = acc_t(0);
      continue;
    }
    acc_t rest = 0, z_y = 0;
    for (int64_t k0 = 0; k0 < a.C; k0 += kChunk) {
      const int64_t n = std::min(kChunk, a.C - k0);
      load_scaled(x + k0, n, scale, buf);
      if (y >= k0 && y < k0 + n) {  // the target stays out of the rest mass
        z_y = buf[y - k0] - margin;
        buf[y - k0] = neg_inf<acc_t>();
      }
      V sv = S::splat(0);
      int64_t i = 0;
      for (; i + S::W <= n; i += S::W) sv += Phi::phi(S::load(buf + i), o);
      acc_t s = S::sum(sv);
      for (; i < n; ++i) s += Phi::phi(buf[i], o);
      rest += s;
    }
    const acc_t phi_y = Phi::phi(z_y, o);
    loss[row] = additive_loss(rest, phi_y, Phi::log_phi(z_y, o), a.C == 1);
    stats[2 * row] = rest;
    stats[2 * row + 1] = phi_y;
  }
}

template <AddKind K, typename scalar_t>
void add_bwd_rows(const StableArgs& a, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  using S = Simd<acc_t>;
  using Phi = AddPhi<K>;
  const auto o = AddOpts<acc_t>::make(a.order);
  const acc_t scale = acc_t(a.scale), margin = acc_t(a.margin);
  const acc_t* stats = static_cast<const acc_t*>(a.stats);
  const acc_t* gloss = static_cast<const acc_t*>(a.grad_loss);
  alignas(64) acc_t buf[kChunk], d[kChunk];
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* x = static_cast<const scalar_t*>(a.logits) + row * a.row_stride;
    scalar_t* out = static_cast<scalar_t*>(a.grad_logits) + row * a.C;
    const int64_t y = a.target[row];
    if (y == a.ignore_index) {
      std::fill(out, out + a.C, static_cast<scalar_t>(0));
      continue;
    }
    const acc_t z_y = scale * static_cast<acc_t>(x[y]) - margin;
    const auto g = additive_grad_row<K>(gloss[row], stats[2 * row], stats[2 * row + 1], z_y, o);
    const auto coef = S::splat(g.coef * scale);
    for (int64_t k0 = 0; k0 < a.C; k0 += kChunk) {
      const int64_t n = std::min(kChunk, a.C - k0);
      load_scaled(x + k0, n, scale, buf);
      acc_t* dst = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(out + k0) : d;
      int64_t i = 0;
      for (; i + S::W <= n; i += S::W) S::store(dst + i, coef * Phi::dphi(S::load(buf + i), o));
      for (; i < n; ++i) dst[i] = g.coef * scale * Phi::dphi(buf[i], o);
      if (!std::is_same_v<scalar_t, acc_t>) store_chunk(d, n, out + k0);
    }
    out[y] = static_cast<scalar_t>(g.target * scale);
  }
}

// ------------------------------------------------------------------------------------------ multi-label

// Folds a chunk into an online log-sum-exp state: the chunk's own (max, rest) exactly, then one merge.
template <typename acc_t>
void lse_chunk(const acc_t* z, int64_t n, LseState<acc_t>& st) {
  using S = Simd<acc_t>;
  using V = typename S::V;
  int64_t i = 0;
  V mv = S::splat(neg_inf<acc_t>());
  for (; i + S::W <= n; i += S::W) {
    const V v = S::load(z + i);
    mv = v > mv ? v : mv;
  }
  acc_t cm = S::max(mv);
  for (; i < n; ++i) cm = z[i] > cm ? z[i] : cm;
  if (cm == neg_inf<acc_t>()) {
    for (i = 0; i < n; ++i)
      if (z[i] != z[i]) st.r = z[i];  // NaN next to -inf only
    return;
  }
  const V cmv = S::splat(cm), zero = S::splat(0), one = S::splat(1);
  V rv = zero, tv = zero;
  for (i = 0; i + S::W <= n; i += S::W) {
    const V v = S::load(z + i);
    rv += v == cmv ? zero : fl_exp(v - cmv);
    tv += v == cmv ? one : zero;
  }
  acc_t r = S::sum(rv), ties = S::sum(tv);
  for (; i < n; ++i) {
    r += z[i] == cm ? acc_t(0) : fl_exp(z[i] - cm);
    ties += z[i] == cm ? acc_t(1) : acc_t(0);
  }
  st.merge({cm, r + (ties - acc_t(1))});
}

template <MlKind K, typename scalar_t>
void ml_fwd_rows(const StableArgs& a, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  const MlOpts<acc_t> o{acc_t(a.scale), acc_t(a.margin)};
  acc_t* loss = static_cast<acc_t*>(a.loss);
  acc_t* stats = static_cast<acc_t*>(a.stats);
  alignas(64) acc_t buf[kChunk];
  std::vector<acc_t> pos_s;  // DEXML: the positives' s_p, used once lse_N is known
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* x = static_cast<const scalar_t*>(a.logits) + row * a.row_stride;
    const uint8_t* m = a.mask + row * a.mask_stride;
    LseState<acc_t> neg = K == MlKind::zlpr ? LseState<acc_t>{0, 0} : LseState<acc_t>::empty();
    LseState<acc_t> pos{0, 0};
    pos_s.clear();
    for (int64_t k0 = 0; k0 < a.C; k0 += kChunk) {
      const int64_t n = std::min(kChunk, a.C - k0);
      uint8_t any = 0;
      for (int64_t i = 0; i < n; ++i) {
        const acc_t z = static_cast<acc_t>(x[k0 + i]);
        buf[i] = m[k0 + i] ? neg_inf<acc_t>() : o.s_neg(z);
        any |= m[k0 + i];
      }
      lse_chunk(buf, n, neg);
      if (any) {
        for (int64_t i = 0; i < n; ++i) {
          if (!m[k0 + i]) continue;
          const acc_t s = o.s_pos(static_cast<acc_t>(x[k0 + i]));
          if constexpr (K == MlKind::zlpr) pos.push(-s);
          else pos_s.push_back(s);
        }
      }
    }
    acc_t* st = stats + 4 * row;
    st[0] = neg.m;
    st[1] = neg.r;
    if constexpr (K == MlKind::zlpr) {
      loss[row] = neg.lse() + pos.lse();
      st[2] = pos.m;
      st[3] = pos.r;
    } else {
      const acc_t lse_n = neg.lse();
      acc_t sum_loss = 0, sum_sig = 0;
      for (const acc_t s : pos_s) {
        sum_loss += softplus(lse_n - s);
        sum_sig += sigmoid(lse_n - s);
      }
      const acc_t count = acc_t(pos_s.size());
      loss[row] = pos_s.empty() ? acc_t(0) : sum_loss / count;
      st[2] = sum_sig;
      st[3] = count;
    }
  }
}

template <MlKind K, typename scalar_t>
void ml_bwd_rows(const StableArgs& a, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  using S = Simd<acc_t>;
  const MlOpts<acc_t> o{acc_t(a.scale), acc_t(a.margin)};
  const acc_t* stats = static_cast<const acc_t*>(a.stats);
  const acc_t* gloss = static_cast<const acc_t*>(a.grad_loss);
  alignas(64) acc_t u[kChunk], d[kChunk];
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* x = static_cast<const scalar_t*>(a.logits) + row * a.row_stride;
    const uint8_t* m = a.mask + row * a.mask_stride;
    scalar_t* out = static_cast<scalar_t*>(a.grad_logits) + row * a.C;
    const auto g = MlGradRow<acc_t>::template make<K>(stats + 4 * row, gloss[row], acc_t(a.scale));
    const bool neg_zero = g.neg_coef == acc_t(0);  // also keeps exp(s_n) of a positive-free row out
    const auto coef = S::splat(g.neg_coef);
    for (int64_t k0 = 0; k0 < a.C; k0 += kChunk) {
      const int64_t n = std::min(kChunk, a.C - k0);
      acc_t* dst = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(out + k0) : d;
      uint8_t any = 0;
      if (neg_zero) {
        std::fill(dst, dst + n, acc_t(0));
        for (int64_t i = 0; i < n; ++i) any |= m[k0 + i];
      } else {
        for (int64_t i = 0; i < n; ++i) {
          u[i] = m[k0 + i] ? neg_inf<acc_t>() : o.s_neg(static_cast<acc_t>(x[k0 + i])) - g.m_neg;
          any |= m[k0 + i];
        }
        int64_t i = 0;
        for (; i + S::W <= n; i += S::W) S::store(dst + i, coef * fl_exp(S::load(u + i)));
        for (; i < n; ++i) dst[i] = g.neg_coef * fl_exp(u[i]);
      }
      if (any) {  // positives are few: fixed up one by one
        for (int64_t i = 0; i < n; ++i)
          if (m[k0 + i]) dst[i] = g.template pos<K>(o.s_pos(static_cast<acc_t>(x[k0 + i])));
      }
      if (!std::is_same_v<scalar_t, acc_t>) store_chunk(d, n, out + k0);
    }
  }
}

// ------------------------------------------------------------------------------------------ tables

template <template <typename> class Fn>
void by_dtype(const StableArgs& a, int64_t begin, int64_t end) {
  switch (a.dtype) {
    case DType::f32: return Fn<float>::run(a, begin, end);
    case DType::f64: return Fn<double>::run(a, begin, end);
    case DType::f16: return Fn<c10::Half>::run(a, begin, end);
    case DType::bf16: return Fn<c10::BFloat16>::run(a, begin, end);
  }
}

template <AddKind K>
struct AddK {
  template <typename scalar_t>
  struct fwd {
    static void run(const StableArgs& a, int64_t b, int64_t e) { add_fwd_rows<K, scalar_t>(a, b, e); }
  };
  template <typename scalar_t>
  struct bwd {
    static void run(const StableArgs& a, int64_t b, int64_t e) { add_bwd_rows<K, scalar_t>(a, b, e); }
  };
};
template <MlKind K>
struct MlK {
  template <typename scalar_t>
  struct fwd {
    static void run(const StableArgs& a, int64_t b, int64_t e) { ml_fwd_rows<K, scalar_t>(a, b, e); }
  };
  template <typename scalar_t>
  struct bwd {
    static void run(const StableArgs& a, int64_t b, int64_t e) { ml_bwd_rows<K, scalar_t>(a, b, e); }
  };
};

using SM = AddK<AddKind::stablemax>;
using TY = AddK<AddKind::taylor>;
using SP = AddK<AddKind::softplus>;
using ZL = MlK<MlKind::zlpr>;
using DX = MlK<MlKind::dexml>;

}  // namespace

extern const StableKernels stable_kernels{
    {&by_dtype<SM::fwd>, &by_dtype<TY::fwd>, &by_dtype<SP::fwd>},
    {&by_dtype<SM::bwd>, &by_dtype<TY::bwd>, &by_dtype<SP::bwd>},
    {&by_dtype<ZL::fwd>, &by_dtype<DX::fwd>},
    {&by_dtype<ZL::bwd>, &by_dtype<DX::bwd>},
};

}  // namespace fastloss::cpu::FL_CPU_ISA_NS
