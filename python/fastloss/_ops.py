"""Loads the compiled extension and answers which devices each fastloss op has a kernel for."""

from __future__ import annotations

import warnings

import torch

OPS = ("cross_entropy_fwd", "cross_entropy_bwd", "cross_entropy_prob_fwd", "cross_entropy_prob_bwd", "spherical_fwd",
       "spherical_bwd", "spherical_row_terms", "spherical_gather_dot", "spherical_row_stats", "spherical_grad_hidden",
       "spherical_split_bf16", "spherical_weight_grad")
OPS += ("contrastive_fwd", "contrastive_fwd_grad", "contrastive_bwd")  # contrastive family
OPS += ("sparsemax_fwd", "sparsemax_bwd", "sparsemax_loss_fwd", "sparsemax_loss_bwd")  # sparsemax family
OPS += ("additive_row_fwd", "additive_row_bwd", "multilabel_row_fwd", "multilabel_row_bwd")  # stable softmax

try:
    from . import _C  # noqa: F401  (registers torch.ops.fastloss.*)

    AVAILABLE = True
    LOAD_ERROR: str | None = None
except Exception as exc:  # ImportError, or an undefined symbol against another torch
    _C = None
    AVAILABLE = False
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "fastloss: the compiled extension fastloss._C could not be loaded "
        f"({LOAD_ERROR}); every fastloss function will run its pure-PyTorch twin from fastloss.reference. "
        "Reinstall with `pip install --no-build-isolation .` against this torch to get the fused kernels.",
        RuntimeWarning,
        stacklevel=2,
    )

_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_warned_devices: set[str] = set()


# Read once at import: a plain dict lookup is what torch.compile traces through without a graph break.
_KERNELS = {
    (op, dev): AVAILABLE and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastloss::{op}", key)
    for op in OPS
    for dev, key in _DEVICE_KEYS.items()
}


def has_kernel(op: str, device_type: str) -> bool:
    return _KERNELS.get((op, device_type), False)


def use_kernel(op: str, device: torch.device) -> bool:
    """True when the fused kernel runs on `device`; otherwise warns once per device and returns False."""
    if has_kernel(op, device.type):
        return True
    if AVAILABLE and device.type not in _warned_devices:
        _warned_devices.add(device.type)
        warnings.warn(
            f"fastloss: no compiled kernel for device '{device.type}' in this build; "
            "using the pure-PyTorch reference implementation there.",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def build_info(version: str) -> dict:
    info = {
        "fastloss_version": version,
        "extension_loaded": AVAILABLE,
        "load_error": LOAD_ERROR,
        "torch_version_runtime": torch.__version__,
        "torch_version_built": _C.torch_version if AVAILABLE else None,
        "cuda_version": (_C.cuda_version or None) if AVAILABLE else None,
        "cuda_archs": [a for a in _C.cuda_archs.split(",") if a] if AVAILABLE else [],
        "cpu_isas": _C.cpu_isas.split(",") if AVAILABLE else [],
        "cpu_isa": _C.cpu_isa if AVAILABLE else None,  # the one in use (FASTLOSS_CPU_ISA=base forces the baseline)
        # the contrastive forward's fused GEMM + fold for sm_90 (CUTLASS), used when FASTLOSS_CONTRASTIVE_FUSED=1
        "contrastive_fused_sm90": bool(getattr(_C, "contrastive_fused_sm90", 0)) if AVAILABLE else False,
        "ops": {op: [d for d in _DEVICE_KEYS if has_kernel(op, d)] for op in OPS},
    }
    return info
