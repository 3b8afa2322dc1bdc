// Host-side tile loop of the contrastive ops, shared by the CPU and CUDA glue. Each block of query rows gets its
// raw dot products from one GEMM (at::mm: BLAS on CPU, cuBLAS on CUDA; fp32 stays fp32 unless the user enables
// TF32 globally), then a device epilogue (Backend) folds the block into the row and column statistics in one
// read of the tile (forward), or turns it into the gradient coefficients t_i G_ij (backward), from which two
// more GEMMs give dq and dk. fp16 / bf16 features on CUDA: the epilogue writes G once in the operands' dtype and
// dk accumulates in place in fp32 (addmm with an fp32 output). Memory: one (rows x M) tile (plus its fp16 / bf16
// copy of G in that backward) and O((N + M) d); the N x M matrix never exists.
// Gradient passes skip the dq or dk GEMM of a side that needs no gradient (Options::query_grad / key_grad; that
// output is then (0, d)): a frozen tower, or a queue of keys, costs 2 GEMMs per tile instead of 3.
// forward_grad: a row-wise loss (not symmetric) has every row's record complete once its block is done, so the
// forward can produce the gradient of sum_i L_i from the same tile: 3 GEMMs per block instead of the 4 of a
// forward plus a recomputing backward (autograd then scales it by the upstream scalar).
// Fused GEMMs (Backend::fused, opt-in): a backend may instead run a block's GEMM with an epilogue that consumes the
// tile on chip (CUDA sm_90: csrc/cuda/contrastive_sm90.cu); no (rows x M) tile of S is allocated then.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/ceil.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/exp2.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/log2.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
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
  bool query_grad = true, key_grad = true;  // gradient passes: skip the dq / dk GEMMs of a frozen side
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
  TORCH_CHECK(query.size(0) >= 1 && key.size(0) >= 1 && query.size(1) >= 1, op,
              ": query and key need at least one row and one column");
  TORCH_CHECK(query.scalar_type() == key.scalar_type(), op, ": query and key dtypes differ");
  auto st = query.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": features must be float16, bfloat16, float32 or float64");
  TORCH_CHECK(o.kind >= kSoftmax && o.kind <= kSupCon, op, ": unknown kind ", o.kind);
  TORCH_CHECK(o.beta >= 0 && std::isfinite(o.beta) && o.eps >= 0 && o.eps <= 1, op,
              ": beta must be finite and >= 0, eps in [0, 1]");
  TORCH_CHECK(o.kind == kSoftmax || (o.beta == 0 && o.eps == 0 && !o.decoupled), op,
              ": beta, eps and decoupled apply to the softmax kind only");
  // every tensor a kernel reads on the features' device (a host pointer in a CUDA kernel is an illegal address)
  for (const auto* t : {&key, &scale, bias.has_value() ? &*bias : nullptr, positive.has_value() ? &*positive : nullptr,
                        labels_q.has_value() ? &*labels_q : nullptr, labels_k.has_value() ? &*labels_k : nullptr}) {
    TORCH_CHECK(t == nullptr || !t->defined() || t->device() == query.device(), op,
                ": every tensor must be on the features' device (", query.device(), ")");
  }
  Inputs in;
  in.N = query.size(0);
  in.M = key.size(0);
  in.d = query.size(1);
  const auto acc = acc_of(query);
  in.mixed = FL_HAS_MM_DTYPE && mixed_gemm && (st == at::kHalf || st == at::kBFloat16);
  in.q = in.mixed ? query.contiguous() : query.to(acc).contiguous();
  in.k = in.mixed ? key.contiguous() : key.to(acc).contiguous();
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == in.N, op, ": scale must have shape (N,)");
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
  if (acc == at::kDouble) tile_elems /= 2;  // the budget is in fp32 elements (bytes / 4)
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
  a.fast_exp = in.mixed;
  return a;
}

