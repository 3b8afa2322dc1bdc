// CUDA epilogues of the contrastive engine (csrc/contrastive_engine.h); the GEMMs are cuBLAS through at::mm.
// Forward: one block per tile row reads the row once (16-byte loads) and keeps a one-pass accumulator per
// thread (fastloss/contrastive.h: online max with rescale, the same maths as the CPU lanes), merged across the
// block in a fixed order; symmetric losses add one column pass, 32 columns x 8 row slices per block (coalesced
// down the tile), whose partial column states merge in slice order into the running column records. So the
// tile is read once per direction and never written. Backward: one block per tile row reads the fp32 tile once
// and writes t_i G_ij once, in the GEMM operand dtype (fp16 / bf16 buffer, or in place for fp32 / fp64).
// Instruction budget: a fp32 tile streams at ~1e12 logits/s, so the common pack (no special lane, finite logits)
// folds as one group (lse_group), kinds and options are template parameters, and tiles of fp16 / bf16 features
// take the hardware exp. forward_grad (row-wise losses): the same kernels, SigLIP fused into one read.
// On sm_90 with FASTLOSS_CONTRASTIVE_FUSED=1 (opt-in until verified on a GPU) the blocks' GEMMs are CUTLASS GEMMs
// whose epilogues consume the tile on chip (contrastive_sm90.cu); the kernels here then only merge their partials.
// Reductions merge in a fixed order (no atomics): deterministic. A positive index outside [0, M) never indexes
// memory and poisons only its own row: NaN loss, NaN dq row and dscale, a zero row of G (dk and the other rows
// stay finite), without a host sync; the scalar d bias (and the d scale of a scalar logit_scale) sums that row,
// so it is NaN too.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <type_traits>

#include "../contrastive_engine.h"
#include "common.cuh"
#if FL_HAVE_SM90_FUSED
#include "contrastive_sm90.h"
#endif

