// Fused GEMMs of the contrastive engine on sm_90a (see contrastive_sm90.h). CUTLASS supplies the GEMM (TMA loads,
// wgmma, a persistent ping-pong kernel: while one math warp group runs its epilogue, the other multiplies the next
// tile), and this file supplies the epilogue that replaces "store D". Each 128 x 128 accumulator tile goes to
// shared memory once (CuTe's own partition of C gives every register's row and column), then thread r works on
// row r and thread c on column c with the torch-free maths of fastloss/contrastive.h, the same as the unfused CUDA
// epilogues. The tile of S never reaches global memory: the unfused path writes it in fp32 and reads it back once
// or twice, which costs about as much as the GEMM itself at d = 768.
#include "contrastive_sm90.h"

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/bfloat16.h>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/detail.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/half.h>
#include <cutlass/util/packed_stride.hpp>

namespace fastloss::contrastive::sm90 {
namespace {

using namespace cute;

// Row stride of the staged tile, in floats. Odd, so thread r walking row r and thread c walking column c are both
// free of bank conflicts; = 5 mod 32, so the accumulator stores (8 rows x 4 column pairs per warp instruction in
// the wgmma layout) collide at most 2-way (1 mod 32 would give 4-way). Column kTileN of row r holds t_r.
constexpr int kLd = kTileN + 5;
constexpr int kScaleCol = kTileN;

// An operator-style collective epilogue (the interface of CUTLASS's DefaultEpilogue), wrapped by
// Sm90TmaWarpSpecializedAdapter for the warp-specialised kernel. O: the operands' element type (G's dtype).
template <Epi E, typename O>
class TileEpilogue {
 public:
  using ElementC = float;
  using ElementD = float;
  using StrideC = Stride<int64_t, _1, int64_t>;
  using StrideD = StrideC;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  using ThreadEpilogueOp = void;  // named by GemmUniversalAdapter only

  struct SharedStorage {
    float tile[kTileM * kLd];  // raw products, then (backward) t_i G_ij; t_r in column kScaleCol
  };
  using TensorStorage = SharedStorage;
  using Arguments = Problem;
  using Params = Problem;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const&) {
    return true;
  }

  CUTLASS_HOST_DEVICE explicit TileEpilogue(Params const& p) : prob(p) {}  // the adapter passes the params only

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL, BlockShapeMNK blk_shape_MNK, BlockCoordMNKL blk_coord_mnkl,
                                 cute::Tensor<FrgEngine, FrgLayout> const& accumulators, TiledMma tiled_mma,
                                 ResidueMNK, int thread_idx, char* smem_buf) {
    static_assert(size<0>(BlockShapeMNK{}) == kTileM && size<1>(BlockShapeMNK{}) == kTileN, "tile shape");
    static_assert(size(TiledMma{}) == kTileM, "one warp group (128 threads) per tile: thread r takes row r");
    SharedStorage& sm = *reinterpret_cast<SharedStorage*>(smem_buf);
    const TileArgs<float>& a = prob.a;
    const int64_t mt = get<0>(blk_coord_mnkl), nt = get<1>(blk_coord_mnkl);
    const int64_t tile_r0 = mt * kTileM, tile_c0 = nt * kTileN;
    const int rows_here = int(min(int64_t(kTileM), a.rows - tile_r0));
    const int cols_here = int(min(int64_t(kTileN), a.M - tile_c0));
    const int t = thread_idx;

    auto thr_mma = tiled_mma.get_thread_slice(thread_idx);
    Tensor coord = thr_mma.partition_C(make_identity_tensor(take<0, 2>(blk_shape_MNK)));
    CUTE_STATIC_ASSERT_V(size(coord) == size(accumulators));
    CUTLASS_PRAGMA_UNROLL
    for (int v = 0; v < size(accumulators); ++v) sm.tile[get<0>(coord(v)) * kLd + get<1>(coord(v))] = accumulators(v);
    sm.tile[t * kLd + kScaleCol] = t < rows_here ? a.scale[a.row0 + tile_r0 + t] : 0.0f;
    // The two math warp groups take turns in the epilogue (the kernel's order barrier), so one buffer serves both;
    // this barrier joins the 128 threads of the group that is here now (ids past CUTLASS's reserved ones).
    const cutlass::arch::NamedBarrier group(kTileM, cutlass::canonical_warp_group_idx());
    group.arrive_and_wait();

    if constexpr (E == Epi::kFold) {
      const float b = a.bias_value();
      if (t < rows_here) {  // row t: its positive is key positive[i] (maybe in another tile)
        const int64_t i = a.row0 + tile_r0 + t, p = a.positive_of(i), self = a.self_lane(i, p);
        const float ti = sm.tile[t * kLd + kScaleCol];
        const Acc<float> acc = fold_line<true>(&sm.tile[t * kLd], 1, cols_here, [ti](int) { return ti; }, b,
                                               p - tile_c0, self >= 0 ? self - tile_c0 : -1);
        store_line(acc, prob.row_part + (nt * a.rows + tile_r0 + t) * kLineStats);
      }
      if (a.symmetric && t < cols_here) {  // column t: its positive is the row with the same global index
        const int64_t j = tile_c0 + t;
        const Acc<float> acc = fold_line<true>(&sm.tile[t], kLd, rows_here,
                                               [&sm](int r) { return sm.tile[r * kLd + kScaleCol]; }, b,
                                               j - (a.row0 + tile_r0));
        store_line(acc, prob.col_part + (mt * a.M + j) * kLineStats);
      }
    } else {
      if (t < rows_here)  // row t: t_i G_ij in place of its raw products, and its partial sums
        grad_line<true, E == Epi::kGradFwd>(&sm.tile[t * kLd], cols_here, tile_c0, a.row0 + tile_r0 + t,
                                            sm.tile[t * kLd + kScaleCol], a,
                                            prob.row_part + (nt * a.rows + tile_r0 + t) * kGradPart);
      group.arrive_and_wait();  // every row's t_i G_ij is in shared memory: write them out, a row per step
      if (t < cols_here) {
        O* out = static_cast<O*>(a.grad_out) + tile_r0 * a.M + tile_c0 + t;
        for (int r = 0; r < rows_here; ++r) out[r * a.M] = O(sm.tile[r * kLd + t]);
      }
    }
  }

