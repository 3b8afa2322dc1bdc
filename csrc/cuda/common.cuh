// Small CUDA building blocks shared by fastloss kernels: deterministic warp/block merges of any trivially
// copyable state, and a vectorised walk over one row.
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace fastloss::cuda {

constexpr int kWarp = 32;

// Shuffle any trivially copyable state word by word.
template <typename S>
__device__ __forceinline__ S shfl_xor(const S& v, int mask) {
  static_assert(sizeof(S) % sizeof(int) == 0, "state must be a whole number of 32-bit words");
  constexpr int W = sizeof(S) / sizeof(int);
  int src[W], dst[W];
  memcpy(src, &v, sizeof(S));
#pragma unroll
  for (int i = 0; i < W; ++i) dst[i] = __shfl_xor_sync(0xffffffffu, src[i], mask);
  S out;
  memcpy(&out, dst, sizeof(S));
  return out;
}

// Merges `v` across the block in a fixed order (bit-reproducible) and returns the result to every thread.
// `merge(a, b)` folds b into a. `smem` must hold blockDim.x / 32 states. blockDim.x is a multiple of 32.
template <typename S, typename Merge>
__device__ __forceinline__ S block_merge(S v, S* smem, Merge merge) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) merge(v, shfl_xor(v, off));
  __syncthreads();  // smem may still be read by a previous block_merge
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    S w = lane < nwarps ? smem[lane] : smem[0];
    const bool valid = lane < nwarps;
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) {
      S o = shfl_xor(w, off);
      const bool ovalid = __shfl_xor_sync(0xffffffffu, valid, off);
      if (valid && ovalid) merge(w, o);
    }
    if (lane == 0) smem[0] = w;
  }
  __syncthreads();
  return smem[0];
}

// 16-byte pack of scalars for vectorised loads and stores.
template <typename T>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

// Hint: bring the 128-byte line holding p into L2 (no registers held, nothing waits on it).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.L2 [%0];" ::"l"(p)); }

// Visits a row: element(k, x_k) for the unaligned head and the tail, and group(p, n, k0, step) for the
// 16-byte-aligned body, each thread a strided share: its packs come U at a time (loaded together, in flight at
// once), p[u] starting at element k0 + u * step. In the last group only p[0..n) are in the row and the others
// hold `pad`; every other group is full, n == U, and runs without per-pack bounds checks. kAhead > 0: each
// full group first prefetches into L2 the lines of the group kAhead further on (its loads then wait on L2
// rather than DRAM; U packs per thread in flight are not enough to cover DRAM latency while the warps compute).
template <typename T, int U, int kAhead = 0, typename E, typename G>
__device__ __forceinline__ void for_each_pack_group(const T* row, int64_t C, const Pack<T>& pad, E&& element,
                                                    G&& group) {
  constexpr int V = Pack<T>::N;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int64_t mis = (reinterpret_cast<uintptr_t>(row) % 16) / sizeof(T);
  int64_t head = mis == 0 ? 0 : (V - mis);
  if (head > C) head = C;
  for (int64_t k = tid; k < head; k += nt) element(k, row[k]);
  const int64_t n_vec = (C - head) / V;
  const Pack<T>* vp = reinterpret_cast<const Pack<T>*>(row + head);
  const int64_t step = int64_t(nt) * V;
  // kAhead: the pack whose line this thread prefetches, kAhead groups on; lane l takes its pack u = l % U of
  // that group, so prefetches land every 64 bytes of the group (the block covers all its lines; a warp's edge
  // line may come from its neighbour when the body is not 128-byte aligned). The pointer advances with
  // v_ahead, so the row's base need not stay in registers; past the row it is never dereferenced.
  int64_t v_ahead = tid + int64_t(kAhead * U + tid % U) * nt;
  const Pack<T>* ahead = vp + v_ahead;
  int64_t v0 = tid;
  for (; v0 + int64_t(U - 1) * nt < n_vec; v0 += int64_t(U) * nt) {
    if constexpr (kAhead > 0) {
      if (v_ahead < n_vec) prefetch_l2(ahead);
      v_ahead += int64_t(U) * nt;
      ahead += int64_t(U) * nt;
    }
    Pack<T> p[U];
#pragma unroll
    for (int u = 0; u < U; ++u) p[u] = vp[v0 + int64_t(u) * nt];
    group(p, U, head + v0 * V, step);
  }
  if (v0 < n_vec) {
    Pack<T> p[U];
    int n = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + int64_t(u) * nt;
      p[u] = v < n_vec ? vp[v] : pad;
      n += v < n_vec;
    }
    group(p, n, head + v0 * V, step);
  }
  for (int64_t k = head + n_vec * V + tid; k < C; k += nt) element(k, row[k]);
}