namespace fastloss::contrastive {
namespace {

constexpr int kMaxThreads = cuda::kMaxRowThreads;  // row kernels: 64..512 threads (cuda::row_block_threads)
constexpr int kColX = 32, kColY = 8;               // column kernel: 32 columns x 8 row slices per block
constexpr int kColUnroll = 8;                      // rows in flight per thread in the column kernel

template <typename T>
struct Pair {
  T v[2];
};

// V outputs of one 16-byte input pack, stored with one aligned vector store.
template <typename O, int V>
struct alignas(sizeof(O) * V) OutPack {
  O v[V];
  FL_CHECKED_COPY(OutPack)
};

// One block per tile row. A 16-byte pack without the row's positive or excluded self and with finite logits
// (nearly every pack) folds as one group (lse_group: one exp per lane and one rescale, no per-lane selects or
// index compares); any other pack, and SupCon rows (labels per lane), go lane by lane.
template <typename T, int K, bool kHcl, bool kFast>
__global__ void __launch_bounds__(kMaxThreads) row_fwd_kernel(TileArgs<T> a) {
  __shared__ Acc<T> smem[kMaxThreads / cuda::kWarp];
  const int64_t r = blockIdx.x, i = a.row0 + r, M = a.M;
  const T* x = a.tile + r * M;
  T* st = a.row_stats + i * kStats;
  const int64_t p = a.positive_of(i);
  if (a.bad_positive(p)) {  // uniform per block, before any barrier
    if (threadIdx.x == 0) {
      const T nan = std::numeric_limits<T>::quiet_NaN();
      for (int k = 0; k < kStats; ++k) st[k] = nan;
      a.row_loss[i] = nan;
    }
    return;
  }
  const T t = a.scale[i], b = a.bias_value(), alpha = a.p.a(), beta = a.p.beta;
  const int64_t self = a.self_lane(i, p);
  const int64_t li = K == kSupCon ? a.labels_q[i] : 0;
  Acc<T> acc = Acc<T>::empty();
  auto lane = [&](int64_t j, T raw) {
    if (j == self) return;
    const T s = t * raw + b;
    if constexpr (K == kSupCon) {
      acc.push(s, T(1), T(0), false);
      if (a.labels_k[j] == li) {
        acc.pos += s;
        acc.cnt += T(1);
      }
    } else if constexpr (K == kSigmoid) {
      acc.push_sigmoid(s, j == p);
    } else {
      acc.sum += s;
      if (j == p)
        acc.pos = s;
      else
        acc.push(s, alpha, beta, kHcl);
    }
  };
  constexpr int V = cuda::Pack<T>::N;
  cuda::for_each_in_row<T>(x, M, lane, [&](int64_t k0, const cuda::Pack<T>& pk) {
    if constexpr (K != kSupCon) {
      if (uint64_t(p - k0) >= uint64_t(V) && uint64_t(self - k0) >= uint64_t(V)) {  // self = -1: never inside
        T s[V];
#pragma unroll
        for (int v = 0; v < V; ++v) s[v] = t * pk.v[v] + b;
        T oA, oB;
        const T gm = lse_group<kHcl, kFast>(s, alpha, beta, oA, oB);
        if (gm > neg_inf<T>() && gm < pos_inf<T>()) {  // NaN or infinite lanes: lane by lane below
#pragma unroll
          for (int v = 0; v < V; ++v) {
            if constexpr (K == kSigmoid)
              acc.loss += negative_softplus<kFast>(s[v]);
            else
              acc.sum += s[v];
          }
          lse_fold<kHcl>(acc.m, acc.dA, acc.dB, gm, oA, oB, alpha, beta);
          return;
        }
      }
    }
#pragma unroll
    for (int v = 0; v < V; ++v) lane(k0 + v, pk.v[v]);
  });
  acc = cuda::block_merge(acc, smem, [=](Acc<T>& u, const Acc<T>& w) { u.merge(w, alpha, beta, kHcl); });
  if (threadIdx.x == 0) a.row_loss[i] = finish_row(K, acc, T(M - 1 - (self >= 0 ? 1 : 0)), st, a.p);
}

// Symmetric softmax: folds the tile's rows into each column's running record (positive = the diagonal). A
// thread's kColUnroll rows of one column fold as one group (lse_group) when they are whole, finite and miss the
// diagonal; otherwise row by row.
template <typename T, bool kHcl, bool kFast>
__global__ void __launch_bounds__(kColX * kColY) column_kernel(TileArgs<T> a) {
  __shared__ Acc<T> part[kColY][kColX];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t j = int64_t(blockIdx.x) * kColX + tx, M = a.M, R = a.rows;
  const T alpha = a.p.a(), beta = a.p.beta, b = a.bias_value();
  const int64_t diag = j - a.row0;  // the tile row holding this column's positive (maybe outside the tile)
  Acc<T> acc = Acc<T>::empty();
  if (j < M) {
    for (int64_t r0 = ty; r0 < R; r0 += int64_t(kColUnroll) * kColY) {
      T s[kColUnroll];
#pragma unroll
      for (int u = 0; u < kColUnroll; ++u) {  // loads first: several rows in flight per thread
        const int64_t r = r0 + int64_t(u) * kColY;
        s[u] = r < R ? a.tile[r * M + j] : T(0);
      }
#pragma unroll
      for (int u = 0; u < kColUnroll; ++u) {
        const int64_t r = r0 + int64_t(u) * kColY;
        if (r < R) s[u] = a.scale[a.row0 + r] * s[u] + b;
      }
      const bool whole = r0 + int64_t(kColUnroll - 1) * kColY < R;
      const bool has_diag = diag >= r0 && (diag - r0) % kColY == 0 && (diag - r0) / kColY < kColUnroll;
      if (whole && !has_diag) {
        T oA, oB;
        const T gm = lse_group<kHcl, kFast>(s, alpha, beta, oA, oB);
        if (gm > neg_inf<T>() && gm < pos_inf<T>()) {  // NaN or infinite lanes: row by row below
#pragma unroll
          for (int u = 0; u < kColUnroll; ++u) acc.sum += s[u];
          lse_fold<kHcl>(acc.m, acc.dA, acc.dB, gm, oA, oB, alpha, beta);
          continue;
        }
      }
#pragma unroll
      for (int u = 0; u < kColUnroll; ++u) {
        const int64_t r = r0 + int64_t(u) * kColY;
        if (r >= R) break;
        acc.sum += s[u];
        if (r == diag)
          acc.pos = s[u];
        else
          acc.push(s[u], alpha, beta, kHcl);
      }
    }
  }
  part[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && j < M) {
    T* st = a.col_stats + j * kStats;
    Acc<T> run = Acc<T>::from_record(st);
    for (int y = 0; y < kColY; ++y) run.merge(part[y][tx], alpha, beta, kHcl);
    run.to_record(st, T(0));  // kCount is set by finalize_column
  }
}

template <typename T>
__global__ void finish_columns_kernel(TileArgs<T> a) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= a.M) return;
  a.row_loss[j] = finalize_column(a.col_stats + j * kStats, T(a.N), a.p);
}