 private:
  Params prob;
};

template <Epi E, typename Element>
struct TileGemm {
  using LayoutA = cutlass::layout::RowMajor;     // Q block (rows, d): K-major
  using LayoutB = cutlass::layout::ColumnMajor;  // K (M, d) row-major is B (d, M) column-major: K-major too
  static constexpr int kAlign = 16 / sizeof(Element);
  using TileShape = Shape<Int<kTileM>, Int<kTileN>, _64>;
  using ClusterShape = Shape<_1, _1, _1>;
  using Epilogue = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<TileEpilogue<E, Element>>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element, LayoutB, kAlign,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename TileEpilogue<E, Element>::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedPingpong>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  static_assert(sizeof(typename Kernel::SharedStorage) <= 232448, "over the sm_90 shared memory per block");

  static typename Gemm::Arguments arguments(const Problem& p, int sm_count) {
    using StrideA = typename Gemm::GemmKernel::StrideA;
    using StrideB = typename Gemm::GemmKernel::StrideB;
    const int m = int(p.a.rows), n = int(p.a.M), k = int(p.x.d);
    cutlass::KernelHardwareInfo hw;
    hw.sm_count = sm_count;
    return {cutlass::gemm::GemmUniversalMode::kGemm,
            {m, n, k, 1},
            {static_cast<const Element*>(p.x.q), cutlass::make_cute_packed_stride(StrideA{}, {m, k, 1}),
             static_cast<const Element*>(p.x.k), cutlass::make_cute_packed_stride(StrideB{}, {n, k, 1})},
            p,
            hw};
  }

  static size_t workspace(const Problem& p, int sm_count) {
    return Gemm::get_workspace_size(arguments(p, sm_count));
  }

  static bool run(const Problem& p, void* workspace, int sm_count, cudaStream_t stream) {
    Gemm gemm;
    const auto args = arguments(p, sm_count);
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return false;
    if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return false;
    return gemm.run(stream) == cutlass::Status::kSuccess;
  }
};

// f(TileGemm<E, Element>{}) for the run-time (epilogue, dtype) pair.
template <typename F>
auto dispatch(Epi e, bool bf16, F&& f) {
  using BF = cutlass::bfloat16_t;
  using H = cutlass::half_t;
  switch (e) {
    case Epi::kFold:
      return bf16 ? f(TileGemm<Epi::kFold, BF>{}) : f(TileGemm<Epi::kFold, H>{});
    case Epi::kGrad:
      return bf16 ? f(TileGemm<Epi::kGrad, BF>{}) : f(TileGemm<Epi::kGrad, H>{});
    default:
      return bf16 ? f(TileGemm<Epi::kGradFwd, BF>{}) : f(TileGemm<Epi::kGradFwd, H>{});
  }
}

}  // namespace

bool supported(const Operands& x, int64_t rows, int64_t M) {
  // d >= 8: with K = 0 the producer issues no loads and the consumers would wait forever (NDEBUG: no CUTLASS assert)
  return x.q && x.k && x.d >= 8 && x.d % 8 == 0 && rows >= 1 && M >= 1 && rows <= INT32_MAX && M <= INT32_MAX &&
         x.d <= INT32_MAX && reinterpret_cast<uintptr_t>(x.q) % 16 == 0 && reinterpret_cast<uintptr_t>(x.k) % 16 == 0;
}

size_t workspace_bytes(Epi e, const Problem& p, int sm_count) {
  return dispatch(e, p.x.bf16, [&](auto g) { return decltype(g)::workspace(p, sm_count); });
}

bool run(Epi e, const Problem& p, void* workspace, int sm_count, cudaStream_t stream) {
  if (!supported(p.x, p.a.rows, p.a.M)) return false;
  return dispatch(e, p.x.bf16, [&](auto g) { return decltype(g)::run(p, workspace, sm_count, stream); });
}

}  // namespace fastloss::contrastive::sm90
