// CPU glue of the contrastive engine (csrc/contrastive_engine.h): the epilogues live in
// contrastive_kernels.cpp, compiled per instruction set (baseline, AVX2 + FMA) and picked at run time; they run
// here under at::parallel_for over the rows of a tile (over column chunks for the column statistics).
#include <ATen/Parallel.h>
#include <torch/library.h>

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

  // No fused GEMMs: the CPU's tiles stay in cache between its GEMM and its epilogue.
  template <typename T>
  static bool fused(const Inputs&, const TileArgs<T>&, Fused) {
    return false;
  }
  template <typename T>
  static void fused_block(const Inputs&, TileArgs<T>&, Fused) {
    TORCH_CHECK(false, "contrastive: no fused GEMM on CPU");
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