// grad nullptr: a unit upstream gradient (forward_grad).
template <typename T>
__global__ void coef_kernel(int kind, const T* stats, const T* grad, int64_t n, Params<T> p, T* out, int64_t ld) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  T c[kCoefs];
  make_coef(kind, stats + i * kStats, grad ? grad[i] : T(1), p, c);
#pragma unroll
  for (int k = 0; k < kCoefs; ++k) out[k * ld + i] = c[k];
}

// The block state of the backward row kernel: (dscale, dbias) partial sums, and with kFwd the row's forward
// accumulator too.
template <typename T, bool kFwd>
struct BwdState {
  Pair<T> q;
  FL_HD FL_INLINE void merge(const BwdState& o, T, T, bool) {
    q.v[0] += o.q.v[0];
    q.v[1] += o.q.v[1];
  }
};
template <typename T>
struct BwdState<T, true> {
  Pair<T> q;
  Acc<T> acc;
  FL_HD FL_INLINE void merge(const BwdState& o, T alpha, T beta, bool hcl) {
    q.v[0] += o.q.v[0];
    q.v[1] += o.q.v[1];
    acc.merge(o.acc, alpha, beta, hcl);
  }
};

// Reads row r of the fp32 / fp64 tile once and writes t_i G_ij once, as O (T in place, or fp16 / bf16, whose
// features' rounding lets the exps take the hardware ex2). A pack without the row's special lanes skips the
// per-lane index compares. kFwd (SigLIP in forward_grad only): a sigmoid lane's gradient needs no row statistic,
// so the same read also folds the row's forward record and loss, and the coefficients are those of a unit upstream
// gradient.
template <typename T, typename O, bool kFwd = false>
__global__ void __launch_bounds__(kMaxThreads) row_bwd_kernel(TileArgs<T> a) {
  using State = BwdState<T, kFwd>;
  constexpr bool kFast = !std::is_same_v<O, T>;  // G written in fp16 / bf16: the tile came from such features
  __shared__ State sq[kMaxThreads / cuda::kWarp];
  const int64_t r = blockIdx.x, i = a.row0 + r, M = a.M;
  const T* x = a.tile + r * M;
  O* out = static_cast<O*>(a.grad_out) + r * M;
  const int64_t p = a.positive_of(i);
  if (a.bad_positive(p)) {  // uniform per block: no G from this row, NaN where its loss enters directly
    for (int64_t j = threadIdx.x; j < M; j += blockDim.x) out[j] = O(T(0));
    if (threadIdx.x == 0) {
      const T nan = std::numeric_limits<T>::quiet_NaN();
      a.dscale[i] = nan;
      a.dbias_rows[i] = nan;
      if constexpr (kFwd) {
        for (int k = 0; k < kStats; ++k) a.row_stats[i * kStats + k] = nan;
        a.row_loss[i] = nan;
      }
    }
    return;
  }
  const T t = a.scale[i], b = a.bias_value();
  const int64_t self = a.self_lane(i, p);
  const int64_t li = a.kind == kSupCon ? a.labels_q[i] : 0;
  T rc[kCoefs];
  if constexpr (kFwd)
    make_coef(kSigmoid, static_cast<const T*>(nullptr), T(1), a.p, rc);  // reads no record
  else
    load_coef(a.row_coef, a.N, i, rc);
  State st{};
  if constexpr (kFwd) st.acc = Acc<T>::empty();
  // t_i G_ij; accumulates dscale and dbias (and the forward record). kPlain: the caller knows that lane j is
  // neither the row's positive nor its self nor (symmetric) its column's positive, so no index compares.
  // Lane modes: kLanewise compares j with the special lanes; kPlain: the caller knows that lane j is neither the
  // row's positive nor its self nor (symmetric) its column's positive; kPlainGrouped: also its forward part
  // (kFwd) was folded with its pack's (lse_group).
  enum Mode : int { kLanewise, kPlain, kPlainGrouped };
  // t_i G_ij; accumulates dscale and dbias (and, with kFwd, the forward record).
  auto grad = [&](int64_t j, T raw, auto mode) -> T {
    constexpr int kMode = decltype(mode)::value;
    const T s = t * raw + b;
    const bool is_self = kMode == kLanewise && j == self;
    const bool is_pos = a.kind == kSupCon ? (a.labels_k[j] == li && !is_self) : (kMode == kLanewise && j == p);
    T g = lane_grad<kFast>(a.kind, s, is_pos, is_self, rc, a.p);
    if (a.symmetric) g += column_lane_grad<kFast>(s, kMode == kLanewise && j == i, a.col_coef, M, j, a.p);
    if constexpr (kFwd) {  // nested: `kFwd && kMode` would stay dependent and check st.acc when kFwd is false
      if constexpr (kMode != kPlainGrouped) {
        if (!is_self) st.acc.push_sigmoid(s, is_pos);
      }
    }
    st.q.v[0] += g * raw;
    st.q.v[1] += g;
    return t * g;
  };
  constexpr int V = cuda::Pack<T>::N;
  using OP = OutPack<O, V>;
  using Lanewise = std::integral_constant<int, kLanewise>;
  using Plain = std::integral_constant<int, kPlain>;
  using PlainGrouped = std::integral_constant<int, kPlainGrouped>;
  cuda::for_each_in_row<T>(
      x, M, [&](int64_t j, T raw) { out[j] = O(grad(j, raw, Lanewise{})); },
      [&](int64_t k0, const cuda::Pack<T>& pk) {
        OP o;
        const bool plain = uint64_t(p - k0) >= uint64_t(V) && uint64_t(self - k0) >= uint64_t(V) &&
                           uint64_t(i - k0) >= uint64_t(V);  // self / p = -1: never inside
        bool grouped = false;
        if constexpr (kFwd) {  // SigLIP: every lane of a plain pack is a negative
          if (plain) {
            T s[V];
#pragma unroll
            for (int v = 0; v < V; ++v) s[v] = t * pk.v[v] + b;
            T oA, oB;
            const T gm = lse_group<false, kFast>(s, T(1), T(0), oA, oB);
            grouped = gm > neg_inf<T>() && gm < pos_inf<T>();  // NaN or infinite lanes: lane by lane
            if (grouped) {
#pragma unroll
              for (int v = 0; v < V; ++v) st.acc.loss += negative_softplus<kFast>(s[v]);
              lse_fold<false>(st.acc.m, st.acc.dA, st.acc.dB, gm, oA, oB, T(1), T(0));
            }
          }
        }
        if (grouped) {
#pragma unroll
          for (int v = 0; v < V; ++v) o.v[v] = O(grad(k0 + v, pk.v[v], PlainGrouped{}));
        } else if (plain) {
#pragma unroll
          for (int v = 0; v < V; ++v) o.v[v] = O(grad(k0 + v, pk.v[v], Plain{}));
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v) o.v[v] = O(grad(k0 + v, pk.v[v], Lanewise{}));
        }
        if (reinterpret_cast<uintptr_t>(out + k0) % alignof(OP) == 0) {
          *reinterpret_cast<OP*>(out + k0) = o;  // in place: this thread already loaded the pack
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v) out[k0 + v] = o.v[v];
        }
      });
  st = cuda::block_merge(st, sq, [](State& u, const State& w) { u.merge(w, T(1), T(0), false); });
  if (threadIdx.x == 0) {
    a.dscale[i] = st.q.v[0];
    a.dbias_rows[i] = st.q.v[1];
    if constexpr (kFwd)
      a.row_loss[i] = finish_row(kSigmoid, st.acc, T(M - 1 - (self >= 0 ? 1 : 0)), a.row_stats + i * kStats, a.p);
  }
}