// Backend: static void check_positive(const Inputs&), fused<T>(Inputs, TileArgs, Fused) (whether it offers that
// fused GEMM for this problem; decided once per call) and fused_block<T>(Inputs, TileArgs, Fused) (one block),
// fwd_tile<T>(TileArgs), finish_columns<T>(TileArgs),
// coefs<T>(kind, stats, grad, n, params, out, ld) (out[k * ld + i], i < n), bwd_tile<T>(TileArgs),
// fwd_grad_tile<T>(TileArgs) (fwd_tile, then the coefficients of the block's rows for a unit upstream gradient,
// then bwd_tile), finish_backward(Inputs, dq); kTileElems (tile budget in elements); kMixedGemm (fp16/bf16
// GEMMs with fp32 output: CUDA tensor cores; the CPU upcasts instead).

// Fused GEMMs a backend may offer (Backend::fused / fused_block): the tile's GEMM with an epilogue that consumes
// the tile on chip. kFold: the forward's records (softmax); kGrad: t_i G_ij and the d scale / d bias sums of a
// block whose row coefficients are known; kGradFwd: kGrad plus the forward record (sigmoid: no row statistic
// needed first).
enum class Fused { kFold, kGrad, kGradFwd };

// The fused GEMMs are opt-in until a GPU run has verified them: FASTLOSS_CONTRASTIVE_FUSED=1 (read per call). On
// CPU the same variable runs their twin (the same tiles, partials and merges, for tests).
inline bool fused_gemm_wanted() {
  const char* env = std::getenv("FASTLOSS_CONTRASTIVE_FUSED");
  return env != nullptr && std::strcmp(env, "1") == 0;
}

// Which problems the fused GEMMs take (both backends): not SupCon (labels per lane); the forward fold only the
// softmax without HCL (one exp sum per record); the one-pass kGradFwd only the sigmoid loss.
template <typename T>
bool fused_kind_ok(const TileArgs<T>& a, Fused f) {
  if (a.kind == kSupCon) return false;
  if (f == Fused::kFold) return a.kind == kSoftmax && !a.p.hcl();
  if (f == Fused::kGradFwd) return a.kind == kSigmoid;
  return true;
}

// Visits the blocks of query rows [r0, r0 + rb): step(a) with a.row0 / a.rows set.
template <typename T, typename Step>
void for_each_block(const Inputs& in, TileArgs<T>& a, Step&& step) {
  for (int64_t r0 = 0; r0 < in.N; r0 += in.rows) {
    a.rows = std::min(in.rows, in.N - r0);
    a.row0 = r0;
    step(a);
  }
}

// The raw dot products of a's block into `tile` (rows x M), pointed to by a.tile.
template <typename T>
void gemm_block(const Inputs& in, at::Tensor& tile, TileArgs<T>& a) {
  at::Tensor t = tile.narrow(0, 0, a.rows);
  in.gemm(t, in.q.narrow(0, a.row0, a.rows), in.k.t());
  a.tile = t.data_ptr<T>();
}

// Gradient outputs and the per-block buffers of a pass that turns tiles into t_i G_ij (backward, forward_grad).
struct GradWork {
  at::Tensor dq, dk, dscale, dbias_rows;
  at::Tensor tile;  // the fp32 / fp64 tile, allocated by tile_buffer() when a block is not fused
  at::Tensor gbuf;  // mixed GEMMs: t_i G_ij in the operands' dtype (fp32 / fp64 overwrite the tile in place)
#if !FL_HAS_ADDMM_DTYPE
  at::Tensor dk_blk;  // torch 2.9: no fp32 `self` beside fp16 / bf16 matrices
#endif

  bool want_dq, want_dk;  // a side without a gradient (a frozen tower, a key queue) skips its GEMM: (0, d)

  GradWork(const Inputs& in, const Options& o) : want_dq(o.query_grad), want_dk(o.key_grad) {
    const auto opts = in.scale.options();
    dq = at::empty({want_dq ? in.N : 0, in.d}, opts);
    dk = at::zeros({want_dk ? in.M : 0, in.d}, opts);
    dscale = at::empty({in.N}, opts);
    dbias_rows = at::empty({in.N}, opts);
    if (in.mixed) gbuf = at::empty({in.rows, in.M}, in.q.options());
#if !FL_HAS_ADDMM_DTYPE
    if (in.mixed && want_dk) dk_blk = at::empty({in.M, in.d}, opts);
#endif
  }

