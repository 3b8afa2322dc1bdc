// The one place where fastloss's operator schemas live. Each device adds only a TORCH_LIBRARY_IMPL block
// (csrc/cpu/*.cpp, csrc/cuda/*.cu). Every op is functional (no input is mutated), so register_fake and
// register_autograd apply from Python and torch.compile(fullgraph=True) traces through them.
#include <Python.h>
#include <torch/library.h>

#include "cpu/glue.h"  // use_avx2_kernels

TORCH_LIBRARY(fastloss, m) {
  // Cross-entropy forward over rows of logits (N, C) with class stride 1 and int64 targets (N,).
  // Pre-map per logit, in this order: z = logit_scale * x; z = softcap * tanh(z / softcap) when softcap > 0;
  // z_y -= target_margin[y] (per-class margin tensor) or margin_scalar.
  // Returns parts (N, 3) = [w_y (lse - z_y), sum_k w_k (lse - z_k), lse] in the accumulation type (float64
  // for float64 logits, float32 otherwise; parts[:, 0:2] are 0 on ignored rows, parts[:, 1] also when
  // with_smoothing is false) and stats (N, 3) = [max, rest mass, target logit z_y] for the backward.
  m.def(
      "cross_entropy_fwd(Tensor logits, Tensor target, Tensor? weight, Tensor? target_margin, float margin_scalar, "
      "float logit_scale, float softcap, int ignore_index, bool with_smoothing) -> (Tensor parts, Tensor stats)");
  // dL/dlogits (N, C) in the logits dtype from dL/dparts (N, 3), recomputing softmax from logits + stats
  // (the margin-shifted target logit is in the stats, so the margin itself is not needed).
  m.def(
      "cross_entropy_bwd(Tensor grad_parts, Tensor logits, Tensor target, Tensor? weight, Tensor stats, "
      "float logit_scale, float softcap, int ignore_index, bool with_smoothing) -> Tensor");
  // Cross-entropy to probability targets t (N, C) (torch's floating-point target), any floating dtype (read in
  // the logits' dtype when they share it, else in the accumulation type); pre-maps as above, no margin. Returns
  // parts (N, 3) = [sum_k w_k t_k (lse - z_k), sum_k w_k (lse - z_k) (0 unless with_smoothing), lse] and stats
  // (N, 3) = [max, rest mass, sum_k w_k t_k].
  m.def(
      "cross_entropy_prob_fwd(Tensor logits, Tensor target, Tensor? weight, float logit_scale, float softcap, "
      "bool with_smoothing) -> (Tensor parts, Tensor stats)");
  // dL/dlogits (N, C) in the logits dtype from dL/dparts (N, 3) (the target's gradient is formed in Python).
  m.def(
      "cross_entropy_prob_bwd(Tensor grad_parts, Tensor logits, Tensor target, Tensor? weight, Tensor stats, "
      "float logit_scale, float softcap, bool with_smoothing) -> Tensor");
  // Spherical family on logits (fastloss/spherical.h), kind 0 Z-loss (a, b), 1 spherical softmax (eps),
  // 2 log-Taylor softmax of order 2, 3 squared error. target (N, K) int64 class ids (ignore_index pads),
  // target_weight (N, K) or None (weight 1): the losses average their per-target terms with these weights,
  // squared error uses y = sum_j w_j e_{c_j}. Returns loss (N,) in the accumulation type (0 on rows without a
  // valid target) and stats (N, 2) = [mean - logits[:, 0], sum_k (o_k - mean)^2].
  m.def(
      "spherical_fwd(Tensor logits, Tensor target, Tensor? target_weight, int kind, float a, float b, float eps, "
      "int ignore_index) -> (Tensor loss, Tensor stats)");
  m.def(
      "spherical_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor? target_weight, Tensor stats, int kind, "
      "float a, float b, float eps, int ignore_index) -> Tensor");
  // Per-row finalisation of the spherical Gram form (python/fastloss/linear_spherical.py): from each row's
  // mean mu (N,), centred square sum m2 (N,), target outputs o_c and o_c - mu (N, K), to the row loss (N,)
  // and coef (N, 3 + K) = [dL/dm2, dL/dmu, B_m, dL/do_{c_1}, ...] (float32 or float64, like mu), where
  // B_m = dL/dmu + sum_j dL/do_{c_j}, formed without cancellation, is the coefficient of the weight mean m in
  // dL/dh once the target rows are taken relative to m (spherical_grad_hidden).
  m.def(
      "spherical_row_terms(Tensor mu, Tensor m2, Tensor target_out, Tensor target_dev, Tensor target, "
      "Tensor? target_weight, int kind, float a, float b, float eps, int num_classes, int ignore_index) "
      "-> (Tensor loss, Tensor coef)");
  // Gram-form row kernels. hidden (N, d) and weight (V_s, d) rows of one shard holding classes
  // [offset, offset + V_s); results in the accumulation type (float64 for float64, float32 otherwise).
  // Target outputs (N, K, 2): [..., 0] centred on center = [m (d), bm], (w_c - m) . h + (b_c - bm), and [..., 1]
  // raw, w_c . h + b_c, both accumulated in double, for local targets; 0 for the others.
  m.def(
      "spherical_gather_dot(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor center, int offset, "
      "int ignore_index) -> Tensor");
  // Row statistics [mu, m2] (N, 2) from hidden, hq = hidden @ Q_c and stat = [m (d), bm, u (d), beta]:
  // mu = h . m + bm (accumulated in double), m2 = (hq + 2u) . h + beta.
  m.def("spherical_row_stats(Tensor hidden, Tensor hq, Tensor stat) -> Tensor");
  // v = (x - col_shift) * row_scale in fp32 (each optional; x (R, d) float, col_shift (d,), row_scale (R,)
  // float32), returned as bfloat16 (hi, lo) with hi = bf16(v), lo = bf16(v - hi): the operand split of the
  // Gram form's bf16 tensor-core products.
  m.def("spherical_split_bf16(Tensor x, Tensor? col_shift, Tensor? row_scale) -> (Tensor, Tensor)");
  // The Gram form's weight gradient in the weight's dtype from its GEMM part gw (V, d) (accumulation dtype):
  // out = gw + row (d) on every row + 2 bias (V) v (d)ᵀ, one pass (the rank-one terms never touch gw).
  m.def("spherical_weight_grad(Tensor gw, Tensor row, Tensor? bias, Tensor v, ScalarType dtype) -> Tensor");
  // Hidden gradient (N, d): [2A (hq + u) + B_m m if with_dense] + sum_j gamma_j (w_{c_j} - m) over local
  // targets, with ab (N, 2) = [A, B_m] and gamma (N, K) already scaled by the upstream gradient, m = stat[:d].
  m.def(
      "spherical_grad_hidden(Tensor hq, Tensor ab, Tensor gamma, Tensor weight, Tensor target, Tensor stat, "
      "int offset, int ignore_index, bool with_dense) -> Tensor");

  // --- contrastive engine (csrc/contrastive_engine.h): logits s_ij = scale_i <query_i, key_j> + bias, tiled by
  // blocks of query rows; the N x M matrix is never stored. kind: 0 softmax (InfoNCE / CLIP, one positive per
  // row given by `positive`, optional HCL beta, decoupled, label smoothing, symmetric adds the column
  // direction), 1 sigmoid (SigLIP, positive pairs (i, positive[i]), the rest negatives), 2 SupCon (positives =
  // equal labels_q / labels_k). exclude_self drops lane j == i. block_rows 0 picks the tile height.
  // Returns row_loss (N,), col_loss (M,) or (0,), and row / col statistics (N | M, 7) for the backward
  // (fastloss/contrastive.h names the columns), all in the accumulation type.
  m.def(
      "contrastive_fwd(Tensor query, Tensor key, Tensor scale, Tensor? bias, Tensor? positive, Tensor? labels_q, "
      "Tensor? labels_k, int kind, bool symmetric, bool exclude_self, bool decoupled, float beta, "
      "float label_smoothing, int block_rows) -> (Tensor row_loss, Tensor col_loss, Tensor row_stats, "
      "Tensor col_stats)");
  // A row-wise loss (not symmetric) with the gradient of total = sum_i row_loss_i from the same tiles (3 GEMMs
  // per block instead of a forward's 1 plus a backward's 3): total (), row_loss (N,), row_stats (N, 7), then
  // grad_query (N, d), grad_key (M, d), grad_scale (N,) and grad_bias (), all in the accumulation type.
  m.def(
      "contrastive_fwd_grad(Tensor query, Tensor key, Tensor scale, Tensor? bias, Tensor? positive, "
      "Tensor? labels_q, Tensor? labels_k, int kind, bool exclude_self, bool decoupled, float beta, "
      "float label_smoothing, int block_rows, bool query_grad=True, bool key_grad=True) -> (Tensor total, "
      "Tensor row_loss, Tensor row_stats, Tensor grad_query, Tensor grad_key, Tensor grad_scale, Tensor grad_bias)");
  // Recomputes every tile: grad_query (N, d), grad_key (M, d) in the features' dtype, grad_scale (N,) and
  // grad_bias () in the accumulation type. query_grad / key_grad false: that gradient's GEMMs are skipped and it
  // comes back as (0, d) (a frozen tower, a queue of keys); the same for contrastive_fwd_grad.
  m.def(
      "contrastive_bwd(Tensor grad_row, Tensor grad_col, Tensor query, Tensor key, Tensor scale, Tensor? bias, "
      "Tensor? positive, Tensor? labels_q, Tensor? labels_k, Tensor row_stats, Tensor col_stats, int kind, "
      "bool symmetric, bool exclude_self, bool decoupled, float beta, float label_smoothing, int block_rows, "
      "bool query_grad=True, bool key_grad=True) -> (Tensor grad_query, Tensor grad_key, Tensor grad_scale, "
      "Tensor grad_bias)");
  // --- sparsemax family (fastloss/sparsemax.h): sparsemax (entmax15 = false) and entmax-1.5 (true) over rows
  // of logits (N, C), class stride 1, sort-free exact threshold.
  // Activation: probabilities (N, C) in the logits dtype; the backward needs only them and dL/dprobs.
  m.def("sparsemax_fwd(Tensor logits, bool entmax15) -> Tensor");
  m.def("sparsemax_bwd(Tensor grad, Tensor probs, bool entmax15) -> Tensor");
  // Fenchel-Young loss per row (N,) in the accumulation type (0 on ignored rows) and stats (N, 2) = [row max,
  // threshold relative to it] from which the backward recomputes p and writes dL/dlogits = g (p - e_y).
  m.def("sparsemax_loss_fwd(Tensor logits, Tensor target, int ignore_index, bool entmax15) -> (Tensor loss, "
        "Tensor stats)");
  m.def("sparsemax_loss_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor stats, int ignore_index, "
        "bool entmax15) -> Tensor");
}