#if FL_HAVE_SM90_FUSED
// The fused GEMMs (contrastive_sm90.cu) leave partial records per (row or column, tile); these kernels merge a
// block's partials in tile order. One warp per row folds its row's partials over the key tiles (lane l takes
// tiles l, l + 32, ..., then a fixed butterfly) and finishes the row as row_fwd_kernel does.
constexpr int kMergeWarps = 8;

__global__ void __launch_bounds__(kMergeWarps * cuda::kWarp)
    merge_row_parts_kernel(TileArgs<float> a, const float* __restrict__ part, int64_t n_tiles) {
  const int lane = threadIdx.x % cuda::kWarp;
  const int64_t r = int64_t(blockIdx.x) * kMergeWarps + threadIdx.x / cuda::kWarp;
  if (r >= a.rows) return;  // whole warps leave together: the shuffles below stay full-warp
  Acc<float> acc = Acc<float>::empty();
  for (int64_t n = lane; n < n_tiles; n += cuda::kWarp)
    acc.merge(acc_of_line(part + (n * a.rows + r) * kLineStats), 1.0f, 0.0f, false);
#pragma unroll
  for (int off = cuda::kWarp / 2; off > 0; off /= 2) acc.merge(cuda::shfl_xor(acc, off), 1.0f, 0.0f, false);
  if (lane == 0) finish_fold_row(a, a.row0 + r, acc);
}

