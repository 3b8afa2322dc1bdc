// Host-side tile loop of the contrastive ops, shared by the CPU and CUDA glue. Each block of query rows gets its
// raw dot products from one GEMM (at::mm: BLAS on CPU, cuBLAS on CUDA; fp32 stays fp32 unless the user enables
// TF32 globally), then a device epilogue (Backend) folds the block into the row and column statistics in one
// read of the tile (forward), or turns it into the gradient coefficients t_i G_ij (backward), from which two
// more GEMMs give dq and dk. fp16 / bf16 features on CUDA: the epilogue writes G once in the operands' dtype and
// dk accumulates in place in fp32 (addmm with an fp32 output). Memory: one (rows x M) tile (plus its fp16 / bf16
// copy of G in that backward) and O((N + M) d); the N x M matrix never exists.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "fastloss/contrastive.h"

// aten::mm.dtype (fp16/bf16 operands, fp32 output) exists from torch 2.9 on; older torch upcasts the features.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
#define FL_HAS_MM_DTYPE 1
#else
#define FL_HAS_MM_DTYPE 0
#endif
// aten::addmm.dtype_out with an fp32 `self` beside fp16/bf16 matrices (in-place fp32 accumulation) needs
// torch 2.10 (torch 2.9 wanted `self` in the matrices' dtype).
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
#define FL_HAS_ADDMM_DTYPE 1
#else
#define FL_HAS_ADDMM_DTYPE 0
#endif

namespace fastloss::contrastive {

struct Options {
  int64_t kind;
  bool symmetric, exclude_self, decoupled;
  double beta, eps;
  int64_t block_rows;
};

inline at::ScalarType acc_of(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

struct Inputs {
  at::Tensor q, k, scale, bias, positive, labels_q, labels_k;  // contiguous; scale/bias in the acc type
  int64_t N, M, d, rows;
  bool mixed;  // q, k kept in fp16/bf16, GEMMs with fp32 output (tensor cores); else q, k in the acc type

  // out (fp32 / fp64) = a @ b
  void gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) const {
#if FL_HAS_MM_DTYPE
    if (mixed) {
      at::mm_out(out, a, b, out.scalar_type());
      return;
    }
#endif
    at::mm_out(out, a, b);
  }
};

// Checks that keep a direct torch.ops call safe (the Python API names the user's arguments first).
inline Inputs prepare_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale,
                             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& positive,
                             const std::optional<at::Tensor>& labels_q, const std::optional<at::Tensor>& labels_k,
                             const Options& o, int64_t tile_elems, bool mixed_gemm, const char* op) {
  TORCH_CHECK(query.dim() == 2 && key.dim() == 2, op, ": query and key must be 2-D");
  TORCH_CHECK(query.size(1) == key.size(1), op, ": query and key widths differ");
  TORCH_CHECK(query.size(0) >= 1 && key.size(0) >= 1, op, ": query and key need at least one row");
  TORCH_CHECK(query.scalar_type() == key.scalar_type(), op, ": query and key dtypes differ");
  auto st = query.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": features must be float16, bfloat16, float32 or float64");
  TORCH_CHECK(o.kind >= kSoftmax && o.kind <= kSupCon, op, ": unknown kind ", o.kind);
  Inputs in;
  in.N = query.size(0);
  in.M = key.size(0);
  in.d = query.size(1);
  const auto acc = acc_of(query);
  in.mixed = FL_HAS_MM_DTYPE && mixed_gemm && (st == at::kHalf || st == at::kBFloat16);
  in.q = in.mixed ? query.contiguous() : query.to(acc).contiguous();
  in.k = in.mixed ? key.contiguous() : key.to(acc).contiguous();
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == in.N, op, ": scale must have shape (N,)");
  TORCH_CHECK(scale.device() == query.device() && key.device() == query.device(), op, ": tensors on other devices");
  in.scale = scale.to(acc).contiguous();
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == 1, op, ": bias must hold one value");
    in.bias = bias->to(acc).reshape({1}).contiguous();
  }
  if (o.kind == kSupCon) {
    TORCH_CHECK(labels_q.has_value() && labels_k.has_value(), op, ": SupCon needs labels");
    TORCH_CHECK(labels_q->dim() == 1 && labels_q->size(0) == in.N && labels_k->dim() == 1 &&
                    labels_k->size(0) == in.M, op, ": labels must have shapes (N,) and (M,)");
    in.labels_q = labels_q->to(at::kLong).contiguous();
    in.labels_k = labels_k->to(at::kLong).contiguous();
  } else {
    TORCH_CHECK(positive.has_value() && positive->dim() == 1 && positive->size(0) == in.N, op,
                ": positive must have shape (N,)");
    in.positive = positive->to(at::kLong).contiguous();
  }
  if (o.symmetric) {
    TORCH_CHECK(o.kind == kSoftmax && in.N == in.M && !o.exclude_self, op,
                ": symmetric needs the softmax loss, N == M, diagonal positives and no self exclusion");
  }
  in.rows = o.block_rows > 0 ? o.block_rows : std::max<int64_t>(16, tile_elems / std::max<int64_t>(in.M, 1));
  in.rows = std::min(in.rows, in.N);
  return in;
}