  at::Tensor& tile_buffer(const Inputs& in) {
    if (!tile.defined()) tile = at::empty({in.rows, in.M}, in.scale.options());
    return tile;
  }

  template <typename T>
  void bind(const Inputs& in, TileArgs<T>& a) {
    a.dscale = dscale.data_ptr<T>();
    a.dbias_rows = dbias_rows.data_ptr<T>();
    a.grad_kind = !in.mixed ? kGradInPlace : (in.q.scalar_type() == at::kHalf ? kGradHalf : kGradBFloat16);
  }

  template <typename T>
  void point_grad_out(const Inputs& in, TileArgs<T>& a) {
    a.grad_out = in.mixed ? gbuf.data_ptr() : static_cast<void*>(a.tile);
  }

  // An unfused block: its S into the tile, and G's destination (the tile itself, or the fp16 / bf16 buffer).
  template <typename T>
  void gemm_tile(const Inputs& in, TileArgs<T>& a) {
    gemm_block(in, tile_buffer(in), a);
    point_grad_out(in, a);
  }

  // A fused block writes t_i G_ij where the GEMMs below read it: the fp16 / bf16 buffer, or (fp32 / fp64 features,
  // the CPU twin) the tile, whose S the fused block computes itself.
  template <typename T>
  void point_fused_grad_out(const Inputs& in, TileArgs<T>& a) {
    if (!in.mixed) a.tile = tile_buffer(in).template data_ptr<T>();
    point_grad_out(in, a);
  }

  // After the epilogue wrote t_i G_ij of the block: its dq rows = G K, and dk += Gᵀ Q_block.
  void gemms(const Inputs& in, int64_t r0, int64_t rb) {
    at::Tensor q_blk = in.q.narrow(0, r0, rb);
    if (in.mixed) {  // fp16/bf16 operands, fp32 accumulation and output
      at::Tensor g = gbuf.narrow(0, 0, rb);
      if (want_dq) {
        at::Tensor dq_blk = dq.narrow(0, r0, rb);
        in.gemm(dq_blk, g, in.k);
      }
      if (want_dk) {
#if FL_HAS_ADDMM_DTYPE
        at::addmm_out(dk, dk, g.t(), q_blk, at::kFloat, 1, 1);
#else
        in.gemm(dk_blk, g.t(), q_blk);
        dk.add_(dk_blk);
#endif
      }
    } else {
      at::Tensor t = tile.narrow(0, 0, rb);
      if (want_dq) {
        at::Tensor dq_blk = dq.narrow(0, r0, rb);
        at::mm_out(dq_blk, t, in.k);
      }
      if (want_dk) dk.addmm_(t.t(), q_blk);
    }
  }
};

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
  AT_DISPATCH_FLOATING_TYPES(in.scale.scalar_type(), "contrastive_fwd", [&] {
    TileArgs<scalar_t> a = base_args<scalar_t>(in, o);
    a.row_stats = row_stats.data_ptr<scalar_t>();
    a.row_loss = row_loss.data_ptr<scalar_t>();
    a.col_stats = o.symmetric ? col_stats.data_ptr<scalar_t>() : nullptr;
    const bool fused = Backend::template fused<scalar_t>(in, a, Fused::kFold);
    at::Tensor tile = fused ? at::Tensor() : at::empty({in.rows, in.M}, opts);
    for_each_block(in, a, [&](TileArgs<scalar_t>& b) {
      if (fused) {
        Backend::template fused_block<scalar_t>(in, b, Fused::kFold);
      } else {
        gemm_block(in, tile, b);
        Backend::template fwd_tile<scalar_t>(b);
      }
    });
    if (o.symmetric) {
      a.row_loss = col_loss.data_ptr<scalar_t>();  // finish_columns writes the column losses here
      Backend::template finish_columns<scalar_t>(a);
    }
  });
  return {row_loss, col_loss, row_stats, col_stats};
}