// Symmetric: each column's partials over the block's row tiles, in order, into its running record.
__global__ void merge_column_parts_kernel(TileArgs<float> a, const float* __restrict__ part, int64_t m_tiles) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= a.M) return;
  float* st = a.col_stats + j * kStats;
  Acc<float> run = Acc<float>::from_record(st);
  for (int64_t m = 0; m < m_tiles; ++m) run.merge(acc_of_line(part + (m * a.M + j) * kLineStats), 1.0f, 0.0f, false);
  run.to_record(st, 0.0f);  // kCount is set by finalize_column
}

// The backward's partial d scale / d bias sums (and, kFwd, SigLIP's forward records) over the key tiles, as
// merge_row_parts_kernel; a row with an out-of-range positive gets NaN there, as in row_bwd_kernel.
template <bool kFwd>
__global__ void __launch_bounds__(kMergeWarps * cuda::kWarp)
    merge_grad_parts_kernel(TileArgs<float> a, const float* __restrict__ part, int64_t n_tiles) {
  struct State {
    float dscale, dbias;
    Acc<float> fwd;
  };
  const int lane = threadIdx.x % cuda::kWarp;
  const int64_t r = int64_t(blockIdx.x) * kMergeWarps + threadIdx.x / cuda::kWarp;
  if (r >= a.rows) return;
  State st{0.0f, 0.0f, Acc<float>::empty()};
  auto merge = [](State& u, const State& w) {
    u.dscale += w.dscale;
    u.dbias += w.dbias;
    if constexpr (kFwd) u.fwd.merge(w.fwd, 1.0f, 0.0f, false);
  };
  for (int64_t n = lane; n < n_tiles; n += cuda::kWarp) {
    const float* pt = part + (n * a.rows + r) * kGradPart;
    State w{pt[0], pt[1], Acc<float>::empty()};
    if constexpr (kFwd) w.fwd = fwd_of_grad_part(pt);
    merge(st, w);
  }
#pragma unroll
  for (int off = cuda::kWarp / 2; off > 0; off /= 2) merge(st, cuda::shfl_xor(st, off));
  if (lane == 0) finish_grad_row<kFwd>(a, a.row0 + r, st.dscale, st.dbias, st.fwd);
}

