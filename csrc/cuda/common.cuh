// Small CUDA building blocks shared by fastloss kernels: deterministic warp/block merges of any trivially
// copyable state, and a vectorised walk over one row.
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

namespace fastloss::cuda {

constexpr int kWarp = 32;

// The tests' CUDA emulator (tests/cuemu) defines FL_CHECKED_COPY(Type) to check every copy of a vector type
// against the type's alignment, as a GPU does (a misaligned vector load or store faults there; x86 would not);
// a real build adds nothing.
#ifndef FL_CHECKED_COPY
#define FL_CHECKED_COPY(Type)
#endif
// It also defines FL_HOST_CP_ASYNC16 / _COMMIT / _WAIT, the host forms of cp.async, to keep each copy in flight
// until a wait covers it, as a GPU does; a host pass or a GPU before sm_80 copies synchronously.
#ifndef FL_HOST_CP_ASYNC16
#define FL_HOST_CP_ASYNC16(smem, gmem) \
  (*static_cast<uint4*>(__cvta_shared_to_generic(smem)) = *static_cast<const uint4*>(gmem))
#define FL_HOST_CP_ASYNC_COMMIT()
#define FL_HOST_CP_ASYNC_WAIT(pending)
#endif

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
  FL_CHECKED_COPY(Pack)
};

// Hint: bring the 128-byte line holding p into L2 (no registers held, nothing waits on it). A host build (the
// tests' CUDA emulator, tests/cuemu) has nothing to prefetch.
__device__ __forceinline__ void prefetch_l2(const void* p) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.L2 [%0];" ::"l"(p));
#else
  (void)p;
#endif
}

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

// cp.async (sm_80+): a 16-byte copy global -> shared (a shared-space address) that holds no register while in
// flight, cached in L2 only. Older GPUs never launch a staged kernel (staged_row_launch); their build copies
// synchronously.
__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem), "l"(gmem) : "memory");
#else
  FL_HOST_CP_ASYNC16(smem, gmem);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#else
  FL_HOST_CP_ASYNC_COMMIT();
#endif
}
// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
#else
  FL_HOST_CP_ASYNC_WAIT(kPending);
#endif
}

// Streams the rows blockIdx.x, blockIdx.x + gridDim.x, ... < N of a row-major (N, C) matrix (a persistent grid)
// through a per-thread ring of S slots in shared memory, each slot one group of U 16-byte packs filled by
// cp.async. While a thread works on one group, its next S - 1 groups are in flight, those of the block's next row
// included, and they hold no registers: the walk never waits on DRAM at a row's start or between groups, which
// the register loads of for_each_pack_group do (they cover one group only).
// Needs every row 16-byte aligned and at least one whole pack long: x, and row_stride * sizeof(T) unless N == 1
// (staged_row_launch checks). Callbacks, in order for each row: row_begin(row); group(p, n, k0, step) for each
// group of packs (as in for_each_pack_group: p[u] starts at element k0 + u * step; only the row's last group
// may have n < U, its p[u] for u >= n past the row and holding pad); element(k, x_k) for the C % V elements past
// the last whole pack; row_end(row), which may __syncthreads (every thread of the block walks the same rows and
// groups). `ring` holds S * U * blockDim.x packs. Each thread reads back only the slots it filled itself, so the
// ring needs no barrier.
template <typename T, int U, int S, typename B, typename G, typename E, typename R>
__device__ __forceinline__ void stream_rows_staged(const T* __restrict__ x, int64_t row_stride, int64_t N, int64_t C,
                                                   Pack<T>* ring, const Pack<T>& pad, B&& row_begin, G&& group,
                                                   E&& element, R&& row_end) {
  static_assert(S >= 2, "a ring of one slot has nothing in flight");
  constexpr int V = Pack<T>::N;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int64_t n_vec = C / V;  // whole packs per row, >= 1
  const int64_t per_group = int64_t(U) * nt;
  const int64_t groups = (n_vec + per_group - 1) / per_group;  // per row, the same for every thread; >= 1
  // this thread's pack u of slot s: mine[(s * U + u) * nt], at shared address mine_s + that * 16
  const Pack<T>* mine = ring + tid;
  const uint32_t mine_s = static_cast<uint32_t>(__cvta_generic_to_shared(mine));
  const uint32_t pack_stride_s = uint32_t(nt) * 16u;
  // The producer: the next group to stage is group pg of row prow, this thread's first pack of it at src. One
  // commit per call, empty past the last row, so that the consumer's wait always leaves S - 2 newer groups.
  int64_t prow = blockIdx.x, pg = 0;
  const Pack<T>* src = reinterpret_cast<const Pack<T>*>(x + prow * row_stride) + tid;
  auto stage = [&](int slot) {
    if (prow < N) {
      const uint32_t dst = mine_s + uint32_t(slot * U) * pack_stride_s;
      if (pg + 1 < groups) {  // a whole group
#pragma unroll
        for (int u = 0; u < U; ++u) cp_async16(dst + u * pack_stride_s, src + u * nt);
      } else {  // the row's last group: the packs still in the row
        const int64_t left = n_vec - (pg * per_group + tid);
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (int64_t(u) * nt < left) cp_async16(dst + u * pack_stride_s, src + u * nt);
      }
      src += per_group;
      if (++pg == groups) {
        pg = 0;
        prow += gridDim.x;
        src = reinterpret_cast<const Pack<T>*>(x + prow * row_stride) + tid;  // never dereferenced past N
      }
    }
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < S - 1; ++s) stage(s);
  int slot = 0;
  // Waits for the next group (this thread's own copies), reads it and refills the slot read one step before
  // (whose values already went through registers into that step's arithmetic).
  auto next_group = [&](Pack<T>(&p)[U]) {
    cp_async_wait<S - 2>();
#pragma unroll
    for (int u = 0; u < U; ++u) p[u] = mine[(slot * U + u) * nt];
    stage(slot == 0 ? S - 1 : slot - 1);
    slot = slot + 1 == S ? 0 : slot + 1;
  };
  const int64_t step = int64_t(nt) * V;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    row_begin(row);
    int64_t k0 = int64_t(tid) * V;
    for (int64_t g = 0; g + 1 < groups; ++g, k0 += int64_t(U) * step) {
      Pack<T> p[U];
      next_group(p);
      group(p, U, k0, step);
    }
    {
      Pack<T> p[U];
      next_group(p);
      const int64_t left = n_vec - k0 / V;
      int n = 0;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const bool in = int64_t(u) * nt < left;
        n += in;
        if (!in) p[u] = pad;
      }
      group(p, n, k0, step);
    }
    const T* x_row = x + row * row_stride;
    for (int64_t k = n_vec * V + tid; k < C; k += nt) element(k, x_row[k]);
    row_end(row);
  }
  cp_async_wait<0>();
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

