// CPU glue of the contrastive engine (csrc/contrastive_engine.h): the epilogues live in
// contrastive_kernels.cpp, compiled per instruction set (baseline, AVX2 + FMA) and picked at run time; they run
// here under at::parallel_for over the rows of a tile (over column chunks for the column statistics).
#include <ATen/Parallel.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <vector>

#include "../contrastive_engine.h"
#include "contrastive_kernels.h"
#include "glue.h"

namespace fastloss::contrastive {
namespace {

int64_t row_grain(int64_t M) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(M, 1)); }

template <typename T>
const cpu::ContrastiveKernels<T>& kernels() {
  using namespace fastloss::cpu;  // FL_CPU_KERNELS names base:: / avx2::
  const ContrastiveKernelSet& set = FL_CPU_KERNELS(contrastive_kernels);
  if constexpr (std::is_same_v<T, float>)
    return set.f32;
  else
    return set.f64;
}

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

  // The twin of the sm_90 fused GEMMs (csrc/cuda/contrastive_sm90.cu), taken only with
  // FASTLOSS_CONTRASTIVE_FUSED=1: the same 128 x 128 tiles of the block's S, the same per-line partials (fold_line,
  // grad_line) and the same merges in tile order, so that the CPU tests check the fused path's maths and the
  // engine's fused orchestration without a GPU. Slower than the tile loop above (scalar lines, no AVX2 epilogue):
  // the CPU's own tiles stay in cache between its GEMM and its epilogue anyway.
  template <typename T>
  static bool fused(const Inputs&, const TileArgs<T>& a, Fused f) {
    return fused_gemm_wanted() && fused_kind_ok(a, f);
  }

  template <typename T>
  static void fused_block(const Inputs& in, TileArgs<T>& a, Fused f) {
    constexpr int TM = kFusedTileM, TN = kFusedTileN;
    const int64_t rows = a.rows, M = in.M, n_tiles = (M + TN - 1) / TN, m_tiles = (rows + TM - 1) / TM;
    // S of the block: into the tile that t_i G_ij overwrites (the gradient modes), else into a temporary
    at::Tensor s = f == Fused::kFold ? at::empty({rows, M}, in.scale.options())
                                     : at::from_blob(a.grad_out, {rows, M}, in.scale.options());
    TORCH_CHECK(f == Fused::kFold || a.grad_kind == kGradInPlace, "contrastive: the CPU twin writes G in place");
    in.gemm(s, in.q.narrow(0, a.row0, rows), in.k.t());
    T* S = s.data_ptr<T>();
    const T b = a.bias_value();
    if (f == Fused::kFold) {
      std::vector<T> row_part(size_t(n_tiles * rows * kLineStats));
      std::vector<T> col_part(a.symmetric ? size_t(m_tiles * M * kLineStats) : 0);
      at::parallel_for(0, m_tiles, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t mt = lo; mt < hi; ++mt)
          for (int64_t nt = 0; nt < n_tiles; ++nt) {
            const int64_t r0 = mt * TM, c0 = nt * TN;
            const int rh = int(std::min<int64_t>(TM, rows - r0)), ch = int(std::min<int64_t>(TN, M - c0));
            for (int r = 0; r < rh; ++r) {
              const int64_t i = a.row0 + r0 + r, p = a.positive_of(i), self = a.self_lane(i, p);
              const T ti = a.scale[i];
              store_line(fold_line<false>(S + (r0 + r) * M + c0, 1, ch, [ti](int) { return ti; }, b, p - c0,
                                          self >= 0 ? self - c0 : -1),
                         &row_part[size_t((nt * rows + r0 + r) * kLineStats)]);
            }
            if (a.symmetric)
              for (int c = 0; c < ch; ++c) {
                const int64_t j = c0 + c;
                store_line(fold_line<false>(S + r0 * M + j, M, rh, [&](int r) { return a.scale[a.row0 + r0 + r]; },
                                            b, j - (a.row0 + r0)),
                           &col_part[size_t((mt * M + j) * kLineStats)]);
              }
          }
      });
      for (int64_t r = 0; r < rows; ++r) {
        Acc<T> acc = Acc<T>::empty();
        for (int64_t nt = 0; nt < n_tiles; ++nt)
          acc.merge(acc_of_line(&row_part[size_t((nt * rows + r) * kLineStats)]), T(1), T(0), false);
        finish_fold_row(a, a.row0 + r, acc);
      }
      if (a.symmetric)
        for (int64_t j = 0; j < M; ++j) {
          T* st = a.col_stats + j * kStats;
          Acc<T> run = Acc<T>::from_record(st);
          for (int64_t mt = 0; mt < m_tiles; ++mt)
            run.merge(acc_of_line(&col_part[size_t((mt * M + j) * kLineStats)]), T(1), T(0), false);
          run.to_record(st, T(0));
        }
      return;
    }
    const bool fwd = f == Fused::kGradFwd;
    std::vector<T> part(size_t(n_tiles * rows * kGradPart));
    at::parallel_for(0, rows, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r)
        for (int64_t nt = 0; nt < n_tiles; ++nt) {
          const int64_t c0 = nt * TN, i = a.row0 + r;
          const int ch = int(std::min<int64_t>(TN, M - c0));
          T* x = S + r * M + c0;
          T* pt = &part[size_t((nt * rows + r) * kGradPart)];
          if (fwd)
            grad_line<false, true>(x, ch, c0, i, a.scale[i], a, pt);
          else
            grad_line<false, false>(x, ch, c0, i, a.scale[i], a, pt);
        }
    });
    for (int64_t r = 0; r < rows; ++r) {
      T dscale = T(0), dbias = T(0);
      Acc<T> acc = Acc<T>::empty();
      for (int64_t nt = 0; nt < n_tiles; ++nt) {
        const T* pt = &part[size_t((nt * rows + r) * kGradPart)];
        dscale += pt[0];
        dbias += pt[1];
        if (fwd) acc.merge(fwd_of_grad_part(pt), T(1), T(0), false);
      }
      if (fwd)
        finish_grad_row<true>(a, a.row0 + r, dscale, dbias, acc);
      else
        finish_grad_row<false>(a, a.row0 + r, dscale, dbias, acc);
    }
  }

  template <typename T>
  static void fwd_tile(const TileArgs<T>& a) {
    const auto& k = kernels<T>();
    at::parallel_for(0, a.rows, row_grain(a.M), [&](int64_t lo, int64_t hi) { k.fwd_rows(a, lo, hi); });
    if (a.symmetric) {
      constexpr int64_t W = cpu::kContrastiveColumnChunk;
      at::parallel_for(0, (a.M + W - 1) / W, 1, [&](int64_t lo, int64_t hi) { k.columns(a, lo, hi); });
    }
  }

  template <typename T>
  static void finish_columns(const TileArgs<T>& a) {
    for (int64_t j = 0; j < a.M; ++j) a.row_loss[j] = finalize_column(a.col_stats + j * kStats, T(a.N), a.p);
  }

  template <typename T>
  static void coefs(int kind, const T* stats, const T* grad, int64_t n, const Params<T>& p, T* out, int64_t ld) {
    for (int64_t i = 0; i < n; ++i) {
      T c[kCoefs];
      make_coef(kind, stats + i * kStats, grad ? grad[i] : T(1), p, c);
      for (int k = 0; k < kCoefs; ++k) out[k * ld + i] = c[k];
    }
  }

  // Each task folds its rows, derives their coefficients and writes their G while the rows are still in cache.
  template <typename T>
  static void fwd_grad_tile(const TileArgs<T>& a) {
    TORCH_CHECK(a.grad_kind == kGradInPlace, "contrastive_fwd_grad: the CPU writes the gradient tile in place");
    const auto& k = kernels<T>();
    at::parallel_for(0, a.rows, row_grain(a.M), [&](int64_t lo, int64_t hi) {
      k.fwd_rows(a, lo, hi);
      const int64_t i0 = a.row0 + lo;
      coefs<T>(a.kind, a.row_stats + i0 * kStats, nullptr, hi - lo, a.p, a.row_coef + i0, a.N);
      k.bwd_rows(a, lo, hi);
    });
  }

  static void finish_backward(const Inputs&, at::Tensor&) {}  // positives were checked up front

  template <typename T>
  static void bwd_tile(const TileArgs<T>& a) {
    TORCH_CHECK(a.grad_kind == kGradInPlace, "contrastive_bwd: the CPU writes the gradient tile in place");
    const auto& k = kernels<T>();
    at::parallel_for(0, a.rows, row_grain(a.M), [&](int64_t lo, int64_t hi) { k.bwd_rows(a, lo, hi); });
  }
};