// SM count of the current device if it is an sm_90 part (sm_90a code runs there only), else 0.
int sm90_multiprocessors() {
  int dev = 0, major = 0, minor = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return major == 9 && minor == 0 ? sms : 0;
}
#endif

// dq rows of out-of-range positives: NaN (their G rows were zeroed, so the GEMM left them finite).
template <typename T>
__global__ void nan_bad_rows_kernel(T* dq, const int64_t* positive, int64_t M, int64_t d) {
  const int64_t i = blockIdx.x, p = positive[i];
  if (p >= 0 && p < M) return;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) dq[i * d + c] = std::numeric_limits<T>::quiet_NaN();
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
unsigned blocks_for(int64_t n, int threads) { return cuda::grid_1d((n + threads - 1) / threads); }
constexpr int kThreads = 256;  // element-wise kernels

struct CudaBackend {
  // 2^27 elements: >= 2048 rows per block at M = 65536, so the dq GEMM (rows x M @ M x d) fills the SMs.
  // fp32 tile 512 MiB (+ 256 MiB fp16 / bf16 G in the backward); O(M) for a fixed row count, never N x M.
  static constexpr int64_t kTileElems = int64_t(1) << 27;
  static constexpr bool kMixedGemm = true;  // fp16/bf16 features: tensor-core GEMMs, fp32 accumulate and output

  static void check_positive(const Inputs&) {}  // no host sync: a bad index makes its row NaN

  // The sm_90 fused GEMMs (contrastive_sm90.cu; opt-in while unverified): fp16 / bf16 features on an sm_90
  // device, d % 8 == 0. kFold: the softmax without HCL (CLIP, InfoNCE, DCL, label smoothing, NT-Xent); kGrad:
  // softmax and sigmoid with every option; kGradFwd: sigmoid. Not SupCon (labels per lane); fused_kind_ok.
  template <typename T>
  static bool fused(const Inputs& in, const TileArgs<T>& a, Fused f) {
#if FL_HAVE_SM90_FUSED
    if constexpr (std::is_same_v<T, float>) {
      if (!fused_gemm_wanted() || !in.mixed || !fused_kind_ok(a, f) || sm90_multiprocessors() == 0) return false;
      return sm90::supported(operands(in, 0), in.rows, in.M);
    }
#endif
    (void)in;
    (void)a;
    (void)f;
    return false;
  }

