// The emulator's own checks (tests/test_cuemu.py builds and runs this): each kernel below does what a GPU
// would refuse or what would hang it, and the launch must raise with the matching message. Exits non-zero
// (printing what went wrong) when a check stays silent or a correct kernel raises.
#include <cuda_runtime.h>

#include <cstdio>
#include <string>

#include "common.cuh"

using fastloss::cuda::Pack;

__global__ void copy_packs(const unsigned short* x, unsigned short* out, int offset) {
  const Pack<unsigned short>* src = reinterpret_cast<const Pack<unsigned short>*>(x + offset);
  reinterpret_cast<Pack<unsigned short>*>(out)[threadIdx.x] = src[threadIdx.x];
}

__global__ void store_packs(unsigned short* out, int offset) {
  reinterpret_cast<Pack<unsigned short>*>(out + offset)[threadIdx.x] = Pack<unsigned short>{};
}

__global__ void barrier_after_return() {
  if (threadIdx.x >= 16) return;
  __syncthreads();
}

__global__ void shuffle_after_return(int* out) {
  if (threadIdx.x % 2) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
}

__global__ void barrier_against_shuffle(int* out) {
  if (threadIdx.x < 16)
    __syncthreads();
  else
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
}

__global__ void shuffle_among_the_lanes_left(int* out) {  // legal on sm_70+: shfl.sync waits for lanes not exited
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
}

__global__ void whole_warps_return(int* out) {
  if (threadIdx.x >= 32) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
}

__global__ void shared_past_launch() {
  extern __shared__ uint4 smem[];
  __cvta_generic_to_shared(smem + 256);  // 4 KiB in
}

// Two commit groups of cp.async into this thread's two ring slots, then a wait that leaves `pending` groups in
// flight and a read of slot `read` (the second group's slot is in flight unless pending == 0).
__global__ void ring_read(const uint4* x, uint4* out, int pending, int read) {
  extern __shared__ uint4 ring[];
  const auto slot = [&](int s) { return uint32_t(__cvta_generic_to_shared(ring + s * blockDim.x + threadIdx.x)); };
  fastloss::cuda::cp_async16(slot(0), x + threadIdx.x);
  fastloss::cuda::cp_async_commit();
  fastloss::cuda::cp_async16(slot(1), x + blockDim.x + threadIdx.x);
  fastloss::cuda::cp_async_commit();
  if (pending == 0)
    fastloss::cuda::cp_async_wait<0>();
  else
    fastloss::cuda::cp_async_wait<1>();
  out[threadIdx.x] = ring[read * blockDim.x + threadIdx.x];
  fastloss::cuda::cp_async_wait<0>();
}

__global__ void return_with_copy_in_flight(const uint4* x) {
  extern __shared__ uint4 ring[];
  fastloss::cuda::cp_async16(uint32_t(__cvta_generic_to_shared(ring + threadIdx.x)), x + threadIdx.x);
  fastloss::cuda::cp_async_commit();
}

__global__ void __launch_bounds__(64) bounded_to_64(int* out) { out[threadIdx.x] = 1; }

// Each warp's lane 0 writes its slot; thread 0 reads slot 1, which a one-warp block never writes.
__global__ void read_slot_of_second_warp(float* out) {
  __shared__ float slot[2];
  if (threadIdx.x % 32 == 0) slot[threadIdx.x / 32] = 5.0f;
  __syncthreads();
  if (threadIdx.x == 0) *out = slot[1];
}

__global__ void block_sum(const float* x, float* out) {
  __shared__ float partial[64];
  const float v = fastloss::cuda::block_merge(x[threadIdx.x], partial, [](float& a, float b) { a += b; });
  if (threadIdx.x == 0) *out = v;
}

static int failures = 0;

template <typename F>
static void expect_raise(const char* what, const std::string& message, F&& launch) {
  try {
    launch();
  } catch (const std::exception& e) {
    if (std::string(e.what()).find(message) != std::string::npos) {
      std::printf("ok: %s: %s\n", what, e.what());
      return;
    }
    std::printf("FAIL: %s raised another error: %s\n", what, e.what());
    ++failures;
    return;
  }
  std::printf("FAIL: %s did not raise\n", what);
  ++failures;
}

template <typename F>
static void expect_ok(const char* what, F&& launch) {
  try {
    launch();
    std::printf("ok: %s\n", what);
  } catch (const std::exception& e) {
    std::printf("FAIL: %s raised: %s\n", what, e.what());
    ++failures;
  }
}

