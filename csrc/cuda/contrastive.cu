// CUDA epilogues of the contrastive engine (csrc/contrastive_engine.h); the GEMMs are cuBLAS through at::mm.
// One block per tile row for the row statistics and the backward coefficients, one thread per column for the
// column statistics (coalesced down the tile). Reductions merge in a fixed order (no atomics): deterministic.
// Same maths as the CPU epilogues (fastloss/contrastive.h). A positive index outside [0, M) never indexes
// memory: its row gets NaN loss and NaN gradient, without a host sync.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../contrastive_engine.h"
#include "common.cuh"

namespace fastloss::contrastive {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct Quad {
  T v[4];
};

template <typename T>
__device__ __forceinline__ Quad<T> block_sum(Quad<T> q, Quad<T>* smem) {
  return cuda::block_merge(q, smem, [](Quad<T>& a, const Quad<T>& b) {
#pragma unroll
    for (int k = 0; k < 4; ++k) a.v[k] += b.v[k];
  });
}

template <typename T>
__device__ __forceinline__ T block_max(T m, T* smem) {
  return cuda::block_merge(m, smem, [](T& a, const T& b) { a = b > a ? b : a; });
}

template <typename T>
__global__ void __launch_bounds__(kThreads) row_fwd_kernel(TileArgs<T> a) {
  __shared__ Quad<T> sq[kThreads / cuda::kWarp];
  __shared__ T sm[kThreads / cuda::kWarp];
  const int64_t r = blockIdx.x, i = a.row0 + r, M = a.M;
  T* s = a.tile + r * M;
  const T t = a.scale[i], b = a.bias_value(), alpha = a.p.a(), beta = a.p.beta;
  T* st = a.row_stats + i * kStats;
  const int64_t p = a.kind == kSupCon ? 0 : a.positive[i];
  const bool bad = a.kind != kSupCon && (p < 0 || p >= M);
  if (bad) {  // uniform per block
    if (threadIdx.x == 0) {
      const T nan = std::numeric_limits<T>::quiet_NaN();
      for (int k = 0; k < kStats; ++k) st[k] = nan;
      a.row_loss[i] = nan;
    }
    return;
  }
  if (a.kind == kSigmoid) {
    Quad<T> q{};
    for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
      const T x = t * s[j] + b;
      q.v[0] += softplus(j == p ? -x : x);
      if (j == p) q.v[1] = x;
    }
    q = block_sum(q, sq);
    if (threadIdx.x == 0) {
      for (int k = 0; k < kStats; ++k) st[k] = T(0);
      st[kPos] = q.v[1];
      a.row_loss[i] = q.v[0];
    }
    return;
  }
  // 1) logits in place and their sum
  Quad<T> q{};
  for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
    const T x = t * s[j] + b;
    s[j] = x;
    q.v[0] += x;
  }
  q = block_sum(q, sq);  // ends with __syncthreads: every logit is written
  const T sum = q.v[0];
  const bool self = a.exclude_self && i < M && (a.kind == kSupCon || i != p);
  T sp = T(0), self_val = T(0);
  if (a.kind == kSoftmax) sp = s[p];
  if (self) self_val = s[i];
  __syncthreads();  // everyone has read s[p] and s[i] before they are masked
  if (threadIdx.x == 0) {
    if (a.kind == kSoftmax) s[p] = neg_inf<T>();
    if (self) s[i] = neg_inf<T>();
  }
  __syncthreads();
  // 2) maximum over the remaining lanes
  T m = neg_inf<T>();
  for (int64_t j = threadIdx.x; j < M; j += blockDim.x) m = s[j] > m ? s[j] : m;
  m = block_max(m, sm);
  const T ms = m == neg_inf<T>() ? T(0) : m;
  // 3) sums of exponentials (SupCon: also the positives' sum and count)
  Quad<T> e{};
  if (a.kind == kSupCon) {
    const int64_t li = a.labels_q[i];
    for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
      e.v[0] += fl_exp(s[j] - ms);
      if (a.labels_k[j] == li && !(self && j == i)) {
        e.v[2] += s[j];
        e.v[3] += T(1);
      }
    }
  } else {
    for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
      e.v[0] += fl_exp(alpha * s[j] - alpha * ms);
      if (a.p.hcl()) e.v[1] += fl_exp(beta * s[j] - beta * ms);
    }
  }
  e = block_sum(e, sq);
  if (threadIdx.x != 0) return;
  const bool empty = m == neg_inf<T>();
  if (a.kind == kSupCon) {
    st[kAm] = m;
    st[kAd] = empty ? T(0) : e.v[0];
    st[kBm] = neg_inf<T>();
    st[kBd] = T(0);
    st[kPos] = e.v[2];
    st[kSum] = T(0);
    st[kCount] = e.v[3];
    a.row_loss[i] = finalize_supcon(st);
    return;
  }
  st[kAm] = empty ? neg_inf<T>() : alpha * ms;
  st[kAd] = empty ? T(0) : e.v[0];
  st[kBm] = empty || !a.p.hcl() ? neg_inf<T>() : beta * ms;
  st[kBd] = empty ? T(0) : e.v[1];
  st[kPos] = sp;
  st[kSum] = sum - (self ? self_val : T(0));
  st[kCount] = T(M - 1 - (self ? 1 : 0));
  a.row_loss[i] = finalize_softmax(st, a.p);
}