  // One block (a.row0, a.rows) through the fused GEMM, then its partials merged in tile order.
  template <typename T>
  static void fused_block(const Inputs& in, TileArgs<T>& a, Fused f) {
#if FL_HAVE_SM90_FUSED
    if constexpr (std::is_same_v<T, float>) {
      const auto opts = in.scale.options();
      const int64_t n_tiles = (in.M + sm90::kTileN - 1) / sm90::kTileN;
      const int64_t m_tiles = (a.rows + sm90::kTileM - 1) / sm90::kTileM;
      const bool fold = f == Fused::kFold;
      at::Tensor row_part = at::empty({n_tiles, a.rows, fold ? kLineStats : kGradPart}, opts);
      at::Tensor col_part = at::empty({fold && a.symmetric ? m_tiles : 0, in.M, kLineStats}, opts);
      const sm90::Epi e = fold ? sm90::Epi::kFold : f == Fused::kGrad ? sm90::Epi::kGrad : sm90::Epi::kGradFwd;
      const sm90::Problem p{operands(in, a.row0), a, row_part.data_ptr<float>(),
                            col_part.numel() ? col_part.data_ptr<float>() : nullptr};
      const int sms = sm90_multiprocessors();
      at::Tensor ws = at::empty({int64_t(sm90::workspace_bytes(e, p, sms)) + 1}, opts.dtype(at::kByte));
      // CUTLASS's run() reports any pending error as its own launch failure (and clears it): an earlier
      // kernel's error is raised here as itself first
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      TORCH_CHECK(sm90::run(e, p, ws.data_ptr(), sms, stream()), "contrastive: the fused sm_90 GEMM failed to launch");
      const unsigned row_blocks = blocks_for(a.rows, kMergeWarps), threads = kMergeWarps * cuda::kWarp;
      if (fold) {
        merge_row_parts_kernel<<<row_blocks, threads, 0, stream()>>>(a, p.row_part, n_tiles);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (a.symmetric) {
          merge_column_parts_kernel<<<blocks_for(in.M, kThreads), kThreads, 0, stream()>>>(a, p.col_part, m_tiles);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      } else if (f == Fused::kGrad) {
        merge_grad_parts_kernel<false><<<row_blocks, threads, 0, stream()>>>(a, p.row_part, n_tiles);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        merge_grad_parts_kernel<true><<<row_blocks, threads, 0, stream()>>>(a, p.row_part, n_tiles);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      return;
    }
#endif
    (void)in;
    (void)a;
    (void)f;
    TORCH_CHECK(false, "contrastive: this build has no fused sm_90 GEMM");
  }

#if FL_HAVE_SM90_FUSED
  static sm90::Operands operands(const Inputs& in, int64_t row0) {
    const char* q = static_cast<const char*>(in.q.data_ptr()) + row0 * in.d * int64_t(in.q.element_size());
    return {q, in.k.data_ptr(), in.q.scalar_type() == at::kBFloat16, in.d};
  }
#endif

  template <typename T, int K, bool kHcl, bool kFast>
  static void launch_fwd(const TileArgs<T>& a) {
    const int threads = cuda::row_block_threads(a.M, int(sizeof(T)));
    row_fwd_kernel<T, K, kHcl, kFast><<<cuda::grid_1d(a.rows), threads, 0, stream()>>>(a);
  }

  // Kind and HCL as template parameters; the hardware exp for float tiles of fp16 / bf16 features.
  template <typename T, bool kFast>
  static void launch_fwd_kind(const TileArgs<T>& a) {
    if (a.kind == kSupCon)
      launch_fwd<T, kSupCon, false, false>(a);
    else if (a.kind == kSigmoid)
      launch_fwd<T, kSigmoid, false, kFast>(a);
    else if (a.p.hcl())
      launch_fwd<T, kSoftmax, true, kFast>(a);
    else
      launch_fwd<T, kSoftmax, false, kFast>(a);
  }

  template <typename T, bool kFast>
  static void launch_columns_as(const TileArgs<T>& a) {
    const dim3 grid(blocks_for(a.M, kColX)), block(kColX, kColY);
    if (a.p.hcl())
      column_kernel<T, true, kFast><<<grid, block, 0, stream()>>>(a);
    else
      column_kernel<T, false, kFast><<<grid, block, 0, stream()>>>(a);
  }

  template <typename T>
  static void launch_columns(const TileArgs<T>& a) {
    if constexpr (std::is_same_v<T, float>) {
      if (a.fast_exp) return launch_columns_as<T, true>(a);
    }
    launch_columns_as<T, false>(a);
  }

  template <typename T>
  static void fwd_tile(const TileArgs<T>& a) {
    if constexpr (std::is_same_v<T, float>) {
      if (a.fast_exp)
        launch_fwd_kind<T, true>(a);
      else
        launch_fwd_kind<T, false>(a);
    } else {
      launch_fwd_kind<T, false>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (a.symmetric) {
      launch_columns<T>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

  template <typename T>
  static void finish_columns(const TileArgs<T>& a) {
    finish_columns_kernel<T><<<blocks_for(a.M, kThreads), kThreads, 0, stream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename T>
  static void coefs(int kind, const T* stats, const T* grad, int64_t n, const Params<T>& p, T* out, int64_t ld) {
    if (n == 0) return;
    coef_kernel<T><<<blocks_for(n, kThreads), kThreads, 0, stream()>>>(kind, stats, grad, n, p, out, ld);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // SigLIP: one launch that reads the tile once (row_bwd_kernel<kFwd>). The softmax kinds need each row's
  // record before its G: three launches on one stream (fold the rows, derive their coefficients, write G).
  template <typename T>
  static void fwd_grad_tile(const TileArgs<T>& a) {
    if (a.kind == kSigmoid) {
      launch_bwd<T, true>(a);
      return;
    }
    fwd_tile(a);
    coefs<T>(a.kind, a.row_stats + a.row0 * kStats, nullptr, a.rows, a.p, a.row_coef + a.row0, a.N);
    bwd_tile(a);
  }

  template <typename T>
  static void bwd_tile(const TileArgs<T>& a) {
    launch_bwd<T, false>(a);
  }

  template <typename T, bool kFwd>
  static void launch_bwd(const TileArgs<T>& a) {
    const int threads = cuda::row_block_threads(a.M, int(sizeof(T)));
    if (a.grad_kind == kGradInPlace) {
      row_bwd_kernel<T, T, kFwd><<<cuda::grid_1d(a.rows), threads, 0, stream()>>>(a);
    } else if constexpr (std::is_same_v<T, float>) {
      if (a.grad_kind == kGradHalf)
        row_bwd_kernel<float, c10::Half, kFwd><<<cuda::grid_1d(a.rows), threads, 0, stream()>>>(a);
      else
        row_bwd_kernel<float, c10::BFloat16, kFwd><<<cuda::grid_1d(a.rows), threads, 0, stream()>>>(a);
    } else {
      TORCH_CHECK(false, "contrastive_bwd: fp16 / bf16 gradient tiles need fp32 accumulation");
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void finish_backward(const Inputs& in, at::Tensor& dq) {
    if (!in.positive.defined() || dq.size(0) == 0) return;  // no positives, or no dq wanted
    AT_DISPATCH_FLOATING_TYPES(dq.scalar_type(), "contrastive_bwd_nan_rows", [&] {
      nan_bad_rows_kernel<scalar_t><<<cuda::grid_1d(in.N), 128, 0, stream()>>>(
          dq.data_ptr<scalar_t>(), in.positive.data_ptr<int64_t>(), in.M, in.d);
    });
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_fwd_grad(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& positive, const std::optional<at::Tensor>& labels_q,
    const std::optional<at::Tensor>& labels_k, int64_t kind, bool exclude_self, bool decoupled, double beta,
    double label_smoothing, int64_t block_rows, bool query_grad, bool key_grad) {
  c10::cuda::CUDAGuard guard(query.device());
  return forward_grad<CudaBackend>(
      query, key, scale, bias, positive, labels_q, labels_k,
      Options{kind, false, exclude_self, decoupled, beta, label_smoothing, block_rows, query_grad, key_grad});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_bwd(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& scale, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& positive,
    const std::optional<at::Tensor>& labels_q, const std::optional<at::Tensor>& labels_k,
    const at::Tensor& row_stats, const at::Tensor& col_stats, int64_t kind, bool symmetric, bool exclude_self,
    bool decoupled, double beta, double label_smoothing, int64_t block_rows, bool query_grad, bool key_grad) {
  c10::cuda::CUDAGuard guard(query.device());
  return backward<CudaBackend>(
      grad_row, grad_col, query, key, scale, bias, positive, labels_q, labels_k, row_stats, col_stats,
      Options{kind, symmetric, exclude_self, decoupled, beta, label_smoothing, block_rows, query_grad, key_grad});
}

}  // namespace
}  // namespace fastloss::contrastive

TORCH_LIBRARY_IMPL(fastloss, CUDA, m) {
  m.impl("contrastive_fwd", &fastloss::contrastive::contrastive_fwd);
  m.impl("contrastive_fwd_grad", &fastloss::contrastive::contrastive_fwd_grad);
  m.impl("contrastive_bwd", &fastloss::contrastive::contrastive_bwd);
}
