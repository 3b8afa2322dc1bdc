"""Pure-PyTorch twins of every fastloss function: the CPU fallback and the test oracle.

Same signatures and the same maths as the fused kernels (rest-mass log-sum-exp, shifted statistics), written
for clarity with ordinary differentiable torch ops; float64 inputs are computed in float64, everything else
in float32.
"""

from __future__ import annotations

import torch

from . import _validation as V
from ._reduce import cross_entropy_output, gather_class_weight, row_loss_output


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _flat_rows(fn, logits, target, ignore_index):
    """(x, t, counted, safe_t): logits as (N, C) in the accumulation type, flat targets, the rows that count,
    and targets with ignored rows pointed at class 0 (safe to gather)."""
    V.check_target_range(fn, target, logits.shape[-1], ignore_index)
    x = logits.reshape(-1, logits.shape[-1]).to(_acc_dtype(logits))
    t = target.reshape(-1).long()
    counted = t != ignore_index
    return x, t, counted, torch.where(counted, t, torch.zeros_like(t))


def _premap(x: torch.Tensor, logit_scale: float, softcap: float | None) -> torch.Tensor:
    z = x * logit_scale if logit_scale != 1.0 else x
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def log_sum_exp_rest(z: torch.Tensor):
    """(m, rest, top) per row with lse = m + log1p(rest + top).

    m is the detached row maximum, rest = sum of exp(z_k - m) over all but the argmax, and top =
    expm1(z_argmax - m), which is 0 in value but carries the argmax's gradient. log1p(rest) keeps the
    Softmax-Collapse digits that fl(1 + rest) would lose.
    """
    m = z.detach().amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    idx = z.detach().argmax(-1, keepdim=True)
    e = torch.exp(z - m)
    rest = e.scatter(-1, idx, 0.0).sum(-1)
    top = torch.expm1(z.gather(-1, idx) - m).squeeze(-1)
    return m.squeeze(-1), rest, top


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
    """Reference of :func:`fastloss.cross_entropy` (same arguments and results)."""
    fn = "fastloss.reference.cross_entropy"
    label_smoothing, lse_square_scale, logit_scale, softcap, target_margin = V.check_cross_entropy_args(
        fn, logits, target, weight=weight, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, logit_scale=logit_scale,
        softcap=softcap, target_margin=target_margin,
    )
    C = logits.shape[-1]
    x, t, counted, safe_t = _flat_rows(fn, logits, target, ignore_index)
    acc = x.dtype
    z = _premap(x, logit_scale, softcap)
    if isinstance(target_margin, torch.Tensor):
        margin_y = target_margin.to(acc)[safe_t]
    else:
        margin_y = torch.full_like(safe_t, float(target_margin), dtype=acc)
    margin_y = torch.where(counted, margin_y, torch.zeros_like(margin_y))
    z = z - torch.nn.functional.one_hot(safe_t, C).to(acc) * margin_y[:, None]

    m, rest, top = log_sum_exp_rest(z)
    lse = m + torch.log1p(rest + top)
    z_y = z.gather(-1, safe_t[:, None]).squeeze(-1)
    w = weight.to(acc) if weight is not None else None
    w_y = gather_class_weight(w, safe_t, counted, C)
    zero = torch.zeros((), dtype=acc, device=x.device)
    nll = torch.where(counted, (m - z_y) + torch.log1p(rest + top), zero)
    if w_y is not None:
        nll = nll * w_y
    if label_smoothing:
        per_class = lse[:, None] - z
        smooth = (per_class * w).sum(-1) if w is not None else per_class.sum(-1)
        smooth = torch.where(counted, smooth, zero)
    else:
        smooth = torch.zeros_like(nll)
    return cross_entropy_output(
        logits, nll, smooth, lse, counted, w_y, reduction=reduction, label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale, return_lse=return_lse,
    )


def zloss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    a: float = 1.0,
    b: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
):
    """Reference of :func:`fastloss.zloss`: softplus(a (b - z_c)) / a with z = (o - mean) / std per row.

    A constant row (std = 0) has z = 0, loss softplus(a b) / a and gradient 0.
    """
    fn = "fastloss.reference.zloss"
    a, b = V.check_zloss_args(fn, logits, target, a=a, b=b, ignore_index=ignore_index, reduction=reduction)
    x, t, counted, safe_t = _flat_rows(fn, logits, target, ignore_index)
    acc = x.dtype
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).square().mean(-1, keepdim=True)
    flat = var == 0
    sigma = torch.sqrt(torch.where(flat, torch.ones_like(var), var))
    zc = ((x.gather(-1, safe_t[:, None]) - mu) / sigma).masked_fill(flat, 0.0).squeeze(-1)
    u = a * (b - zc)
    loss = (u.clamp(min=0) + torch.log1p(torch.exp(-u.abs()))) / a
    loss = torch.where(counted, loss, torch.zeros((), dtype=acc, device=x.device))
    return row_loss_output(logits, loss, counted, reduction)


# ---------------------------------------------------------------------------------------------- stable softmax
# Additive normalisers p_k = phi(z_k) / sum_j phi(z_j) (StableMax, Taylor, softplus), comp-sum / GCE and the
# multi-label losses (ZLPR, decoupled softmax). -inf logits are masked classes (phi = 0) for every kind.