int main() {
  alignas(16) unsigned short x[8 * 40] = {}, out[8 * 40] = {};
  // (each launch on a line of its own: build.py rewrites a launch whose kernel name starts the line)
  expect_ok("aligned packs", [&] {
    copy_packs<<<1, 32>>>(x, out, 8);
  });
  expect_raise("a pack loaded 2 bytes past alignment", "misaligned address: a Pack", [&] {
    copy_packs<<<1, 32>>>(x, out, 1);
  });
  expect_raise("a pack stored 8 bytes past alignment", "misaligned address: a Pack", [&] {
    store_packs<<<1, 32>>>(out, 4);
  });
  expect_raise("__syncthreads after half the block returned", "__syncthreads in block (0) after thread 16", [] {
    barrier_after_return<<<1, 32>>>();
  });
  int lanes[64] = {};
  expect_raise("a shuffle reading lanes that returned", "which has returned", [&] {
    shuffle_after_return<<<1, 32>>>(lanes);
  });
  expect_raise("__syncthreads against a shuffle", "deadlock", [&] {
    barrier_against_shuffle<<<1, 32>>>(lanes);
  });
  expect_ok("a shuffle among the lanes left after the others returned", [&] {
    shuffle_among_the_lanes_left<<<1, 32>>>(lanes);
  });
  expect_ok("a shuffle after whole warps returned", [&] {
    whole_warps_return<<<1, 64>>>(lanes);
  });
  if (lanes[0] != 1 || lanes[31] != 30) {
    std::printf("FAIL: shuffle gave %d %d\n", lanes[0], lanes[31]);
    ++failures;
  }
  expect_raise("a shared address past the launch's dynamic shared memory", "outside the launch's dynamic shared", [] {
    shared_past_launch<<<1, 32, 1024>>>();
  });
  expect_raise("more dynamic shared memory than allowed", "dynamic shared memory above", [] {
    shared_past_launch<<<1, 32, 64 * 1024>>>();
  });
  uint4 packs[64], landed[32];
  for (unsigned i = 0; i < 64; ++i) packs[i].x = packs[i].y = packs[i].z = packs[i].w = i;
  expect_ok("a ring slot read after the wait that covers its copy", [&] {
    ring_read<<<1, 32, 1024>>>(packs, landed, 1, 0);
  });
  if (landed[5].x != 5) {
    std::printf("FAIL: the landed slot held %u\n", landed[5].x);
    ++failures;
  }
  expect_raise("a ring slot read while its cp.async is in flight", "cp.async in flight is still writing", [&] {
    ring_read<<<1, 32, 1024>>>(packs, landed, 1, 1);
  });
  expect_ok("every slot read after cp.async.wait_group 0", [&] {
    ring_read<<<1, 32, 1024>>>(packs, landed, 0, 1);
  });
  if (landed[5].x != 37) {
    std::printf("FAIL: the second slot held %u\n", landed[5].x);
    ++failures;
  }
  expect_raise("a thread returning with a cp.async in flight", "returned with cp.async copies in flight", [&] {
    return_with_copy_in_flight<<<1, 32, 512>>>(packs);
  });
  expect_ok("a launch within the kernel's __launch_bounds__", [&] {
    bounded_to_64<<<1, 64>>>(lanes);
  });
  expect_raise("a launch past the kernel's __launch_bounds__", "too many resources requested", [&] {
    bounded_to_64<<<1, 128>>>(lanes);
  });
  expect_raise("a grid of 65536 blocks in y", "bad launch configuration", [&] {
    bounded_to_64<<<dim3(1, 65536), 32>>>(lanes);
  });
  float slot = 0;
  expect_ok("a two-warp block writing both shared slots", [&] {
    read_slot_of_second_warp<<<1, 64>>>(&slot);
  });
  expect_ok("a one-warp block reading a shared slot it never wrote", [&] {
    read_slot_of_second_warp<<<1, 32>>>(&slot);
  });
  if (slot == slot) {  // undefined on a GPU: NaN here, not the previous block's 5 or a zero
    std::printf("FAIL: an unwritten __shared__ slot held %g, not NaN\n", slot);
    ++failures;
  }
  float v[256], sum = 0;
  for (int i = 0; i < 256; ++i) v[i] = float(i);
  expect_ok("a block merge", [&] {
    block_sum<<<1, 256>>>(v, &sum);
  });
  if (sum != 255.0f * 256.0f / 2) {
    std::printf("FAIL: block merge gave %g\n", sum);
    ++failures;
  }
  return failures == 0 ? 0 : 1;
}
