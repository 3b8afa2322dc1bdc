// A CUDA emulator for the tests (tests/cuemu/README.md): fastloss's CUDA sources compiled as host C++ and run
// on the CPU. Each block's threads are fibers (ucontext) on one OS thread, run one after another until each
// reaches a barrier: __syncthreads releases when every live thread of the block waits there, a warp shuffle
// when every live lane of the warp does; a barrier that can never release (divergence) raises. Blocks run one
// at a time, so `__shared__` variables are function statics and dynamic shared memory is one buffer, all
// filled with 0xff (NaN in every float type) before each block. FASTLOSS_EMU_ORDER=reverse (or shuffle[:seed]) runs the
// threads between barriers in another order: a result that depends on it has a missing barrier (a race).
// cp.async copies stay in flight until a wait covers them (check_not_in_flight). Not emulated: the device's own
// instructions (the host paths of fl_exp_* and packed_max run instead), timing, and memory ordering beyond
// barriers.
#pragma once
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {
// A vector load or store at an address its type's alignment does not allow: a "misaligned address" fault on a
// GPU, silently fine on x86. FL_CHECKED_COPY (csrc/cuda/common.cuh) gives the sources' vector types a copy that
// checks its source (and, for an assignment, its destination).
template <typename T>
inline void check_aligned(const T* p, const char* type) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0)
    throw std::runtime_error(std::string("misaligned address: a ") + type + " (" +
                             std::to_string(alignof(T)) + "-byte aligned) at " +
                             std::to_string(reinterpret_cast<uintptr_t>(p) % alignof(T)) + " bytes past alignment");
}
// Shared memory that a cp.async is still writing (defined below).
inline void check_not_in_flight(const void* p, size_t bytes, const char* type);
}  // namespace emu
#define FL_CHECKED_COPY(Type)                                   \
  Type() = default;                                             \
  Type(const Type& o) {                                         \
    ::emu::check_aligned(&o, #Type);                            \
    ::emu::check_not_in_flight(&o, sizeof(Type), #Type);        \
    std::memcpy(static_cast<void*>(this), &o, sizeof(Type));    \
  }                                                             \
  Type& operator=(const Type& o) {                              \
    ::emu::check_aligned(&o, #Type);                            \
    ::emu::check_aligned(this, #Type);                          \
    ::emu::check_not_in_flight(&o, sizeof(Type), #Type);        \
    ::emu::check_not_in_flight(this, sizeof(Type), #Type);      \
    std::memcpy(static_cast<void*>(this), &o, sizeof(Type));    \
    return *this;                                               \
  }

struct alignas(16) uint4 {
  unsigned x, y, z, w;
  FL_CHECKED_COPY(uint4)
};

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0, cudaErrorInvalidValue = 1;
using cudaStream_t = struct CUstream_st*;
enum cudaDeviceAttr {
  cudaDevAttrComputeCapabilityMajor,
  cudaDevAttrComputeCapabilityMinor,
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

namespace emu {

// The emulated device: an sm_90 with Hopper's shared memory and register file but only a few SMs (so a
// persistent grid gives each block several rows). FASTLOSS_EMU_SMS overrides the count.
constexpr int kSmemPerSm = 233472, kSmemOptin = 232448, kStaticSmemDefault = 49152, kThreadsPerSm = 2048;
inline int sm_count() {
  static const int n = [] {
    const char* e = std::getenv("FASTLOSS_EMU_SMS");
    return e ? std::max(1, std::atoi(e)) : 3;
  }();
  return n;
}

enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };
// A fiber starts through its ucontext (setcontext) and then switches with _setjmp / _longjmp, which, unlike
// swapcontext, make no signal-mask system call per switch (most of the emulator's time otherwise).
// A cp.async in flight: its 16 bytes, read from global memory at issue, land in shared memory at the wait
// that covers its commit group.
struct AsyncCopy {
  size_t dst;
  unsigned char bytes[16];
};
struct Fiber {
  ucontext_t start;
  jmp_buf env;
  bool started = false;
  State state = State::kReady;
  uint3 tid{0, 0, 0};
  int linear = 0;
  std::vector<AsyncCopy> uncommitted;               // issued since the last commit
  std::vector<std::vector<AsyncCopy>> committed;    // commit groups in flight, oldest first
};

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;

struct Device {
  std::vector<Fiber> fibers = std::vector<Fiber>(kMaxThreads);
  char* stacks = nullptr;
  jmp_buf scheduler;
  Fiber* current = nullptr;
  uint3 block_idx{0, 0, 0};
  dim3 block_dim, grid_dim;
  std::function<void()> body;
  std::vector<uint64_t> warp_slots = std::vector<uint64_t>(kMaxThreads);
  alignas(16) unsigned char dynamic_smem[kSmemOptin];
  size_t dynamic_bytes = 0;
  std::vector<std::pair<void*, size_t>> static_smem;  // the kernels' __shared__ variables (function statics)
  std::vector<int> in_flight = std::vector<int>(kSmemOptin / 16);  // cp.async copies in flight per 16 bytes
  int copies_in_flight = 0;
  std::map<const void*, int> dynamic_limit;  // cudaFuncSetAttribute
  std::string error;
  bool running = false;
  Device() {
    stacks = static_cast<char*>(mmap(nullptr, kStackBytes * kMaxThreads, PROT_READ | PROT_WRITE,
                                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (stacks == MAP_FAILED) throw std::runtime_error("cuemu: no memory for the fiber stacks");
  }
};
inline Device& device() {
  static Device d;
  return d;
}
inline Fiber& me() { return *device().current; }

inline void yield(State s) {
  Device& d = device();
  Fiber& f = me();
  f.state = s;
  if (_setjmp(f.env) == 0) _longjmp(d.scheduler, 1);
}

inline void fiber_entry() {
  Device& d = device();
  try {
    d.body();
    if (!me().uncommitted.empty() || !me().committed.empty())
      throw std::runtime_error("a thread returned with cp.async copies in flight (no cp.async.wait_group 0)");
  } catch (const std::exception& e) {
    if (d.error.empty()) d.error = e.what();
  } catch (...) {
    if (d.error.empty()) d.error = "unknown exception in a kernel thread";
  }
  me().state = State::kDone;
  _longjmp(d.scheduler, 1);  // never returns here: the fiber's stack is reused by the next block
}

// The order in which the threads run between barriers: FASTLOSS_EMU_ORDER=reverse, or shuffle[:seed] (a new
// permutation each round); by thread index otherwise.
enum class Order { kForward, kReverse, kShuffle };
inline Order order() {
  static const Order o = [] {
    const char* e = std::getenv("FASTLOSS_EMU_ORDER");
    if (e && std::strcmp(e, "reverse") == 0) return Order::kReverse;
    if (e && std::strncmp(e, "shuffle", 7) == 0) return Order::kShuffle;
    return Order::kForward;
  }();
  return o;
}
inline uint64_t& shuffle_state() {
  static uint64_t s = [] {
    const char* e = std::getenv("FASTLOSS_EMU_ORDER");
    const char* colon = e ? std::strchr(e, ':') : nullptr;
    return colon ? std::strtoull(colon + 1, nullptr, 10) * 2654435761u + 1 : 88172645463325252ull;
  }();
  return s;
}
inline void schedule(std::vector<int>& perm, int threads) {
  perm.resize(threads);
  for (int i = 0; i < threads; ++i) perm[i] = order() == Order::kReverse ? threads - 1 - i : i;
  if (order() != Order::kShuffle) return;
  for (int i = threads - 1; i > 0; --i) {  // Fisher-Yates with xorshift64
    uint64_t& s = shuffle_state();
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    std::swap(perm[i], perm[s % uint64_t(i + 1)]);
  }
}

// Runs one block to completion.
inline void run_block(int threads) {
  Device& d = device();
  for (int t = 0; t < threads; ++t) {
    Fiber& f = d.fibers[t];
    f = Fiber{};
    f.linear = t;
    f.tid = {unsigned(t % d.block_dim.x), unsigned((t / d.block_dim.x) % d.block_dim.y),
             unsigned(t / (d.block_dim.x * d.block_dim.y))};
    getcontext(&f.start);
    f.start.uc_stack.ss_sp = d.stacks + size_t(t) * kStackBytes;
    f.start.uc_stack.ss_size = kStackBytes;
    f.start.uc_link = nullptr;
    makecontext(&f.start, fiber_entry, 0);
  }
  const int warps = (threads + 31) / 32;
  std::vector<int> perm;
  for (;;) {
    schedule(perm, threads);
    for (int i = 0; i < threads; ++i) {
      Fiber& f = d.fibers[perm[i]];
      if (f.state != State::kReady) continue;
      d.current = &f;
      if (_setjmp(d.scheduler) == 0) {
        if (!f.started) {
          f.started = true;
          setcontext(&f.start);
        }
        _longjmp(f.env, 1);
      }
      d.current = nullptr;
    }
    if (!d.error.empty()) throw std::runtime_error("cuemu: " + d.error);
    bool all_done = true, released = false;
    for (int w = 0; w < warps; ++w) {  // a warp whose live lanes all wait at a shuffle goes on
      bool any = false, all = true;
      for (int t = 32 * w; t < std::min(threads, 32 * w + 32); ++t) {
        const State s = d.fibers[t].state;
        if (s == State::kDone) continue;
        any = true;
        all = all && s == State::kAtWarpBarrier;
      }
      if (any && all) {
        for (int t = 32 * w; t < std::min(threads, 32 * w + 32); ++t)
          if (d.fibers[t].state == State::kAtWarpBarrier) d.fibers[t].state = State::kReady;
        released = true;
      }
    }
    if (released) continue;
    bool all_block = true;
    for (int t = 0; t < threads; ++t) {
      const State s = d.fibers[t].state;
      if (s == State::kDone) continue;
      all_done = false;
      all_block = all_block && s == State::kAtBlockBarrier;
    }
    if (all_done) return;
    if (!all_block) {
      std::string what = "cuemu: deadlock in block (" + std::to_string(d.block_idx.x) + "): threads wait at ";
      for (int t = 0; t < threads; ++t) {
        const State s = d.fibers[t].state;
        what += s == State::kAtBlockBarrier ? 'B' : s == State::kAtWarpBarrier ? 'W' : s == State::kDone ? '.' : '?';
      }
      throw std::runtime_error(what + " (B: __syncthreads, W: a warp shuffle, .: exited)");
    }
    // __syncthreads must be reached by every thread of the block (CUDA leaves it undefined otherwise): one
    // that has returned while the others wait is a divergent barrier
    for (int t = 0; t < threads; ++t)
      if (d.fibers[t].state == State::kDone)
        throw std::runtime_error("cuemu: __syncthreads in block (" + std::to_string(d.block_idx.x) +
                                 ") after thread " + std::to_string(t) + " returned");
    for (int t = 0; t < threads; ++t)
      if (d.fibers[t].state == State::kAtBlockBarrier) d.fibers[t].state = State::kReady;
  }
}

struct Config {
  dim3 grid, block;
  size_t smem;
};
template <typename... P>
struct Bound {
    void (*kernel)(P...);
    Config cfg;
    template <typename... A>
    void operator()(A&&... a) const {
      static_assert(sizeof...(A) == sizeof...(P), "cuemu: wrong number of kernel arguments");
      Device& d = device();
      if (d.running) throw std::runtime_error("cuemu: a kernel launched from a kernel");
      const int threads = int(cfg.block.x * cfg.block.y * cfg.block.z);
      // a GPU's limits: 1024 threads per block (z at most 64), 2^31 - 1 blocks in x and 65535 in y and z
      if (threads < 1 || threads > kMaxThreads || cfg.block.z > 64 || cfg.grid.x < 1 || cfg.grid.y < 1 ||
          cfg.grid.z < 1 || cfg.grid.x > 2147483647u || cfg.grid.y > 65535 || cfg.grid.z > 65535)
        throw std::runtime_error("cuemu: bad launch configuration (grid " + std::to_string(cfg.grid.x) + "x" +
                                 std::to_string(cfg.grid.y) + "x" + std::to_string(cfg.grid.z) + ", block " +
                                 std::to_string(cfg.block.x) + "x" + std::to_string(cfg.block.y) + "x" +
                                 std::to_string(cfg.block.z) + ")");
      auto lim = d.dynamic_limit.find(reinterpret_cast<const void*>(kernel));
      const size_t limit = lim == d.dynamic_limit.end() ? kStaticSmemDefault : size_t(lim->second);
      if (cfg.smem > limit)
        throw std::runtime_error("cuemu: " + std::to_string(cfg.smem) + " B of dynamic shared memory above the " +
                                 std::to_string(limit) + " B this kernel was allowed");
      std::tuple<std::decay_t<P>...> args(std::forward<A>(a)...);  // converted as a launch converts them
      d.block_dim = cfg.block;
      d.grid_dim = cfg.grid;
      d.dynamic_bytes = cfg.smem;
      d.body = [&] {
        auto mine = args;  // each thread its own copy of the parameters
        std::apply(kernel, mine);
      };
      d.error.clear();
      d.running = true;
      try {
        for (unsigned z = 0; z < cfg.grid.z; ++z)
          for (unsigned y = 0; y < cfg.grid.y; ++y)
            for (unsigned x = 0; x < cfg.grid.x; ++x) {
              d.block_idx = {x, y, z};
              std::memset(d.dynamic_smem, 0xff, cfg.smem);
              for (const auto& [p, bytes] : d.static_smem) std::memset(p, 0xff, bytes);
              std::fill(d.in_flight.begin(), d.in_flight.end(), 0);
              d.copies_in_flight = 0;
              run_block(threads);
            }
      } catch (...) {
        d.running = false;
        throw;
      }
      d.running = false;
    }
};
struct Launcher {
  Config cfg;
  template <typename... P>
  Bound<P...> operator()(void (*kernel)(P...)) const {
    return {kernel, cfg};
  }
};
inline Launcher launch(dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return {{grid, block, smem}};
}

// A __shared__ variable (build.py makes it a function static and calls this once, where it is declared): its
// bytes are 0xff (NaN in every float type) before each block, as undefined as on a GPU, so a block that reads
// a slot no thread of it wrote (a reduction over more warps than the block has) sees NaN, not the previous
// block's value or a zero.
inline bool static_smem(void* p, size_t bytes) {
  device().static_smem.emplace_back(p, bytes);
  std::memset(p, 0xff, bytes);
  return true;
}

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(device().dynamic_smem);
}

// A shared-space address: the offset into the dynamic shared memory (the only shared memory the sources
// address that way), checked against the launch's size.
inline size_t to_shared(const void* p) {
  Device& d = device();
  const auto off = static_cast<const unsigned char*>(p) - d.dynamic_smem;
  if (off < 0 || size_t(off) >= d.dynamic_bytes)
    throw std::runtime_error("a shared address outside the launch's dynamic shared memory");
  return size_t(off);
}
inline void* from_shared(size_t a) {
  Device& d = device();
  if (a + 16 > d.dynamic_bytes) throw std::runtime_error("a shared access past the dynamic shared memory");
  return d.dynamic_smem + a;
}

// cp.async as a GPU runs it: a copy is in flight from its issue until a cp.async.wait_group of the issuing
// thread leaves its commit group out of the newest `pending`; only then do its bytes land. A 16-byte vector
// read or write of those bytes in between (a missing or too short wait, a ring slot refilled before it was
// read) raises, as does a second copy into them or a thread returning with copies in flight: on a GPU each
// would see whichever bytes the copy had landed by then.
// A kernel's __launch_bounds__(max_threads): a launch of more threads per block fails on a GPU ("too many
// resources requested for launch"); build.py puts this check first in each such kernel.
inline void check_launch_bounds(int max_threads) {
  const dim3 b = device().block_dim;
  if (int(b.x * b.y * b.z) > max_threads)
    throw std::runtime_error("too many resources requested for launch: " + std::to_string(b.x * b.y * b.z) +
                             " threads per block above the kernel's __launch_bounds__ of " +
                             std::to_string(max_threads));
}
inline void check_not_in_flight(const void* p, size_t bytes, const char* type) {
  Device& d = device();
  if (d.copies_in_flight == 0) return;
  const auto off = static_cast<const unsigned char*>(p) - d.dynamic_smem;
  if (off < 0 || size_t(off) >= d.dynamic_bytes) return;
  for (size_t g = size_t(off) / 16; g <= (size_t(off) + bytes - 1) / 16; ++g)
    if (d.in_flight[g] > 0)
      throw std::runtime_error(std::string("a ") + type + " at shared offset " + std::to_string(off) +
                               " that a cp.async in flight is still writing (no cp.async.wait_group covers it)");
}
inline void cp_async16(size_t smem, const void* gmem) {
  Device& d = device();
  if (smem % 16 != 0 || reinterpret_cast<uintptr_t>(gmem) % 16 != 0)
    throw std::runtime_error("misaligned address: a 16-byte cp.async");
  from_shared(smem);  // bounds
  if (d.in_flight[smem / 16] > 0)
    throw std::runtime_error("a cp.async into shared memory that another cp.async in flight is still writing");
  AsyncCopy c{smem, {}};
  std::memcpy(c.bytes, gmem, 16);
  me().uncommitted.push_back(c);
  ++d.in_flight[smem / 16];
  ++d.copies_in_flight;
}
inline void cp_async_commit() {
  Fiber& f = me();
  f.committed.push_back(std::move(f.uncommitted));
  f.uncommitted.clear();
}
inline void cp_async_wait(int pending) {
  Device& d = device();
  Fiber& f = me();
  while (f.committed.size() > size_t(pending)) {
    for (const AsyncCopy& c : f.committed.front()) {
      std::memcpy(d.dynamic_smem + c.dst, c.bytes, 16);
      --d.in_flight[c.dst / 16];
      --d.copies_in_flight;
    }
    f.committed.erase(f.committed.begin());
  }
}

}  // namespace emu

#define FL_HOST_CP_ASYNC16(smem, gmem) ::emu::cp_async16(smem, gmem)
#define FL_HOST_CP_ASYNC_COMMIT() ::emu::cp_async_commit()
#define FL_HOST_CP_ASYNC_WAIT(pending) ::emu::cp_async_wait(pending)

#define threadIdx (::emu::me().tid)
#define blockIdx (::emu::device().block_idx)
#define blockDim (::emu::device().block_dim)
#define gridDim (::emu::device().grid_dim)

inline void __syncthreads() { ::emu::yield(::emu::State::kAtBlockBarrier); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "cuemu: a shuffle moves at most 8 bytes");
  if (mask != 0xffffffffu || width != 32) throw std::runtime_error("cuemu: only full-warp shuffles are emulated");
  emu::Device& d = emu::device();
  const int t = emu::me().linear, lane = t % 32, src = (t - lane) + (lane ^ (lane_mask & 31));
  std::memcpy(&d.warp_slots[t], &v, sizeof(T));
  emu::yield(emu::State::kAtWarpBarrier);
  // shfl.sync (sm_70+) waits for the mask's lanes that have not exited; a value read from one that has is
  // undefined
  const int threads = int(d.block_dim.x * d.block_dim.y * d.block_dim.z);
  if (src >= threads || d.fibers[src].state == emu::State::kDone)
    throw std::runtime_error("a warp shuffle read lane " + std::to_string(src % 32) + ", which " +
                             (src >= threads ? "is past the block" : "has returned"));
  T r;
  std::memcpy(&r, &d.warp_slots[src], sizeof(T));
  emu::yield(emu::State::kAtWarpBarrier);  // nobody overwrites a slot before every lane has read it
  return r;
}

inline float __fmul_rn(float a, float b) {
  volatile float r = a * b;  // never contracted into an fma
  return r;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline size_t __cvta_generic_to_shared(const void* p) { return emu::to_shared(p); }
inline void* __cvta_shared_to_generic(size_t a) { return emu::from_shared(a); }

inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  switch (a) {
    case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
    case cudaDevAttrMultiProcessorCount: *v = emu::sm_count(); break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = emu::kSmemOptin; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
template <typename K>
inline cudaError_t cudaFuncSetAttribute(K* kernel, cudaFuncAttribute, int bytes) {
  if (bytes < 0 || bytes > emu::kSmemOptin) return cudaErrorInvalidValue;
  emu::device().dynamic_limit[reinterpret_cast<const void*>(kernel)] = bytes;
  return cudaSuccess;
}
inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute, int bytes) {
  if (bytes < 0 || bytes > emu::kSmemOptin) return cudaErrorInvalidValue;
  emu::device().dynamic_limit[kernel] = bytes;
  return cudaSuccess;
}
// Blocks per SM by threads and shared memory (the emulator does not count registers or static shared memory).
template <typename K>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K* kernel, int threads, size_t smem) {
  auto lim = emu::device().dynamic_limit.find(reinterpret_cast<const void*>(kernel));
  const size_t limit = lim == emu::device().dynamic_limit.end() ? emu::kStaticSmemDefault : size_t(lim->second);
  if (threads < 1 || threads > emu::kMaxThreads || smem > limit) {
    *n = 0;
    return cudaSuccess;
  }
  int by_threads = emu::kThreadsPerSm / threads, by_smem = smem ? int(emu::kSmemPerSm / (smem + 1024)) : 32;
  *n = std::min({by_threads, by_smem, 32});
  return cudaSuccess;
}