from ._reduce import comp_sum_from_nll, weighted_row_output  # noqa: E402


def _softplus(z):
    return z.clamp(min=0) + torch.log1p(torch.exp(-z.abs()))


def _taylor(z, n):
    p = torch.ones_like(z)
    for i in range(n, 0, -1):
        p = z * (p / i) + 1.0
    return p


def _phi(kind, z, order):
    if kind == "stablemax":
        return torch.where(z >= 0, z + 1.0, 1.0 / (1.0 - z.clamp(max=0)))
    if kind == "taylor":
        masked = z == float("-inf")
        return torch.where(masked, torch.zeros_like(z), _taylor(torch.where(masked, torch.zeros_like(z), z), order))
    return _softplus(z)


def _log_phi(kind, z, order):
    if kind == "stablemax":  # sign(z) log1p|z|
        return torch.where(z >= 0, torch.log1p(z.clamp(min=0)), -torch.log1p(-z.clamp(max=0)))
    if kind == "taylor":
        return torch.log(_phi(kind, z, order))
    return torch.where(z < -20, z - 0.5 * torch.exp(z.clamp(max=-20)), torch.log(_softplus(z.clamp(min=-20))))


def additive_rows(fn, kind, logits, target, *, order=2, scale=1.0, margin=0.0, ignore_index=-100):
    """Per-row -log p_y (0 on ignored rows) and the counted mask; the rest mass sum_{k != y} phi(z_k) is kept
    apart from phi(z_y) so that log1p(rest / phi_y) keeps a tiny loss exact."""
    x, t, counted, safe_t = _flat_rows(fn, logits, target, ignore_index)
    z = x * scale if scale != 1.0 else x
    C = z.shape[-1]
    onehot = torch.nn.functional.one_hot(safe_t, C).bool()
    z_y = z.gather(-1, safe_t[:, None]).squeeze(-1) - margin
    rest = _phi(kind, z.masked_fill(onehot, float("-inf")), order).sum(-1)
    phi_y = _phi(kind, z_y, order)
    big = (phi_y >= rest) & (phi_y > 0)
    small_loss = torch.log1p(rest / torch.where(big, phi_y, torch.ones_like(phi_y)))
    large_loss = torch.log(rest + phi_y) - _log_phi(kind, z_y, order)
    loss = torch.where(big, small_loss, large_loss)
    keep = counted & (C > 1)  # C = 1: p_y = 1 even where phi_y underflows
    return torch.where(keep, loss, torch.zeros_like(loss)), t, counted


def _single_label_output(fn, logits, target, rows, t, counted, weight, reduction):
    w = weight.to(rows.dtype) if weight is not None else None
    w_y = gather_class_weight(w, t, counted, logits.shape[-1])
    return weighted_row_output(logits, rows, counted, w_y, reduction)


def stablemax_cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean"):
    """Reference of :func:`fastloss.stablemax_cross_entropy`."""
    fn = "fastloss.reference.stablemax_cross_entropy"
    V.check_single_label_args(fn, logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction)
    rows, t, counted = additive_rows(fn, "stablemax", logits, target, ignore_index=ignore_index)
    return _single_label_output(fn, logits, target, rows, t, counted, weight, reduction)


def taylor_softmax_loss(logits, target, *, order=2, margin=0.0, weight=None, ignore_index=-100, reduction="mean"):
    """Reference of :func:`fastloss.taylor_softmax_loss`."""
    fn = "fastloss.reference.taylor_softmax_loss"
    V.check_single_label_args(fn, logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction)
    order = V.check_taylor_order(fn, order)
    margin = V.check_finite(fn, "margin", margin)
    rows, t, counted = additive_rows(fn, "taylor", logits, target, order=order, margin=margin,
                                     ignore_index=ignore_index)
    return _single_label_output(fn, logits, target, rows, t, counted, weight, reduction)


def softplus_cross_entropy(logits, target, *, scale=1.0, weight=None, ignore_index=-100, reduction="mean"):
    """Reference of :func:`fastloss.softplus_cross_entropy`."""
    fn = "fastloss.reference.softplus_cross_entropy"
    V.check_single_label_args(fn, logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction)
    scale = V.check_finite(fn, "scale", scale, positive=True)
    rows, t, counted = additive_rows(fn, "softplus", logits, target, scale=scale, ignore_index=ignore_index)
    return _single_label_output(fn, logits, target, rows, t, counted, weight, reduction)


def comp_sum_loss(logits, target, *, tau, weight=None, ignore_index=-100, reduction="mean"):
    """Reference of :func:`fastloss.comp_sum_loss`: Phi_tau of the rest-mass cross-entropy -log p_y."""
    fn = "fastloss.reference.comp_sum_loss"
    V.check_single_label_args(fn, logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction)
    tau = V.check_finite(fn, "tau", tau, nonnegative=True)
    x, t, counted, safe_t = _flat_rows(fn, logits, target, ignore_index)
    m, rest, top = log_sum_exp_rest(x)
    nll = (m - x.gather(-1, safe_t[:, None]).squeeze(-1)) + torch.log1p(rest + top)
    rows = torch.where(counted, comp_sum_from_nll(nll, tau), torch.zeros_like(nll))
    return _single_label_output(fn, logits, target, rows, t, counted, weight, reduction)