template <typename T>
TileArgs<T> base_args(const Inputs& in, const Options& o) {
  TileArgs<T> a{};
  a.N = in.N;
  a.M = in.M;
  a.scale = in.scale.data_ptr<T>();
  a.bias = in.bias.defined() ? in.bias.data_ptr<T>() : nullptr;
  a.positive = in.positive.defined() ? in.positive.data_ptr<int64_t>() : nullptr;
  a.labels_q = in.labels_q.defined() ? in.labels_q.data_ptr<int64_t>() : nullptr;
  a.labels_k = in.labels_k.defined() ? in.labels_k.data_ptr<int64_t>() : nullptr;
  a.p = Params<T>{T(o.beta), T(o.eps), o.decoupled};
  a.kind = int(o.kind);
  a.symmetric = o.symmetric;
  a.exclude_self = o.exclude_self;
  return a;
}

// Backend: static void check_positive(const Inputs&), fwd_tile<T>(TileArgs), finish_columns<T>(TileArgs),
// coefs<T>(kind, stats, grad, n, params, out, like), bwd_tile<T>(TileArgs), finish_backward(Inputs, dq);
// kTileElems (tile budget in elements); kMixedGemm (fp16/bf16 GEMMs with fp32 output: CUDA tensor cores; the
// CPU upcasts instead).
template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& positive, const std::optional<at::Tensor>& labels_q,
    const std::optional<at::Tensor>& labels_k, const Options& o) {
  Inputs in = prepare_inputs(query, key, scale, bias, positive, labels_q, labels_k, o, Backend::kTileElems,
                             Backend::kMixedGemm, "contrastive_fwd");
  Backend::check_positive(in);
  const auto opts = in.scale.options();
  at::Tensor row_loss = at::empty({in.N}, opts), row_stats = at::empty({in.N, kStats}, opts);
  at::Tensor col_loss = at::empty({o.symmetric ? in.M : 0}, opts);
  at::Tensor col_stats = at::zeros({o.symmetric ? in.M : 0, kStats}, opts);
  if (o.symmetric) col_stats.select(1, kM).fill_(-std::numeric_limits<double>::infinity());  // empty accumulators
  at::Tensor tile = at::empty({in.rows, in.M}, opts);
  AT_DISPATCH_FLOATING_TYPES(in.scale.scalar_type(), "contrastive_fwd", [&] {
    TileArgs<scalar_t> a = base_args<scalar_t>(in, o);
    a.row_stats = row_stats.data_ptr<scalar_t>();
    a.row_loss = row_loss.data_ptr<scalar_t>();
    a.col_stats = o.symmetric ? col_stats.data_ptr<scalar_t>() : nullptr;
    for (int64_t r0 = 0; r0 < in.N; r0 += in.rows) {
      const int64_t rb = std::min(in.rows, in.N - r0);
      at::Tensor t = tile.narrow(0, 0, rb);
      in.gemm(t, in.q.narrow(0, r0, rb), in.k.t());
      a.tile = t.data_ptr<scalar_t>();
      a.rows = rb;
      a.row0 = r0;
      Backend::template fwd_tile<scalar_t>(a);
    }
    if (o.symmetric) {
      a.row_loss = col_loss.data_ptr<scalar_t>();  // finish_columns writes the column losses here
      Backend::template finish_columns<scalar_t>(a);
    }
  });
  return {row_loss, col_loss, row_stats, col_stats};
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& scale, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& positive,
    const std::optional<at::Tensor>& labels_q, const std::optional<at::Tensor>& labels_k,
    const at::Tensor& row_stats, const at::Tensor& col_stats, const Options& o) {
  Inputs in = prepare_inputs(query, key, scale, bias, positive, labels_q, labels_k, o, Backend::kTileElems,
                             Backend::kMixedGemm, "contrastive_bwd");
  const auto acc = in.scale.scalar_type();
  const auto opts = in.scale.options();
  TORCH_CHECK(grad_row.numel() == in.N && row_stats.dim() == 2 && row_stats.size(0) == in.N &&
                  row_stats.size(1) == kStats, "contrastive_bwd: grad_row / row_stats have wrong shapes");
  if (o.symmetric) {
    TORCH_CHECK(grad_col.numel() == in.M && col_stats.dim() == 2 && col_stats.size(0) == in.M &&
                    col_stats.size(1) == kStats, "contrastive_bwd: grad_col / col_stats have wrong shapes");
  }
  at::Tensor rs = row_stats.to(acc).contiguous(), gr = grad_row.to(acc).contiguous();
  at::Tensor row_coef = at::empty({kCoefs, in.N}, opts);
  at::Tensor col_coef = at::empty({kCoefs, o.symmetric ? in.M : 0}, opts);
  at::Tensor dq = at::empty({in.N, in.d}, opts), dk = at::zeros({in.M, in.d}, opts);
  at::Tensor dscale = at::empty({in.N}, opts), dbias_rows = at::empty({in.N}, opts);
  at::Tensor tile = at::empty({in.rows, in.M}, opts);
  // Mixed GEMMs: the epilogue writes t_i G_ij once, in the operands' dtype, into this buffer (reused by every
  // block); fp32 / fp64 overwrite the tile in place.
  at::Tensor gbuf = in.mixed ? at::empty({in.rows, in.M}, in.q.options()) : at::Tensor();
#if !FL_HAS_ADDMM_DTYPE
  at::Tensor dk_blk = in.mixed ? at::empty({in.M, in.d}, opts) : at::Tensor();  // torch 2.9: no fp32 `self`
#endif
  AT_DISPATCH_FLOATING_TYPES(acc, "contrastive_bwd", [&] {
    TileArgs<scalar_t> a = base_args<scalar_t>(in, o);
    Backend::template coefs<scalar_t>(a.kind, rs.data_ptr<scalar_t>(), gr.data_ptr<scalar_t>(), in.N, a.p,
                                      row_coef.data_ptr<scalar_t>(), in.q);
    at::Tensor cs, gc;
    if (o.symmetric) {
      cs = col_stats.to(acc).contiguous();
      gc = grad_col.to(acc).contiguous();
      Backend::template coefs<scalar_t>(a.kind, cs.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), in.M, a.p,
                                        col_coef.data_ptr<scalar_t>(), in.q);
      a.col_coef = col_coef.data_ptr<scalar_t>();
    }
    a.row_coef = row_coef.data_ptr<scalar_t>();
    a.dscale = dscale.data_ptr<scalar_t>();
    a.dbias_rows = dbias_rows.data_ptr<scalar_t>();
    a.grad_kind = !in.mixed ? kGradInPlace : (in.q.scalar_type() == at::kHalf ? kGradHalf : kGradBFloat16);
    for (int64_t r0 = 0; r0 < in.N; r0 += in.rows) {
      const int64_t rb = std::min(in.rows, in.N - r0);
      at::Tensor t = tile.narrow(0, 0, rb);
      in.gemm(t, in.q.narrow(0, r0, rb), in.k.t());
      a.tile = t.data_ptr<scalar_t>();
      a.grad_out = in.mixed ? gbuf.data_ptr() : static_cast<void*>(a.tile);
      a.rows = rb;
      a.row0 = r0;
      Backend::template bwd_tile<scalar_t>(a);  // t_i * G_ij (dq = that @ K, dk += its transpose @ Q)
      at::Tensor dq_blk = dq.narrow(0, r0, rb), q_blk = in.q.narrow(0, r0, rb);
      if (in.mixed) {  // fp16/bf16 operands, fp32 accumulation and output
        at::Tensor g = gbuf.narrow(0, 0, rb);
        in.gemm(dq_blk, g, in.k);
#if FL_HAS_ADDMM_DTYPE
        at::addmm_out(dk, dk, g.t(), q_blk, at::kFloat, 1, 1);
#else
        in.gemm(dk_blk, g.t(), q_blk);
        dk.add_(dk_blk);
#endif
      } else {
        at::mm_out(dq_blk, t, in.k);
        dk.addmm_(t.t(), q_blk);
      }
    }
  });
  Backend::finish_backward(in, dq);
  at::Tensor dbias = dbias_rows.sum();
  return {dq.to(query.scalar_type()), dk.to(key.scalar_type()), dscale, dbias};
}

}  // namespace fastloss::contrastive
