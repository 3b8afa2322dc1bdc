// Host check of the fused sm_90 GEMMs' epilogue placement (csrc/cuda/contrastive_sm90.cu): every accumulator
// register of the 128 threads of a math warp group, placed in shared memory at CuTe's partition_C coordinates,
// must cover the 128 x 128 tile exactly once (no cell written twice, none left stale), for each epilogue and
// dtype's TiledMma; and the staging's row stride keeps shared-memory bank conflicts within what its comment says. CuTe's layout algebra runs on the host: no GPU needed. Built with nvcc and the CUTLASS headers
// and run by tests/test_headers.py.
#include <algorithm>
#include <cstdio>
#include <vector>

#include "../../csrc/cuda/contrastive_sm90.cu"

using namespace fastloss::contrastive::sm90;

template <Epi E, typename Element>
int check(const char* name) {
  using namespace cute;
  typename TileGemm<E, Element>::Mainloop::TiledMma tiled_mma;
  const auto shape = make_shape(Int<kTileM>{}, Int<kTileN>{});
  std::vector<int> hits(kTileM * kTileN, 0);
  int values = 0;
  for (int t = 0; t < int(size(tiled_mma)); ++t) {
    Tensor coord = tiled_mma.get_thread_slice(t).partition_C(make_identity_tensor(shape));
    values += int(size(coord));
    for (int v = 0; v < int(size(coord)); ++v) hits[get<0>(coord(v)) * kTileN + get<1>(coord(v))] += 1;
  }
  int bad = 0;
  for (int h : hits) bad += h != 1;
  // Shared-memory banks of the staging stores (kLd): for each register, the 32 lanes of each warp may share a
  // bank at most 2-way (the wgmma layout puts 8 rows x 4 column pairs in one warp instruction); the row walk
  // (lane = row, one column) and the column walk (lane = column) must be conflict-free.
  int worst_store = 0;
  for (int w = 0; w < int(size(tiled_mma)) / 32; ++w)
    for (int v = 0; v < int(size(partition_fragment_C(tiled_mma, shape))); ++v) {
      int per_bank[32] = {};
      for (int l = 0; l < 32; ++l) {
        Tensor coord = tiled_mma.get_thread_slice(32 * w + l).partition_C(make_identity_tensor(shape));
        per_bank[(get<0>(coord(v)) * kLd + get<1>(coord(v))) % 32] += 1;
      }
      for (int k = 0; k < 32; ++k) worst_store = std::max(worst_store, per_bank[k]);
    }
  int worst_walk = 0;
  for (int c = 0; c < kTileN; ++c)
    for (int w = 0; w < kTileM / 32; ++w) {
      int row_walk[32] = {}, col_walk[32] = {};
      for (int l = 0; l < 32; ++l) {
        row_walk[((32 * w + l) * kLd + c) % 32] += 1;  // thread r = 32w + l reads (r, c)
        col_walk[(c * kLd + 32 * w + l) % 32] += 1;    // thread c' = 32w + l reads (c, c')
      }
      for (int k = 0; k < 32; ++k) worst_walk = std::max({worst_walk, row_walk[k], col_walk[k]});
    }
  if (worst_store > 2 || worst_walk > 1) {
    std::printf("FAIL %s: staging stores up to %d-way, row / column walks up to %d-way bank conflicts\n", name,
                worst_store, worst_walk);
    bad += 1;
  }
  const bool ok = int(size(tiled_mma)) == kTileM && values == kTileM * kTileN && bad == 0 &&
                  int(size(partition_fragment_C(tiled_mma, shape))) * kTileM == kTileM * kTileN;
  if (!ok) std::printf("FAIL %s: %d threads, %d values, %d cells not hit exactly once\n", name, int(size(tiled_mma)),
                       values, bad);
  return ok ? 0 : 1;
}

int main() {
  const int fails = check<Epi::kFold, cutlass::bfloat16_t>("fold bf16") + check<Epi::kFold, cutlass::half_t>("fold fp16") +
                    check<Epi::kGrad, cutlass::bfloat16_t>("grad bf16") +
                    check<Epi::kGradFwd, cutlass::half_t>("grad_fwd fp16");
  std::printf(fails ? "%d failures\n" : "ok\n", fails);
  return fails ? 1 : 0;
}