// Stable-softmax family (csrc/cpu/stable_softmax*.cpp, csrc/cuda/stable_softmax.cu; maths in
// fastloss/stable_softmax.h).
TORCH_LIBRARY_FRAGMENT(fastloss, m) {
  // Additive normaliser p_k = phi(z_k) / sum_j phi(z_j) over rows of logits (N, C), z = scale * x, target logit
  // z_y - margin. kind: 0 StableMax, 1 Taylor of even `order` (2..10), 2 softplus. -inf logits are masked.
  // Returns loss (N,) = -log p_y (0 on ignored rows) and stats (N, 2) = [sum_{k != y} phi(z_k), phi(z_y)].
  m.def(
      "additive_row_fwd(Tensor logits, Tensor target, int kind, int order, float scale, float margin, "
      "int ignore_index) -> (Tensor loss, Tensor stats)");
  m.def(
      "additive_row_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor stats, int kind, int order, "
      "float scale, float margin, int ignore_index) -> Tensor");
  // Multi-label losses on a bool mask (N, C) of positives, s = scale (z - margin) on positives and
  // scale (z + margin) on negatives. kind 0: ZLPR log(1 + sum_n e^{s_n}) + log(1 + sum_p e^{-s_p});
  // kind 1: decoupled softmax (DEXML) mean_p softplus(lse_n - s_p), 0 on rows without positives.
  // Returns loss (N,) and stats (N, 4) (see fastloss/stable_softmax.h).
  m.def(
      "multilabel_row_fwd(Tensor logits, Tensor mask, int kind, float scale, float margin) "
      "-> (Tensor loss, Tensor stats)");
  m.def(
      "multilabel_row_bwd(Tensor grad_loss, Tensor logits, Tensor mask, Tensor stats, int kind, float scale, "
      "float margin) -> Tensor");
}

