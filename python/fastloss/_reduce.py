"""Reductions shared by the fused path (functional.py) and the reference (reference.py).

The fused ops return per-row parts; the loss is assembled here with plain differentiable torch ops, so the
gradient of every reduction (including device-side denominators: no host sync) reaches the op's backward as
dL/dparts.
"""

from __future__ import annotations

import torch


def gather_class_weight(weight: torch.Tensor | None, target: torch.Tensor, counted: torch.Tensor, C: int):
    """w_y per row (0 on rows that are not counted), or None without class weights."""
    if weight is None:
        return None
    safe = target.clamp(0, C - 1)
    return torch.where(counted, weight[safe], torch.zeros((), dtype=weight.dtype, device=weight.device))


def combine_cross_entropy(
    nll: torch.Tensor,
    smooth: torch.Tensor,
    lse: torch.Tensor,
    counted: torch.Tensor,
    w_y: torch.Tensor | None,
    *,
    num_classes: int,
    reduction: str,
    label_smoothing: float,
    lse_square_scale: float,
) -> torch.Tensor:
    """Torch's cross-entropy reductions, to the letter, plus the lse^2 penalty.

    nll = w_y (lse - z_y) and smooth = sum_k w_k (lse - z_k) are 0 on ignored rows. With reduction="mean"
    the nll and smoothing terms divide by the sum of w_y over counted rows (their count without weights), and
    the penalty lse_square_scale * lse^2 by the number of counted rows. A mean over zero counted rows is NaN,
    like torch.
    """
    eps = float(label_smoothing)
    lam = float(lse_square_scale)
    penalty = torch.where(counted, lse, torch.zeros((), dtype=lse.dtype, device=lse.device)).square() if lam else None
    if reduction in ("none", "sum"):
        loss = nll if eps == 0 else (1.0 - eps) * nll + (eps / num_classes) * smooth
        if penalty is not None:
            loss = loss + lam * penalty
        return loss if reduction == "none" else loss.sum()
    count = counted.sum().to(nll.dtype)
    denom = count if w_y is None else w_y.to(nll.dtype).sum()
    loss = nll.sum() / denom
    if eps != 0:
        loss = (1.0 - eps) * loss + (eps / num_classes) * (smooth.sum() / denom)
    if penalty is not None:
        loss = loss + lam * (penalty.sum() / count)
    return loss


def cross_entropy_part_grads(
    counted: torch.Tensor,
    w_y: torch.Tensor | None,
    *,
    dtype: torch.dtype,
    num_classes: int,
    reduction: str,
    label_smoothing: float,
    lse_square_scale: float,
) -> torch.Tensor:
    """(N, 3) rows (a, b, c) with d loss / d (nll, smooth, lse) = (a, b, c · lse) for combine_cross_entropy with
    reduction "sum" or "mean": its loss is linear in nll and smooth and quadratic in lse, with coefficients that
    depend only on the targets, so a row's gradient is known from that row's lse alone (linear cross-entropy
    forms its gradients chunk by chunk in the forward). tests/test_linear_cross_entropy.py checks it against
    autograd through combine_cross_entropy."""
    eps, lam = float(label_smoothing), float(lse_square_scale)
    on = counted.to(dtype)
    if reduction == "sum":
        scale = lse_scale = torch.ones((), dtype=dtype, device=counted.device)
    else:  # combine's denominators: sum of w_y (or the count) for nll and smooth, the count for the penalty
        count = on.sum()
        scale, lse_scale = 1.0 / (count if w_y is None else w_y.to(dtype).sum()), 1.0 / count
    a = torch.full_like(on, 1.0 - eps) * scale
    b = torch.full_like(on, eps / num_classes) * scale
    # a where, not a product with `on`: with nothing counted 1 / count is inf, and 0 * inf would reach the
    # kernels as a NaN lse gradient on every row
    c = torch.where(counted, (2 * lam) * lse_scale, torch.zeros((), dtype=dtype, device=counted.device))
    return torch.stack([a, b, c], 1)