// Two rows read side by side (logits and probability targets): element(k, a_k, b_k) for the unaligned head and
// the tail, pack(k0, pa, pb) for each pack pair of the body: pa a 16-byte pack of a, pb the same lanes of b as
// R = sizeof(TB) / sizeof(TA) 16-byte packs (bf16 logits beside fp32 targets: two). U / R pairs per thread in
// flight (at least one): about the same bytes in flight and registers whatever R.
// out (or nullptr) is a third row, of TA, written with a's packs, so it must share a's alignment. Rows whose
// packs do not line up (b misaligned where a's body starts, or b narrower than a) take the element path.
template <typename TA, typename TB, int U = 2, typename E, typename P>
__device__ __forceinline__ void for_each_in_row_pair(const TA* a, const TB* b, int64_t C, const void* out,
                                                     E&& element, P&& pack) {
  const int tid = threadIdx.x, nt = blockDim.x;
  constexpr bool kPacks = sizeof(TB) % sizeof(TA) == 0;
  const uintptr_t mis_a = reinterpret_cast<uintptr_t>(a) % 16;
  constexpr int V = Pack<TA>::N, R = kPacks ? int(sizeof(TB) / sizeof(TA)) : 1;
  int64_t head = mis_a == 0 ? 0 : (V - int64_t(mis_a / sizeof(TA)));
  if (head > C) head = C;
  if (!kPacks || reinterpret_cast<uintptr_t>(b + head) % 16 != 0 ||
      (out != nullptr && mis_a != reinterpret_cast<uintptr_t>(out) % 16)) {
    for (int64_t k = tid; k < C; k += nt) element(k, a[k], b[k]);
    return;
  }
  if constexpr (kPacks) {
    for (int64_t k = tid; k < head; k += nt) element(k, a[k], b[k]);
    const int64_t n_vec = (C - head) / V;
    const Pack<TA>* pa = reinterpret_cast<const Pack<TA>*>(a + head);
    const Pack<TB>* pb = reinterpret_cast<const Pack<TB>*>(b + head);
    constexpr int UP = U / R > 0 ? U / R : 1;
    for (int64_t v0 = tid; v0 < n_vec; v0 += int64_t(UP) * nt) {
      Pack<TA> xa[UP];
      Pack<TB> xb[UP][R];
#pragma unroll
      for (int u = 0; u < UP; ++u) {
        const int64_t v = v0 + int64_t(u) * nt;
        if (v < n_vec) {
          xa[u] = pa[v];
#pragma unroll
          for (int r = 0; r < R; ++r) xb[u][r] = pb[v * R + r];
        }
      }
#pragma unroll
      for (int u = 0; u < UP; ++u) {
        const int64_t v = v0 + int64_t(u) * nt;
        if (v < n_vec) pack(head + v * V, xa[u], xb[u]);
      }
    }
    for (int64_t k = head + n_vec * V + tid; k < C; k += nt) element(k, a[k], b[k]);
  }
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
