"""Argument checks of the public API (DESIGN.md section 5) and the target-range validation switch."""

from __future__ import annotations

import math

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("none", "mean", "sum")
_validate = False


def set_validation(enabled: bool) -> None:
    """Check target ranges synchronously on every device (a host sync on CUDA).

    Off by default: on CUDA an out-of-range target then gives a NaN loss for its row without a sync; CPU
    kernels always raise IndexError.
    """
    global _validate
    _validate = bool(enabled)


def get_validation() -> bool:
    return _validate


def check_logits(fn: str, logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{fn}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() < 2:
        raise ValueError(
            f"{fn}: logits must have shape (N, C) or (..., C) with the class dimension last, "
            f"got shape {tuple(logits.shape)}"
        )
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.shape[-1] < 1:
        raise ValueError(f"{fn}: logits need at least one class, got shape {tuple(logits.shape)}")


def check_logits_target(fn: str, logits, target) -> None:
    check_logits(fn, logits)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{fn}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(
            f"{fn}: target must hold integer class indices (int64 or int32), got {target.dtype}"
            + ("; probability targets (a floating tensor shaped like logits) are taken by cross_entropy only"
               if target.dtype.is_floating_point else "")
        )
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{fn}: target must have shape {tuple(logits.shape[:-1])} (logits without the class "
            f"dimension), got {tuple(target.shape)}"
        )
    if target.device != logits.device:
        raise ValueError(f"{fn}: target is on {target.device} but logits are on {logits.device}")


def check_class_vector(fn: str, name: str, v, logits) -> None:
    if v is None:
        return
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a tensor of shape (C,) or None, got {type(v).__name__}")
    C = logits.shape[-1]
    if v.dim() != 1 or v.shape[0] != C:
        raise ValueError(f"{fn}: {name} must have shape ({C},), one value per class, got {tuple(v.shape)}")
    if not v.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} must be a floating tensor, got {v.dtype}")
    if v.device != logits.device:
        raise ValueError(f"{fn}: {name} is on {v.device} but logits are on {logits.device}")


def check_no_grad(fn: str, name: str, v) -> None:
    """A tensor option the kernels read but give no gradient (class weights as in torch, margins, target
    weights): raise rather than let autograd return None or a partial gradient for it."""
    if isinstance(v, torch.Tensor) and v.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{fn}: {name} does not take a gradient (as torch's class weights do not); pass "
                           f"{name}.detach()")


def check_bool(fn: str, name: str, value) -> bool:
    """A flag: True / False (numpy and torch bools included), not any truthy object ("no" would read True)."""
    if isinstance(value, bool) or (hasattr(value, "dtype") and getattr(value, "shape", None) == () and
                                   str(value.dtype) in ("bool", "torch.bool")):
        return bool(value)
    raise TypeError(f"{fn}: {name} must be True or False, got {value!r}")


def check_reduction(fn: str, reduction) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


_F32_MAX = 3.4028234663852886e38


