// The one place where fastloss's operator schemas live. Each device adds only a TORCH_LIBRARY_IMPL block
// (csrc/cpu/*.cpp, csrc/cuda/*.cu). Every op is functional (no input is mutated), so register_fake and
// register_autograd apply from Python and torch.compile(fullgraph=True) traces through them.
#include <Python.h>
#include <torch/library.h>

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
  // Z-loss of de Brebisson & Vincent (2016) per row: softplus(a (b - z_c)) / a with z the row's z-scores.
  // Returns loss (N,) (0 on ignored rows) and stats (N, 2) = [mean - logits[:, 0], population std].
  m.def("zloss_fwd(Tensor logits, Tensor target, float a, float b, int ignore_index) -> (Tensor loss, Tensor stats)");
  m.def(
      "zloss_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor stats, float a, float b, int ignore_index) "
      "-> Tensor");
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
  return mod;
}