def mean_over(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count: NaN when count is 0, like torch's mean over no rows, with a zero gradient then (a plain
    division would send 1/0 = inf back, and inf times a row's zero coefficient is NaN)."""
    count = count.to(total.dtype)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


def reduce_rows(loss: torch.Tensor, counted: torch.Tensor, reduction: str) -> torch.Tensor:
    """none / sum / mean over counted rows (NaN when none is counted, like torch)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return mean_over(loss.sum(), counted.sum())


def _to_output(loss: torch.Tensor, logits: torch.Tensor, reduction: str) -> torch.Tensor:
    """Row losses back to the target's shape (reduction='none'), in the logits' dtype."""
    loss = loss.reshape(logits.shape[:-1]) if reduction == "none" else loss
    return loss.to(logits.dtype)


def cross_entropy_output(logits, nll, smooth, lse, counted, w_y, *, reduction, label_smoothing,
                         lse_square_scale, return_lse):
    """The public result of cross_entropy from its per-row parts: the loss, or (loss, lse) with return_lse."""
    loss = combine_cross_entropy(
        nll, smooth, lse, counted, w_y, num_classes=logits.shape[-1], reduction=reduction,
        label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
    )
    loss = _to_output(loss, logits, reduction)
    return (loss, lse.reshape(logits.shape[:-1])) if return_lse else loss


def prob_cross_entropy_output(logits, target, nll, smooth, lse, *, weight, reduction, label_smoothing,
                              lse_square_scale, return_lse):
    """cross_entropy with probability targets from its per-row parts, as torch computes it: per row
    (1 - eps) nll + (eps / C) smooth + lam lse^2 with nll = sum_k w_k t_k (lse - z_k); "mean" divides by the
    number of rows (not by a weight sum); the loss in torch's promoted dtype of logits, target and weight."""
    eps, lam = float(label_smoothing), float(lse_square_scale)
    loss = nll if eps == 0 else (1.0 - eps) * nll + (eps / logits.shape[-1]) * smooth
    if lam:
        loss = loss + lam * lse.square()
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / loss.shape[0]  # NaN over no rows, like torch
    else:
        loss = loss.reshape(logits.shape[:-1])
    out_dtype = torch.promote_types(logits.dtype, target.dtype)
    if weight is not None:  # torch forms input * target * weight
        out_dtype = torch.promote_types(out_dtype, weight.dtype)
    loss = loss.to(out_dtype)
    return (loss, lse.reshape(logits.shape[:-1])) if return_lse else loss


def row_loss_output(logits, rows, counted, reduction):
    """The public result of a per-row loss (zloss and the other spherical losses)."""
    return _to_output(reduce_rows(rows, counted, reduction), logits, reduction)


# ---------------------------------------------------------------------------------------------- stable softmax


def weighted_row_output(logits, rows, counted, w_y, reduction):
    """Per-row losses with optional class weights w_y (0 on uncounted rows): none / sum / mean, where the mean
    divides by sum(w_y) over counted rows (their count without weights), as torch's cross-entropy does."""
    if w_y is None:
        return row_loss_output(logits, rows, counted, reduction)
    rows = rows * w_y.to(rows.dtype)
    loss = rows.sum() / w_y.to(rows.dtype).sum() if reduction == "mean" else reduce_rows(rows, counted, reduction)
    return _to_output(loss, logits, reduction)


def comp_sum_from_nll(nll: torch.Tensor, tau: float) -> torch.Tensor:
    """Comp-sum loss Phi_tau(u) with 1 + u = 1 / p_y = exp(nll): nll for tau = 1, else
    (1 - p_y^(tau-1)) / (tau - 1).

    The value is -expm1(-(tau - 1) nll) / (tau - 1), which keeps tiny losses exact. The gradient is taken from
    the plain form (1 - e) / (tau - 1), e = exp(-(tau - 1) nll), whose derivative e is accurate: torch's expm1
    backward forms expm1(x) + 1, which cancels when p_y^(tau-1) is tiny (a 6 % error at p_y^0.5 = 4e-7 in
    float32). The two forms are equal, so the detached difference changes no derivative of any order."""
    q = float(tau) - 1.0
    if q == 0.0:
        return nll
    plain = (1.0 - torch.exp(-q * nll)) / q
    exact = -torch.expm1(-q * nll) / q
    return plain + (exact - plain).detach()