// The forward of a row-wise loss together with the gradient of total = sum_i L_i (grad_query, grad_key and
// grad_scale (N,) in the accumulation type, grad_bias ()), from one GEMM of each tile: every row of a block
// is complete once the block is folded, so its coefficients follow at once and the same tile gives G.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_grad(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& positive, const std::optional<at::Tensor>& labels_q,
    const std::optional<at::Tensor>& labels_k, const Options& o) {
  TORCH_CHECK(!o.symmetric, "contrastive_fwd_grad: symmetric losses need every row before any column is done; "
              "use contrastive_fwd");
  Inputs in = prepare_inputs(query, key, scale, bias, positive, labels_q, labels_k, o, Backend::kTileElems,
                             Backend::kMixedGemm, "contrastive_fwd_grad");
  Backend::check_positive(in);
  const auto opts = in.scale.options();
  at::Tensor row_loss = at::empty({in.N}, opts), row_stats = at::empty({in.N, kStats}, opts);
  at::Tensor row_coef = at::empty({kCoefs, in.N}, opts);
  GradWork w(in, o);
  AT_DISPATCH_FLOATING_TYPES(in.scale.scalar_type(), "contrastive_fwd_grad", [&] {
    TileArgs<scalar_t> a = base_args<scalar_t>(in, o);
    a.row_stats = row_stats.data_ptr<scalar_t>();
    a.row_loss = row_loss.data_ptr<scalar_t>();
    a.row_coef = row_coef.data_ptr<scalar_t>();
    w.bind(in, a);
    // fused: SigLIP in one GEMM (kGradFwd); the softmax kinds fold the block (kFold), derive its rows'
    // coefficients, and run the GEMM again for G (kGrad): 4 GEMMs, no fp32 tile in memory
    const bool sig = o.kind == kSigmoid;
    const bool fused = sig ? Backend::template fused<scalar_t>(in, a, Fused::kGradFwd)
                           : Backend::template fused<scalar_t>(in, a, Fused::kFold) &&
                                 Backend::template fused<scalar_t>(in, a, Fused::kGrad);
    for_each_block(in, a, [&](TileArgs<scalar_t>& b) {
      if (fused && sig) {
        w.point_fused_grad_out(in, b);
        Backend::template fused_block<scalar_t>(in, b, Fused::kGradFwd);
      } else if (fused) {
        w.point_fused_grad_out(in, b);
        Backend::template fused_block<scalar_t>(in, b, Fused::kFold);
        Backend::template coefs<scalar_t>(b.kind, b.row_stats + b.row0 * kStats, nullptr, b.rows, b.p,
                                          b.row_coef + b.row0, b.N);
        Backend::template fused_block<scalar_t>(in, b, Fused::kGrad);
      } else {
        w.gemm_tile(in, b);
        Backend::template fwd_grad_tile<scalar_t>(b);
      }
      w.gemms(in, b.row0, b.rows);
    });
  });
  Backend::finish_backward(in, w.dq);
  return {row_loss.sum(), row_loss, row_stats, w.dq, w.dk, w.dscale, w.dbias_rows.sum()};
}