// Symmetric softmax: folds the tile's rows (logits, diagonal already masked) into each column's record.
template <typename T>
__global__ void __launch_bounds__(kThreads) column_kernel(TileArgs<T> a) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= a.M) return;
  const int64_t M = a.M;
  const T alpha = a.p.a(), beta = a.p.beta;
  T bmax = neg_inf<T>();
  for (int64_t r = 0; r < a.rows; ++r) {
    const T x = a.tile[r * M + j];
    bmax = x > bmax ? x : bmax;
  }
  T* st = a.col_stats + j * kStats;
  T Am = st[kAm], Ad = st[kAd], Bm = st[kBm], Bd = st[kBd];
  const T nm = bmax == neg_inf<T>() ? Am : (alpha * bmax > Am ? alpha * bmax : Am);
  if (nm != Am) {
    Ad = Am == neg_inf<T>() ? T(0) : Ad * ::exp(Am - nm);
    if (a.p.hcl()) {
      const T nb = beta / alpha * nm;
      Bd = Bm == neg_inf<T>() ? T(0) : Bd * ::exp(Bm - nb);
      Bm = nb;
    }
    Am = nm;
  }
  const T am = Am == neg_inf<T>() ? T(0) : Am, bm = Bm == neg_inf<T>() ? T(0) : Bm;
  T sum = T(0);
  for (int64_t r = 0; r < a.rows; ++r) {
    const T x = a.tile[r * M + j];
    Ad += fl_exp(alpha * x - am);
    if (a.p.hcl()) Bd += fl_exp(beta * x - bm);
    sum += x == neg_inf<T>() ? T(0) : x;
  }
  st[kAm] = Am;
  st[kAd] = Ad;
  st[kBm] = Bm;
  st[kBd] = Bd;
  st[kSum] += sum;
}

template <typename T>
__global__ void finish_columns_kernel(TileArgs<T> a) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= a.M) return;
  a.row_loss[j] = finalize_column(a.col_stats + j * kStats, a.row_stats[j * kStats + kPos], T(a.N), a.p);
}

template <typename T>
__global__ void coef_kernel(int kind, const T* stats, const T* grad, int64_t n, Params<T> p, T* out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  T c[kCoefs];
  make_coef(kind, stats + i * kStats, grad[i], p, c);
#pragma unroll
  for (int k = 0; k < kCoefs; ++k) out[k * n + i] = c[k];
}