Options options(int64_t kind, bool symmetric, bool exclude_self, bool decoupled, double beta, double eps,
                int64_t block_rows, bool query_grad = true, bool key_grad = true) {
  return Options{kind, symmetric, exclude_self, decoupled, beta, eps, block_rows, query_grad, key_grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_fwd(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& positive, const std::optional<at::Tensor>& labels_q,
    const std::optional<at::Tensor>& labels_k, int64_t kind, bool symmetric, bool exclude_self, bool decoupled,
    double beta, double label_smoothing, int64_t block_rows) {
  return forward<CpuBackend>(query, key, scale, bias, positive, labels_q, labels_k,
                             options(kind, symmetric, exclude_self, decoupled, beta, label_smoothing, block_rows));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_fwd_grad(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& positive, const std::optional<at::Tensor>& labels_q,
    const std::optional<at::Tensor>& labels_k, int64_t kind, bool exclude_self, bool decoupled, double beta,
    double label_smoothing, int64_t block_rows, bool query_grad, bool key_grad) {
  return forward_grad<CpuBackend>(
      query, key, scale, bias, positive, labels_q, labels_k,
      options(kind, false, exclude_self, decoupled, beta, label_smoothing, block_rows, query_grad, key_grad));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_bwd(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& scale, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& positive,
    const std::optional<at::Tensor>& labels_q, const std::optional<at::Tensor>& labels_k,
    const at::Tensor& row_stats, const at::Tensor& col_stats, int64_t kind, bool symmetric, bool exclude_self,
    bool decoupled, double beta, double label_smoothing, int64_t block_rows, bool query_grad, bool key_grad) {
  return backward<CpuBackend>(
      grad_row, grad_col, query, key, scale, bias, positive, labels_q, labels_k, row_stats, col_stats,
      options(kind, symmetric, exclude_self, decoupled, beta, label_smoothing, block_rows, query_grad, key_grad));
}

}  // namespace
}  // namespace fastloss::contrastive

TORCH_LIBRARY_IMPL(fastloss, CPU, m) {
  m.impl("contrastive_fwd", &fastloss::contrastive::contrastive_fwd);
  m.impl("contrastive_fwd_grad", &fastloss::contrastive::contrastive_fwd_grad);
  m.impl("contrastive_bwd", &fastloss::contrastive::contrastive_bwd);
}