// Visits a row: element(k, x_k) for the unaligned head and the tail, pack(k0, Pack) for each 16-byte-aligned
// pack of the body, each thread a strided share with U packs in flight.
template <typename T, int U = 4, int kAhead = 0, typename E, typename P>
__device__ __forceinline__ void for_each_in_row(const T* row, int64_t C, E&& element, P&& pack) {
  for_each_pack_group<T, U, kAhead>(row, C, Pack<T>{}, element,
                                    [&](const Pack<T>(&p)[U], int n, int64_t k0, int64_t step) {
#pragma unroll
                                      for (int u = 0; u < U; ++u)
                                        if (u < n) pack(k0 + u * step, p[u]);
                                    });
}

// out[k] = g(k, x_k) for every element of a row; vectorised when input and output rows share alignment.
// g_pack(k0, in, out) maps a whole body pack.
template <typename T, int U = 4, typename G, typename GP>
__device__ __forceinline__ void map_row(const T* row, T* out, int64_t C, G&& g, GP&& g_pack) {
  constexpr int V = Pack<T>::N;
  const int tid = threadIdx.x, nt = blockDim.x;
  if (reinterpret_cast<uintptr_t>(row) % 16 != reinterpret_cast<uintptr_t>(out) % 16) {
    for (int64_t k = tid; k < C; k += nt) out[k] = g(k, row[k]);
    return;
  }
  const int64_t mis = (reinterpret_cast<uintptr_t>(row) % 16) / sizeof(T);
  int64_t head = mis == 0 ? 0 : (V - mis);
  if (head > C) head = C;
  for (int64_t k = tid; k < head; k += nt) out[k] = g(k, row[k]);
  const int64_t n_vec = (C - head) / V;
  const Pack<T>* vp = reinterpret_cast<const Pack<T>*>(row + head);
  Pack<T>* op = reinterpret_cast<Pack<T>*>(out + head);
  for (int64_t v0 = tid; v0 < n_vec; v0 += int64_t(U) * nt) {
    Pack<T> p[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + int64_t(u) * nt;
      if (v < n_vec) p[u] = vp[v];
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + int64_t(u) * nt;
      if (v < n_vec) {
        Pack<T> o;
        g_pack(head + v * V, p[u], o);
        op[v] = o;
      }
    }
  }
  for (int64_t k = head + n_vec * V + tid; k < C; k += nt) out[k] = g(k, row[k]);
}

// An on/off switch from the environment, on unless the variable is "0" (tuning knobs for the benchmarks).
inline bool env_flag(const char* name) {
  const char* env = std::getenv(name);
  return !(env && env[0] == '0' && env[1] == '\0');
}

// Whether the streaming row loops that take it prefetch into L2 (FASTLOSS_ROW_PREFETCH=0 turns it off).
inline bool row_prefetch() {
  static const bool on = env_flag("FASTLOSS_ROW_PREFETCH");
  return on;
}

// Threads per row block: 64 to kMaxRowThreads, aiming at `packs_per_thread` 16-byte packs per thread (more
// work per thread amortises the block reduction; smaller blocks keep several rows in flight per SM).
// FASTLOSS_ROW_PACKS_PER_THREAD overrides the aim (a tuning knob for bench/bench_bandwidth.py --sweep).
constexpr int kMaxRowThreads = 512;
inline int row_block_threads(int64_t C, int elem_bytes) {
  static const int packs_per_thread = [] {
    const char* env = std::getenv("FASTLOSS_ROW_PACKS_PER_THREAD");
    return env ? std::max(1, std::atoi(env)) : 16;
  }();
  const int64_t packs = (C * elem_bytes + 15) / 16;
  int t = 64;
  while (t < kMaxRowThreads && int64_t(t) * packs_per_thread < packs) t *= 2;
  return t;
}

// A 1-D grid of `blocks` for kernels without a grid-stride loop: refuse more than a launch takes (2^31 - 1)
// instead of truncating to unsigned and leaving the rows past it unwritten.
inline unsigned grid_1d(int64_t blocks) {
  TORCH_CHECK(blocks <= int64_t(INT32_MAX), "fastloss: ", blocks, " blocks exceed one CUDA launch (2^31 - 1)");
  return static_cast<unsigned>(blocks);
}

}  // namespace fastloss::cuda