template <typename T>
__global__ void __launch_bounds__(kThreads) row_bwd_kernel(TileArgs<T> a) {
  __shared__ Quad<T> sq[kThreads / cuda::kWarp];
  const int64_t r = blockIdx.x, i = a.row0 + r, M = a.M;
  T* x = a.tile + r * M;
  const T t = a.scale[i], b = a.bias_value();
  T rc[kCoefs];
  load_coef(a.row_coef, a.N, i, rc);
  const int64_t p = a.kind == kSupCon ? -1 : a.positive[i];
  const int64_t li = a.kind == kSupCon ? a.labels_q[i] : 0;
  Quad<T> q{};
  for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
    const T raw = x[j], s = t * raw + b;
    const bool self = a.exclude_self && j == i && (a.kind == kSupCon || j != p);
    const bool pos = a.kind == kSupCon ? (a.labels_k[j] == li && !self) : j == p;
    T g = lane_grad(a.kind, s, pos, self, rc, a.p);
    if (a.symmetric) {
      T cc[kCoefs];
      load_coef(a.col_coef, M, j, cc);
      g += lane_grad(a.kind, s, j == i, false, cc, a.p);
    }
    q.v[0] += g * raw;
    q.v[1] += g;
    x[j] = t * g;
  }
  q = block_sum(q, sq);
  if (threadIdx.x == 0) {
    a.dscale[i] = q.v[0];
    a.dbias_rows[i] = q.v[1];
  }
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
unsigned blocks_for(int64_t n) { return unsigned((n + kThreads - 1) / kThreads); }

struct CudaBackend {
  static constexpr int64_t kTileElems = int64_t(1) << 25;
  static constexpr bool kMixedGemm = true;  // fp16/bf16 features: tensor-core GEMMs, fp32 accumulate and output

  static void check_positive(const Inputs&) {}  // no host sync: a bad index makes its row NaN

  template <typename T>
  static void fwd_tile(const TileArgs<T>& a) {
    row_fwd_kernel<T><<<unsigned(a.rows), kThreads, 0, stream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (a.symmetric) {
      column_kernel<T><<<blocks_for(a.M), kThreads, 0, stream()>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

  template <typename T>
  static void finish_columns(const TileArgs<T>& a) {
    finish_columns_kernel<T><<<blocks_for(a.M), kThreads, 0, stream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename T>
  static void coefs(int kind, const T* stats, const T* grad, int64_t n, const Params<T>& p, T* out,
                    const at::Tensor&) {
    if (n == 0) return;
    coef_kernel<T><<<blocks_for(n), kThreads, 0, stream()>>>(kind, stats, grad, n, p, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename T>
  static void bwd_tile(const TileArgs<T>& a) {
    row_bwd_kernel<T><<<unsigned(a.rows), kThreads, 0, stream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_fwd(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& positive, const std::optional<at::Tensor>& labels_q,
    const std::optional<at::Tensor>& labels_k, int64_t kind, bool symmetric, bool exclude_self, bool decoupled,
    double beta, double label_smoothing, int64_t block_rows) {
  c10::cuda::CUDAGuard guard(query.device());
  return forward<CudaBackend>(query, key, scale, bias, positive, labels_q, labels_k,
                              Options{kind, symmetric, exclude_self, decoupled, beta, label_smoothing, block_rows});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_bwd(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& scale, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& positive,
    const std::optional<at::Tensor>& labels_q, const std::optional<at::Tensor>& labels_k,
    const at::Tensor& row_stats, const at::Tensor& col_stats, int64_t kind, bool symmetric, bool exclude_self,
    bool decoupled, double beta, double label_smoothing, int64_t block_rows) {
  c10::cuda::CUDAGuard guard(query.device());
  return backward<CudaBackend>(grad_row, grad_col, query, key, scale, bias, positive, labels_q, labels_k, row_stats,
                               col_stats,
                               Options{kind, symmetric, exclude_self, decoupled, beta, label_smoothing, block_rows});
}

}  // namespace
}  // namespace fastloss::contrastive

TORCH_LIBRARY_IMPL(fastloss, CUDA, m) {
  m.impl("contrastive_fwd", &fastloss::contrastive::contrastive_fwd);
  m.impl("contrastive_bwd", &fastloss::contrastive::contrastive_bwd);
}
