// The contrastive engine's fused GEMMs for sm_90 (csrc/cuda/contrastive_sm90.cu, built with CUTLASS for sm_90a
// only): S = Q_block Kᵀ on the tensor cores (TMA + wgmma, persistent ping-pong warp groups, fp32 accumulation),
// with an epilogue that consumes each 128 x 128 tile of S on chip instead of storing it:
//   kFold     the forward: partial row and column records of the softmax without HCL (fold_line);
//   kGrad     the backward: t_i G_ij written once in the operands' dtype (the dq / dk GEMM operand), and partial
//             sums of d scale and d bias per row and tile;
//   kGradFwd  SigLIP's one-pass gradient: kGrad plus the partial forward record (a sigmoid lane needs no row
//             statistic).
// Partials have one slot per (row or column, tile), merged in a fixed order by the caller: deterministic (the
// grouping of the CUDA row merges differs from the CPU twin's sequential one, so the two agree to rounding).
// Torch-free on purpose: CUTLASS and the torch headers want different half-precision macros.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "fastloss/contrastive.h"

namespace fastloss::contrastive::sm90 {

constexpr int kTileM = kFusedTileM, kTileN = kFusedTileN;  // one epilogue tile of S: 128 query rows x 128 keys

enum class Epi : int { kFold = 0, kGrad = 1, kGradFwd = 2 };

struct Operands {
  const void* q;  // this block's query rows (a.rows, d), row-major, fp16 / bf16
  const void* k;  // (a.M, d), the same dtype
  bool bf16;      // else fp16
  int64_t d;
};

// The block is a.row0 .. a.row0 + a.rows (TileArgs as the unfused epilogues get it; a.tile unused; kGrad*
// write a.grad_out in the operands' dtype). row_part: (ceil(M / kTileN), a.rows, kLineStats or kGradPart);
// col_part: (ceil(a.rows / kTileM), M, kLineStats), kFold with a.symmetric only.
struct Problem {
  Operands x;
  TileArgs<float> a;
  float* row_part;
  float* col_part;
};

// False when this build or CUTLASS cannot take the problem (d % 8, 16-byte operand addresses, sizes past int32);
// checked before anything runs, so the caller can take the unfused path.
bool supported(const Operands& x, int64_t rows, int64_t M);
// Scratch bytes the GEMM wants for `rows` x M (0 for this schedule; asked anyway).
size_t workspace_bytes(Epi e, const Problem& p, int sm_count);
// Runs one block; false only if CUTLASS refused to launch (after supported() said yes: an error).
bool run(Epi e, const Problem& p, void* workspace, int sm_count, cudaStream_t stream);

}  // namespace fastloss::contrastive::sm90
