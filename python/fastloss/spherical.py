"""The spherical family on logits: Z-loss, spherical softmax, log-Taylor softmax (order 2; the public function with
every order is :func:`fastloss.taylor_softmax_loss`, which sends multi-target calls here) and squared error.

Each loss sees a row of outputs o only through its mean, its centred square sum and the target outputs, so one
fused kernel (``spherical_fwd`` / ``spherical_bwd``, maths in ``csrc/include/fastloss/spherical.h``) serves all
four, with one target per row or several: ``target`` of shape ``(..., K)`` holds K class ids per row padded
with ``ignore_index``, and ``target_weight`` (same shape, default 1) weighs them. The log-losses average their
per-target terms, ``Σ_j w_j ℓ(c_j) / Σ_j w_j``; squared error uses the target vector ``y = Σ_j w_j e_{c_j}``.
A row whose targets are all ``ignore_index`` has loss 0 and is not counted by ``reduction="mean"``; a counted
row whose weights sum to 0 has loss 0.
"""

from __future__ import annotations

import torch

from . import _ops, reference
from . import _validation as V
from ._reduce import row_loss_output

ZLOSS, SPHERICAL_SOFTMAX, TAYLOR_SOFTMAX, SQUARED_ERROR = 0, 1, 2, 3
KINDS = {"zloss": ZLOSS, "spherical_softmax": SPHERICAL_SOFTMAX, "taylor_softmax": TAYLOR_SOFTMAX,
         "mse": SQUARED_ERROR}
DEFAULT_EPS = 1e-4  # spherical softmax: keeps -log(o_c^2 + eps) finite at o_c = 0, |dL/do_c| <= 1/sqrt(eps)


def rows_and_targets(logits, target, target_weight, multi):
    """(N, C) logits with class stride 1, (N, K) int64 targets and (N, K) weights (or None)."""
    C = logits.shape[-1]
    x = logits.reshape(-1, C)
    if x.stride(-1) != 1 and C > 1:
        x = x.contiguous()
    K = target.shape[-1] if multi else 1
    t = target.reshape(-1, K).long()
    w = target_weight.reshape(-1, K) if target_weight is not None else None
    return x, t, w


def spherical_call(fn, kind, logits, target, target_weight, *, a=1.0, b=0.0, eps=0.0, ignore_index=-100,
                   reduction="mean"):
    multi = V.check_spherical_args(fn, logits, target, target_weight, ignore_index=ignore_index,
                                   reduction=reduction)
    if not _ops.use_kernel("spherical_fwd", logits.device):
        return reference.spherical_loss(kind, logits, target, target_weight, a=a, b=b, eps=eps,
                                        ignore_index=ignore_index, reduction=reduction)
    if V.get_validation():
        V.check_target_range(fn, target, logits.shape[-1], ignore_index)
    x, t, w = rows_and_targets(logits, target, target_weight, multi)
    rows, _ = torch.ops.fastloss.spherical_fwd(x, t, w, kind, a, b, eps, ignore_index)
    return row_loss_output(logits, rows, (t != ignore_index).any(-1), reduction)


def zloss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    a: float = 1.0,
    b: float = 0.0,
    target_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
):
    """Z-loss of de Brébisson & Vincent (2016), "The Z-loss: a shift and scale invariant classification loss".

    Per row of logits o (class dimension last): ``μ`` = mean, ``σ`` = population standard deviation,
    ``z_c = (o_c − μ) / σ`` for the target c, and ``loss = softplus(a · (b − z_c)) / a``. ``a > 0`` sets the
    sharpness, ``b`` the target z-score margin. Its gradient costs O(C) per row and does not depend on the
    scale or shift of the logits. The statistics are a mean taken relative to a value of the row itself and a
    centred square sum built from groups centred on their own means, so they stay accurate when ``|μ| ≫ σ``, in
    rows of millions of classes, and when that value is an outlier. A constant row (σ = 0) has loss
    ``softplus(a·b)/a`` and gradient 0.

    ``target`` may be ``(..., K)`` with ``target_weight`` (see :mod:`fastloss.spherical`): the row loss is the
    weighted mean of the per-target losses. From hidden states without logits: :func:`linear_spherical_loss`.

    This is **not** the PaLM / ST-MoE log-Z penalty ``λ · logsumexp(o)²`` that is also called "z-loss": that
    one is ``fastloss.cross_entropy(..., lse_square_scale=λ)``.

    ``reduction="mean"`` averages over rows with a target that is not ``ignore_index`` (NaN when there are none).
    """
    fn = "fastloss.zloss"
    a, b = V.check_zloss_args(fn, a, b)
    return spherical_call(fn, ZLOSS, logits, target, target_weight, a=a, b=b, ignore_index=ignore_index,
                          reduction=reduction)


def spherical_softmax_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    eps: float = DEFAULT_EPS,
    target_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
):
    """Log-spherical softmax (Vincent et al. 2015; de Brébisson & Vincent 2016):
    ``−log((o_c² + ε) / Σ_k (o_k² + ε))`` per row.

    The default ``ε = 1e-4`` keeps the loss finite at ``o_c = 0`` and bounds the target term's gradient by
    ``1/√ε = 100``; smaller ε makes the loss closer to scale invariant. ``target`` may be ``(..., K)`` with
    ``target_weight`` (see :mod:`fastloss.spherical`).
    """
    fn = "fastloss.spherical_softmax_loss"
    eps = V.check_finite(fn, "eps", eps, nonnegative=True)
    return spherical_call(fn, SPHERICAL_SOFTMAX, logits, target, target_weight, eps=eps, ignore_index=ignore_index,
                          reduction=reduction)


def spherical_mse_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    target_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
):
    """Squared error to the one-hot target, ``Σ_k (o_k − y_k)²`` per row (``= q − 2 o_c + 1``), computed
    without forming y. With ``(..., K)`` targets, ``y = Σ_j w_j e_{c_j}`` (repeated classes add up).
    ``reduction="mean"`` averages the row sums over counted rows (it does not divide by C as ``F.mse_loss``).
    """
    fn = "fastloss.spherical_mse_loss"
    return spherical_call(fn, SQUARED_ERROR, logits, target, target_weight, ignore_index=ignore_index,
                          reduction=reduction)