def check_finite(fn: str, name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: {name} must be a number, got {type(value).__name__}") from None
    if not -math.inf < v < math.inf:  # not math.isfinite: torch.compile(dynamic=True) traces v as a SymFloat
        raise ValueError(f"{fn}: {name} must be finite, got {v}")
    if not -_F32_MAX <= v <= _F32_MAX:  # the kernels hold their options in fp32 (inf / NaN rows otherwise)
        raise ValueError(f"{fn}: {name} must be within float32 range, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {v}")
    if nonnegative and v < 0:
        raise ValueError(f"{fn}: {name} must be >= 0, got {v}")
    return v


def check_ignore_index(fn: str, ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")
    return ignore_index


def check_target_range(fn: str, target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raises IndexError for a target outside [0, C) that is not ignore_index (syncs with the device)."""
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        idx = int(bad.reshape(-1).nonzero()[0, 0])
        value = int(target.reshape(-1)[idx])
        raise IndexError(
            f"{fn}: target {value} at flat position {idx} is out of bounds for {num_classes} classes "
            f"(and is not ignore_index={ignore_index})"
        )


def is_prob_target(target) -> bool:
    """cross_entropy's probability targets (torch's floating-point target): a floating tensor."""
    return isinstance(target, torch.Tensor) and target.dtype.is_floating_point


def check_prob_target(fn: str, logits, target, *, ignore_index, target_margin) -> None:
    """Probability targets: a floating tensor shaped like logits, on their device; no ignore_index (torch refuses
    one >= 0 and ignores a negative one) and no target margin (there is no target class)."""
    check_logits(fn, logits)
    if tuple(target.shape) != tuple(logits.shape):
        raise ValueError(
            f"{fn}: a probability target (floating point) must have the shape of logits {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}; class indices must be an integer tensor"
        )
    if target.device != logits.device:
        raise ValueError(f"{fn}: target is on {target.device} but logits are on {logits.device}")
    if isinstance(ignore_index, int) and not isinstance(ignore_index, bool) and ignore_index >= 0:
        raise ValueError(f"{fn}: ignore_index={ignore_index} is not supported with probability targets")
    if isinstance(target_margin, torch.Tensor) or target_margin != 0:
        raise ValueError(f"{fn}: target_margin needs class-index targets, not probability targets")


def check_cross_entropy_args(fn, logits, target, *, weight, reduction, ignore_index, label_smoothing,
                             lse_square_scale, logit_scale, softcap, target_margin):
    """All argument checks of cross_entropy; returns the options as plain floats (softcap None or > 0)."""
    if is_prob_target(target):
        check_prob_target(fn, logits, target, ignore_index=ignore_index, target_margin=target_margin)
    else:
        check_logits_target(fn, logits, target)
    check_class_vector(fn, "weight", weight, logits)
    check_no_grad(fn, "weight", weight)
    check_reduction(fn, reduction)
    check_ignore_index(fn, ignore_index)
    label_smoothing = check_finite(fn, "label_smoothing", label_smoothing, nonnegative=True)
    if label_smoothing > 1.0:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1], got {label_smoothing}")
    lse_square_scale = check_finite(fn, "lse_square_scale", lse_square_scale, nonnegative=True)
    logit_scale = check_finite(fn, "logit_scale", logit_scale)
    if softcap is not None:
        softcap = check_finite(fn, "softcap", softcap, positive=True)
    if isinstance(target_margin, torch.Tensor):
        check_class_vector(fn, "target_margin", target_margin, logits)
        check_no_grad(fn, "target_margin", target_margin)
    else:
        target_margin = check_finite(fn, "target_margin", target_margin)
    return label_smoothing, lse_square_scale, logit_scale, softcap, target_margin


def check_linear_layer(fn, x, weight, bias, names=("hidden", "weight", "bias")) -> None:
    """Inputs of a loss over the logits ``x @ weight.T + bias`` that are never formed: x (..., d), weight (C, d)
    with C >= 1, bias (C,) or None, one floating dtype and device. ``names``: the arguments' public names."""
    xn, wn, bn = names
    for name, t in ((xn, x), (wn, weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"{fn}: {xn} must be (..., d) and {wn} (classes, d), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{fn}: {xn} has width {x.shape[-1]} but {wn} rows have width {weight.shape[1]}")
    if weight.shape[0] < 1:
        raise ValueError(f"{fn}: {wn} needs at least one row (class)")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: {xn} must be a floating tensor (fp16/bf16/fp32/fp64), got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{fn}: {wn} has dtype {weight.dtype} but {xn} has {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"{fn}: {wn} is on {weight.device} but {xn} is on {x.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{fn}: {bn} must be a tensor of shape ({weight.shape[0]},) or None")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(f"{fn}: {bn} must have the dtype and device of {xn} ({x.dtype}, {x.device})")


def check_spherical_args(fn, logits, target, target_weight, *, ignore_index, reduction) -> bool:
    """Checks of the spherical family on logits. target is (...) class ids, or (..., K) for K targets per row
    (padded with ignore_index) with optional target_weight of the same shape. Returns True for (..., K)."""
    if (isinstance(target, torch.Tensor) and isinstance(logits, torch.Tensor) and target.dim() == logits.dim()
            and logits.dim() >= 1):
        multi = True
        if target.shape[-1] < 1:
            raise ValueError(f"{fn}: target (..., K) needs K >= 1, got shape {tuple(target.shape)}")
        check_logits_target(fn, logits, target[..., 0])
    else:
        multi = False
        check_logits_target(fn, logits, target)
    if target_weight is not None:
        if not isinstance(target_weight, torch.Tensor):
            raise TypeError(f"{fn}: target_weight must be a tensor or None, got {type(target_weight).__name__}")
        if tuple(target_weight.shape) != tuple(target.shape):
            raise ValueError(
                f"{fn}: target_weight must have the shape of target {tuple(target.shape)}, got "
                f"{tuple(target_weight.shape)}"
            )
        if not target_weight.dtype.is_floating_point:
            raise TypeError(f"{fn}: target_weight must be a floating tensor, got {target_weight.dtype}")
        if target_weight.device != logits.device:
            raise ValueError(f"{fn}: target_weight is on {target_weight.device} but logits are on {logits.device}")
        check_no_grad(fn, "target_weight", target_weight)
    check_reduction(fn, reduction)
    check_ignore_index(fn, ignore_index)
    return multi


def check_zloss_args(fn, a, b):
    return check_finite(fn, "a", a, positive=True), check_finite(fn, "b", b)


# sparsemax family ------------------------------------------------------------------------------------------------
def check_threshold_input(fn: str, logits, dim) -> int:
    """Checks of sparsemax / entmax15 (the activations); returns ``dim`` made non-negative."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{fn}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{fn}: dim must be an int, got {type(dim).__name__}")
    if logits.dim() == 0:
        raise ValueError(f"{fn}: logits must have at least one dimension, got a 0-d tensor")
    if not -logits.dim() <= dim < logits.dim():
        raise IndexError(f"{fn}: dim {dim} is out of range for logits with {logits.dim()} dimensions")
    dim %= logits.dim()
    if logits.shape[dim] < 1:
        raise ValueError(f"{fn}: logits need at least one class along dim {dim}, got shape {tuple(logits.shape)}")
    return dim


# ---------------------------------------------------------------------------------------------- stable softmax


def check_single_label_args(fn, logits, target, *, weight, ignore_index, reduction) -> None:
    """Checks shared by the single-label losses of the stable-softmax family (class-index targets)."""
    check_logits_target(fn, logits, target)
    check_class_vector(fn, "weight", weight, logits)
    check_reduction(fn, reduction)
    check_ignore_index(fn, ignore_index)


def check_taylor_order(fn, order) -> int:
    if isinstance(order, bool) or not isinstance(order, int):
        raise TypeError(f"{fn}: order must be an int, got {type(order).__name__}")
    if order not in (2, 4, 6, 8, 10):
        raise ValueError(f"{fn}: order must be an even number from 2 to 10, got {order}")
    return order


def check_multilabel_args(fn, logits, targets, *, ignore_index, reduction) -> None:
    """Multi-label targets: a bool mask shaped like logits, or padded class-index lists (..., K)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{fn}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{fn}: targets must be a torch.Tensor, got {type(targets).__name__}")
    if logits.dim() < 2:
        raise ValueError(f"{fn}: logits must have shape (N, C) or (..., C), got shape {tuple(logits.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.shape[-1] < 1:
        raise ValueError(f"{fn}: logits need at least one class, got shape {tuple(logits.shape)}")
    if targets.dtype == torch.bool:
        if tuple(targets.shape) != tuple(logits.shape):
            raise ValueError(
                f"{fn}: a bool targets mask must have the shape of logits {tuple(logits.shape)}, "
                f"got {tuple(targets.shape)}"
            )
    elif targets.dtype.is_floating_point or targets.dtype.is_complex:
        raise TypeError(
            f"{fn}: targets must be a bool mask (..., C) or integer class lists (..., K), got {targets.dtype}"
        )
    elif targets.dim() != logits.dim() or tuple(targets.shape[:-1]) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{fn}: integer targets must have shape {tuple(logits.shape[:-1])} + (K,) (padded with "
            f"ignore_index), got {tuple(targets.shape)}"
        )
    if targets.device != logits.device:
        raise ValueError(f"{fn}: targets are on {targets.device} but logits are on {logits.device}")
    check_ignore_index(fn, ignore_index)
    check_reduction(fn, reduction)