#ifndef FASTLOSS_VERSION
#define FASTLOSS_VERSION "0.0.0"
#endif
#ifndef FASTLOSS_TORCH_VERSION
#define FASTLOSS_TORCH_VERSION ""
#endif
#ifndef FASTLOSS_CUDA_VERSION
#define FASTLOSS_CUDA_VERSION ""
#endif
#ifndef FASTLOSS_CUDA_ARCHS
#define FASTLOSS_CUDA_ARCHS ""
#endif
#ifndef FASTLOSS_CPU_ISAS
#define FASTLOSS_CPU_ISAS "base"
#endif

// The ops register themselves when the library is loaded; the Python module only carries build facts.
static PyModuleDef fastloss_module = {PyModuleDef_HEAD_INIT, "_C", "fastloss compiled kernels", -1, nullptr};

PyMODINIT_FUNC PyInit__C() {
  PyObject* mod = PyModule_Create(&fastloss_module);
  if (mod == nullptr) return nullptr;
  PyModule_AddStringConstant(mod, "version", FASTLOSS_VERSION);
  PyModule_AddStringConstant(mod, "torch_version", FASTLOSS_TORCH_VERSION);
  PyModule_AddStringConstant(mod, "cuda_version", FASTLOSS_CUDA_VERSION);
  PyModule_AddStringConstant(mod, "cuda_archs", FASTLOSS_CUDA_ARCHS);
  PyModule_AddStringConstant(mod, "cpu_isas", FASTLOSS_CPU_ISAS);
  PyModule_AddStringConstant(mod, "cpu_isa", fastloss::cpu::use_avx2_kernels() ? "avx2" : "base");
#if FL_HAVE_SM90_FUSED
  PyModule_AddIntConstant(mod, "contrastive_fused_sm90", 1);
#else
  PyModule_AddIntConstant(mod, "contrastive_fused_sm90", 0);
#endif
  return mod;
}
