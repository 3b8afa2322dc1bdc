"""Public functional API. Shapes follow the class-last convention: logits (..., C), target (...)."""

from __future__ import annotations

import torch

from . import _ops, reference
from . import _validation as V
from ._reduce import cross_entropy_output, gather_class_weight, prob_cross_entropy_output
from .spherical import spherical_mse_loss, spherical_softmax_loss, zloss  # noqa: F401


def _logit_rows(logits: torch.Tensor) -> torch.Tensor:
    """(N, C) rows of the logits with class stride 1: a view (any row stride) unless the class dim is strided or
    the leading dims do not merge (e.g. logits[:, :-1] of a (B, T, C) tensor), which copy."""
    C = logits.shape[-1]
    x = logits.reshape(-1, C)
    if x.stride(-1) != 1 and C > 1:
        x = x.contiguous()
    return x


def _rows(logits: torch.Tensor, target: torch.Tensor):
    """(N, C) logit rows and the flat int64 targets."""
    return _logit_rows(logits), target.reshape(-1).long()


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    target_margin: float | torch.Tensor = 0.0,
    return_lse: bool = False,
):
    """Fused softmax cross-entropy over the last dimension.

    Identical to ``torch.nn.functional.cross_entropy(logits.reshape(-1, C), target.reshape(-1), ...)`` for
    every option torch has (class ``weight``, any integer ``ignore_index`` — also one naming a real class, whose
    rows are dropped while the class stays in the normaliser —, ``label_smoothing`` with torch's formula,
    ``reduction`` none / sum / mean (weighted mean over counted rows)), plus:

    * ``lse_square_scale=λ`` adds ``λ · lse²`` per counted row (the PaLM / ST-MoE log-Z penalty, often called
      "z-loss"; not :func:`fastloss.zloss`). With ``reduction="mean"`` it is averaged over counted rows.
    * pre-maps applied to every logit in this order: ``z = logit_scale · x``; then ``z = softcap ·
      tanh(z / softcap)`` when ``softcap`` is set; then ``z_y -= target_margin`` on the target logit only
      (a float, or a per-class tensor of shape (C,) as in LDAM).
    * ``return_lse=True`` returns ``(loss, lse)`` with the per-row log-sum-exp in float32 (float64 for float64
      logits), shaped like ``target``; gradients through ``lse`` are exact.

    Logits may be float16, bfloat16, float32 or float64; the maths runs in float32 (float64 for float64) and
    the loss comes back in the logits' dtype. A confidently right row keeps a positive loss and a non-zero
    gradient in float32 (no Softmax Collapse). ``-inf`` logits mask classes. Class dimension last: for
    torch's ``(N, C, d1, ...)`` layout, move the class dimension to the end first.

    **Probability targets** (torch's floating-point ``target``, shaped like ``logits``; soft labels,
    distillation): the loss of a row is ``sum_k w_k t'_k (lse - z_k)`` with ``t' = (1 - label_smoothing) t +
    label_smoothing / C``, and ``reduction="mean"`` divides by the number of rows, as torch does. ``target`` may
    have any floating dtype (read as is when it matches the logits', else in float32 / float64); the loss comes
    back in torch's promoted dtype of logits, target and weight, and ``target`` gets a gradient. The sum is
    taken next to the row maximum, so a target on the maximum keeps the loss and gradient digits that
    ``lse - z`` would cancel. A class with target 0 adds 0 also where its logit is ``-inf`` (torch gives NaN
    there). ``ignore_index`` (>= 0) and ``target_margin`` are refused; the other options apply.

    ``reduction="mean"`` over zero counted rows is NaN, like torch. A target outside ``[0, C)`` other than
    ``ignore_index`` raises ``IndexError`` on CPU; on CUDA it makes that row NaN without a host sync unless
    :func:`fastloss.set_validation` is on, which raises the same ``IndexError``.
    """
    fn = "fastloss.cross_entropy"
    label_smoothing, lse_square_scale, logit_scale, softcap, target_margin = V.check_cross_entropy_args(
        fn, logits, target, weight=weight, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, logit_scale=logit_scale,
        softcap=softcap, target_margin=target_margin,
    )
    return_lse = V.check_bool(fn, "return_lse", return_lse)

    prob = V.is_prob_target(target)
    if not _ops.use_kernel("cross_entropy_prob_fwd" if prob else "cross_entropy_fwd", logits.device):
        return reference.cross_entropy(
            logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, softcap=softcap,
            logit_scale=logit_scale, target_margin=target_margin, return_lse=return_lse,
        )
    C = logits.shape[-1]
    if prob:
        parts, _ = torch.ops.fastloss.cross_entropy_prob_fwd(
            _logit_rows(logits), target.reshape(-1, C), weight, logit_scale, softcap or 0.0, label_smoothing > 0,
        )
        nll, smooth, lse = parts.unbind(1)
        return prob_cross_entropy_output(
            logits, target, nll, smooth, lse, weight=weight, reduction=reduction, label_smoothing=label_smoothing,
            lse_square_scale=lse_square_scale, return_lse=return_lse,
        )
    if V.get_validation():
        V.check_target_range(fn, target, C, ignore_index)
    x, t = _rows(logits, target)
    per_class_margin = isinstance(target_margin, torch.Tensor)
    parts, _ = torch.ops.fastloss.cross_entropy_fwd(
        x, t, weight, target_margin if per_class_margin else None, 0.0 if per_class_margin else target_margin,
        logit_scale, softcap or 0.0, ignore_index, label_smoothing > 0,
    )
    nll, smooth, lse = parts.unbind(1)
    counted = t != ignore_index
    w_y = gather_class_weight(weight.to(parts.dtype) if weight is not None else None, t, counted, C)
    return cross_entropy_output(
        logits, nll, smooth, lse, counted, w_y, reduction=reduction, label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale, return_lse=return_lse,
    )


# sparsemax family (python/fastloss/sparsemax.py)
from .sparsemax import entmax15, entmax15_loss, sparsemax, sparsemax_loss  # noqa: E402, F401

# stable-softmax family (defined in stable_softmax.py, re-exported here as part of the functional API)
from .stable_softmax import (  # noqa: E402, F401
    comp_sum_loss,
    decoupled_softmax_loss,
    generalized_cross_entropy,
    softmax_collapse_stats,
    softplus_cross_entropy,
    stablemax_cross_entropy,
    taylor_softmax_loss,
    zlpr_loss,
)