def generalized_cross_entropy(logits, target, *, q, weight=None, ignore_index=-100, reduction="mean"):
    """Reference of :func:`fastloss.generalized_cross_entropy`: (1 - p_y^q) / q = comp-sum with tau = 1 + q."""
    fn = "fastloss.reference.generalized_cross_entropy"
    q = V.check_finite(fn, "q", q, positive=True)
    if q > 1:
        raise ValueError(f"{fn}: q must be in (0, 1], got {q}")
    return comp_sum_loss(logits, target, tau=1.0 + q, weight=weight, ignore_index=ignore_index, reduction=reduction)


def multilabel_mask(fn, logits, targets, ignore_index):
    """(mask (N, C) bool, bad_rows (N,) bool or None) from a bool mask or padded index lists (N, K).

    Index lists: ignore_index entries are padding, repeats count once. An index outside [0, C) raises
    IndexError on CPU (and on CUDA with fastloss.set_validation(True)) in eager mode; otherwise (and under
    torch.compile) its row is reported in bad_rows (the caller makes that row's loss NaN) without a host sync."""
    C = logits.shape[-1]
    if targets.dtype == torch.bool:
        return targets.reshape(-1, C), None
    idx = targets.reshape(-1, targets.shape[-1]).long()
    valid = idx != ignore_index
    in_range = (idx >= 0) & (idx < C)
    bad = valid & ~in_range
    # The eager check syncs; under torch.compile the NaN-row path keeps the graph whole.
    if (logits.device.type == "cpu" or V.get_validation()) and not torch.compiler.is_compiling():
        if bool(bad.any()):
            pos = int(bad.reshape(-1).nonzero()[0, 0])
            raise IndexError(
                f"{fn}: target index {int(idx.reshape(-1)[pos])} at flat position {pos} is out of bounds for "
                f"{C} classes (and is not ignore_index={ignore_index})"
            )
    # One spare column takes the padding, so every scatter writes True (no write conflicts).
    safe = torch.where(valid & in_range, idx, torch.full_like(idx, C))
    mask = torch.zeros(idx.shape[0], C + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(1, safe, True)
    return mask[:, :C], bad.any(1)


def _lse_rows(s, mask_out):
    """log sum exp over the unmasked entries of each row (-inf where none), NaN-free gradients."""
    has = (~mask_out).any(-1)
    z = torch.where(has[:, None], s.masked_fill(mask_out, float("-inf")), torch.zeros_like(s))
    lse = torch.logsumexp(z, -1)
    return torch.where(has, lse, torch.full_like(lse, float("-inf")))


def _multilabel_output(logits, rows, counted, bad, reduction):
    if bad is not None:
        rows = torch.where(bad, torch.full_like(rows, float("nan")), rows)
    return row_loss_output(logits, rows, counted, reduction)


def zlpr_loss(logits, targets, *, margin=0.0, scale=1.0, ignore_index=-100, reduction="mean"):
    """Reference of :func:`fastloss.zlpr_loss`."""
    fn = "fastloss.reference.zlpr_loss"
    V.check_multilabel_args(fn, logits, targets, ignore_index=ignore_index, reduction=reduction)
    margin = V.check_finite(fn, "margin", margin)
    scale = V.check_finite(fn, "scale", scale, positive=True)
    mask, bad = multilabel_mask(fn, logits, targets, ignore_index)
    x = logits.reshape(-1, logits.shape[-1]).to(_acc_dtype(logits))
    zero = torch.zeros_like(x[:, :1])
    neg = torch.cat([zero, (scale * (x + margin)).masked_fill(mask, float("-inf"))], 1).logsumexp(-1)
    pos = torch.cat([zero, (-scale * (x - margin)).masked_fill(~mask, float("-inf"))], 1).logsumexp(-1)
    counted = torch.ones_like(neg, dtype=torch.bool)
    return _multilabel_output(logits, neg + pos, counted, bad, reduction)


def decoupled_softmax_loss(logits, targets, *, scale=1.0, ignore_index=-100, reduction="mean"):
    """Reference of :func:`fastloss.decoupled_softmax_loss`."""
    fn = "fastloss.reference.decoupled_softmax_loss"
    V.check_multilabel_args(fn, logits, targets, ignore_index=ignore_index, reduction=reduction)
    scale = V.check_finite(fn, "scale", scale, positive=True)
    mask, bad = multilabel_mask(fn, logits, targets, ignore_index)
    s = scale * logits.reshape(-1, logits.shape[-1]).to(_acc_dtype(logits))
    lse_n = _lse_rows(s, mask)
    per_pos = torch.where(mask, _softplus(lse_n[:, None] - s), torch.zeros_like(s))
    count = mask.sum(-1)
    rows = per_pos.sum(-1) / count.clamp(min=1).to(s.dtype)
    return _multilabel_output(logits, rows, count > 0, bad, reduction)