// The power of two nearest above the largest |upstream gradient| (a 0-dim tensor; 1 when that is 0 or not finite),
// computed on the device (no host sync). The backward works with g / unit, so that t_i G_ij keeps its size
// whatever the reduction: a mean over N = 65536 rows makes g ~ 1e-5, and t_i G_ij of a typical negative lane
// ~ 1e-9, below fp16's smallest subnormal, in the fp16 copy of G that the dq / dk GEMMs read. Dividing by a
// power of two is exact, so the results scaled back by `unit` are those of the unscaled maths.
inline at::Tensor upstream_unit(const at::Tensor& grad_row, const at::Tensor& grad_col) {
  at::Tensor big = grad_row.abs().amax();
  if (grad_col.defined() && grad_col.numel() > 0) big = at::maximum(big, grad_col.abs().amax());
  const at::Tensor e = at::ceil(at::log2(big)).clamp(-100, 100);  // fp32's range keeps 2^±100 and 1/2^100
  const at::Tensor ok = at::isfinite(big).logical_and(big.gt(0));
  return at::where(ok, at::exp2(e), at::ones_like(big));
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_row, const at::Tensor& grad_col, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& scale, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& positive,
    const std::optional<at::Tensor>& labels_q, const std::optional<at::Tensor>& labels_k,
    const at::Tensor& row_stats, const at::Tensor& col_stats, const Options& o) {
  Inputs in = prepare_inputs(query, key, scale, bias, positive, labels_q, labels_k, o, Backend::kTileElems,
                             Backend::kMixedGemm, "contrastive_bwd");
  Backend::check_positive(in);  // as in the forward: the op may be called directly, with any positives
  const auto acc = in.scale.scalar_type();
  const auto opts = in.scale.options();
  TORCH_CHECK(grad_row.numel() == in.N && row_stats.dim() == 2 && row_stats.size(0) == in.N &&
                  row_stats.size(1) == kStats, "contrastive_bwd: grad_row / row_stats have wrong shapes");
  if (o.symmetric) {
    TORCH_CHECK(grad_col.numel() == in.M && col_stats.dim() == 2 && col_stats.size(0) == in.M &&
                    col_stats.size(1) == kStats, "contrastive_bwd: grad_col / col_stats have wrong shapes");
  }
  at::Tensor rs = row_stats.to(acc).contiguous(), gr = grad_row.to(acc).contiguous();
  at::Tensor gc = o.symmetric ? grad_col.to(acc).contiguous() : at::Tensor();
  const at::Tensor unit = upstream_unit(gr, gc);  // g / unit, and the results * unit: exact
  gr = gr.div(unit);
  if (o.symmetric) gc = gc.div(unit);
  at::Tensor row_coef = at::empty({kCoefs, in.N}, opts);
  at::Tensor col_coef = at::empty({kCoefs, o.symmetric ? in.M : 0}, opts);
  GradWork w(in, o);
  AT_DISPATCH_FLOATING_TYPES(acc, "contrastive_bwd", [&] {
    TileArgs<scalar_t> a = base_args<scalar_t>(in, o);
    Backend::template coefs<scalar_t>(a.kind, rs.data_ptr<scalar_t>(), gr.data_ptr<scalar_t>(), in.N, a.p,
                                      row_coef.data_ptr<scalar_t>(), in.N);
    at::Tensor cs;
    if (o.symmetric) {
      cs = col_stats.to(acc).contiguous();
      Backend::template coefs<scalar_t>(a.kind, cs.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), in.M, a.p,
                                        col_coef.data_ptr<scalar_t>(), in.M);
      a.col_coef = col_coef.data_ptr<scalar_t>();
    }
    a.row_coef = row_coef.data_ptr<scalar_t>();
    w.bind(in, a);
    const bool fused = Backend::template fused<scalar_t>(in, a, Fused::kGrad);
    for_each_block(in, a, [&](TileArgs<scalar_t>& b) {  // t_i * G_ij (dq = that @ K, dk += its transpose @ Q)
      if (fused) {
        w.point_fused_grad_out(in, b);
        Backend::template fused_block<scalar_t>(in, b, Fused::kGrad);
      } else {
        w.gemm_tile(in, b);
        Backend::template bwd_tile<scalar_t>(b);
      }
      w.gemms(in, b.row0, b.rows);
    });
  });
  Backend::finish_backward(in, w.dq);
  return {w.dq.mul(unit).to(query.scalar_type()), w.dk.mul(unit).to(key.scalar_type()), w.dscale.mul_(unit),
          w.dbias_rows.sum().mul(unit)};
}

}  // namespace fastloss::contrastive
