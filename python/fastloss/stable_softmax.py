"""Stable softmax variants on the row engine: StableMax, Taylor and softplus normalisers (one additive-state
kernel), comp-sum / generalized cross-entropy (the exponential cross-entropy kernel plus a per-row map), the
multi-label ZLPR and decoupled-softmax losses (one two-state log-sum-exp kernel), and the Softmax Collapse
diagnostics.

Every function has a twin of the same name in :mod:`fastloss.reference`.
"""

from __future__ import annotations

import torch

from . import _ops, reference
from . import _validation as V
from ._reduce import comp_sum_from_nll, gather_class_weight, row_loss_output, weighted_row_output

# Kind codes of the ops (fastloss/stable_softmax.h: AddKind, MlKind).
_ADD_KIND = {"stablemax": 0, "taylor": 1, "softplus": 2}
_ML_KIND = {"zlpr": 0, "dexml": 1}


def _rows(logits: torch.Tensor, target: torch.Tensor):
    C = logits.shape[-1]
    x = logits.reshape(-1, C)
    if x.stride(-1) != 1 and C > 1:
        x = x.contiguous()
    return x, target.reshape(-1).long()


def _additive(fn, kind, logits, target, *, weight, ignore_index, reduction, order=2, scale=1.0, margin=0.0):
    if V.get_validation():
        V.check_target_range(fn, target, logits.shape[-1], ignore_index)
    x, t = _rows(logits, target)
    rows, _ = torch.ops.fastloss.additive_row_fwd(x, t, _ADD_KIND[kind], order, scale, margin, ignore_index)
    counted = t != ignore_index
    w_y = gather_class_weight(weight.to(rows.dtype) if weight is not None else None, t, counted, logits.shape[-1])
    return weighted_row_output(logits, rows, counted, w_y, reduction)


def stablemax_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
):
    """Cross-entropy on StableMax (Prieto et al., ICLR 2025, "Grokking at the edge of numerical stability").

    ``s(x) = x + 1`` for ``x >= 0`` and ``1 / (1 - x)`` for ``x < 0``; ``p_k = s(z_k) / Σ_j s(z_j)``; the loss
    is ``-log p_y``. Computed in float32 (float64 for float64 logits) with ``log s(x) = sign(x)·log1p(|x|)`` and
    the target kept out of the rest mass, ``loss = log1p(Σ_{k≠y} s(z_k) / s(z_y))``: it matches the authors'
    float64 computation to float32 rounding even at logits of 1e4 and never rounds a confident row to 0.
    StableMax is not shift-invariant; its gradient ``s'(z_k)/S − [k=y] s'(z_y)/s(z_y)`` does not sum to 0.

    ``weight`` (C,), ``ignore_index`` and ``reduction`` follow :func:`torch.nn.functional.cross_entropy`
    (weighted mean over counted rows; NaN when none is counted). ``-inf`` logits mask classes.
    """
    fn = "fastloss.stablemax_cross_entropy"
    V.check_single_label_args(fn, logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction)
    if not _ops.use_kernel("additive_row_fwd", logits.device):
        return reference.stablemax_cross_entropy(logits, target, weight=weight, ignore_index=ignore_index,
                                                 reduction=reduction)
    return _additive(fn, "stablemax", logits, target, weight=weight, ignore_index=ignore_index,
                     reduction=reduction)


def _taylor_additive(fn, logits, target, *, order, margin, weight, ignore_index, reduction):
    """The additive-engine path of taylor_softmax_loss (any even order, class-index targets)."""
    if not _ops.use_kernel("additive_row_fwd", logits.device):
        return reference.taylor_softmax_loss(logits, target, order=order, margin=margin, weight=weight,
                                             ignore_index=ignore_index, reduction=reduction)
    return _additive(fn, "taylor", logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                     order=order, margin=margin)


def taylor_softmax_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    order: int = 2,
    margin: float = 0.0,
    weight: torch.Tensor | None = None,
    target_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
):
    """Taylor-softmax cross-entropy (de Brébisson & Vincent 2016; Banerjee et al. 2020) of even ``order`` n in
    2..10: ``p_k = t_n(z_k) / Σ_j t_n(z_j)`` with ``t_n(x) = Σ_{i≤n} xⁱ/i!`` (positive for even n), loss
    ``-log p_y``. ``margin=m`` gives SM-Taylor: the target's ``t_n`` is evaluated at ``z_y − m`` (in the
    numerator and in the sum). Order 2 is the spherical member, ``1 + z + z²/2``.

    Not shift-invariant; the polynomial overflows float32 near ``|z| ≈ 2.6e19`` for n = 2 and ``3e4`` for n = 10.
    ``-inf`` logits are masked classes (they contribute nothing, although ``t_n(−∞) = ∞``). ``weight``,
    ``ignore_index``, ``reduction``: as :func:`fastloss.stablemax_cross_entropy`.

    Several targets per row (order 2, the spherical member): ``target`` of shape ``(..., K)`` padded with
    ``ignore_index`` and/or ``target_weight``, as in :mod:`fastloss.spherical` (the loss averages the per-target
    terms with the weights); this runs on the spherical-statistics kernel, where ``-inf`` logits are not masks.
    """
    fn = "fastloss.taylor_softmax_loss"
    multi = isinstance(target, torch.Tensor) and isinstance(logits, torch.Tensor) and target.dim() == logits.dim()
    if multi or target_weight is not None:
        if order != 2 or margin != 0.0 or weight is not None:
            raise ValueError(f"{fn}: (..., K) targets and target_weight are for order=2 without margin or weight "
                             f"(the spherical member); got order={order!r}, margin={margin!r}, "
                             f"weight={'set' if weight is not None else None}")
        from .spherical import TAYLOR_SOFTMAX, spherical_call

        return spherical_call(fn, TAYLOR_SOFTMAX, logits, target, target_weight, ignore_index=ignore_index,
                              reduction=reduction)
    V.check_single_label_args(fn, logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction)
    order = V.check_taylor_order(fn, order)
    margin = V.check_finite(fn, "margin", margin)
    return _taylor_additive(fn, logits, target, order=order, margin=margin, weight=weight,
                            ignore_index=ignore_index, reduction=reduction)


def softplus_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    scale: float = 1.0,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
):
    """Cross-entropy on the softplus normaliser ``p_k = softplus(λ z_k) / Σ_j softplus(λ z_j)`` (λ = ``scale``
    > 0; Gao & Spratling 2025 use it in attention), loss ``-log p_y``. The softplus is overflow-safe
    (``max(t, 0) + log1p(e^{−|t|})``) and ``log softplus(t)`` is taken as ``t − e^t/2`` for ``t < −20``, so
    very negative target logits give a finite loss. ``weight``, ``ignore_index``, ``reduction``: as
    :func:`fastloss.stablemax_cross_entropy`. If every ``λ z`` is below about −87 (float32) the normaliser
    underflows to 0 and the loss is not finite.
    """
    fn = "fastloss.softplus_cross_entropy"
    V.check_single_label_args(fn, logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction)
    scale = V.check_finite(fn, "scale", scale, positive=True)
    if not _ops.use_kernel("additive_row_fwd", logits.device):
        return reference.softplus_cross_entropy(logits, target, scale=scale, weight=weight,
                                                ignore_index=ignore_index, reduction=reduction)
    return _additive(fn, "softplus", logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                     scale=scale)


def _comp_sum(fn, logits, target, tau, weight, ignore_index, reduction):
    if V.get_validation():
        V.check_target_range(fn, target, logits.shape[-1], ignore_index)
    x, t = _rows(logits, target)
    # The exponential (rest-mass log-sum-exp) cross-entropy kernel gives nll = -log p_y exactly; comp-sum is a
    # per-row function of it, so its gradient p_y^(tau-1) (p - e_y) flows through the CE backward.
    parts, _ = torch.ops.fastloss.cross_entropy_fwd(x, t, None, None, 0.0, 1.0, 0.0, ignore_index, False)
    rows = comp_sum_from_nll(parts[:, 0], tau)
    counted = t != ignore_index
    w_y = gather_class_weight(weight.to(rows.dtype) if weight is not None else None, t, counted, logits.shape[-1])
    return weighted_row_output(logits, rows, counted, w_y, reduction)


def comp_sum_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    tau: float,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
):
    """Comp-sum losses (Mao, Mohri & Zhong, ICML 2023). With ``u = Σ_{k≠y} e^{z_k − z_y}`` (so ``1 + u = 1/p_y``):
    ``log(1 + u)`` for τ = 1 (cross-entropy), else ``((1 + u)^{1−τ} − 1)/(1 − τ)``; τ = 0 is the
    sum-exponential loss, τ ∈ (1, 2) generalized cross-entropy with q = τ − 1, τ = 2 the mean absolute error
    ``1 − p_y``. Computed in log space as ``−expm1(−(τ−1)·(−log p_y))/(τ−1)`` from the rest-mass
    log-sum-exp, so small losses keep their digits; gradient ``p_y^{τ−1}(p − e_y)``. ``tau >= 0``.
    ``weight``, ``ignore_index``, ``reduction``: as :func:`fastloss.stablemax_cross_entropy`.
    """
    fn = "fastloss.comp_sum_loss"
    V.check_single_label_args(fn, logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction)
    tau = V.check_finite(fn, "tau", tau, nonnegative=True)
    if not _ops.use_kernel("cross_entropy_fwd", logits.device):
        return reference.comp_sum_loss(logits, target, tau=tau, weight=weight, ignore_index=ignore_index,
                                       reduction=reduction)
    return _comp_sum(fn, logits, target, tau, weight, ignore_index, reduction)


def generalized_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    q: float,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
):
    """Generalized cross-entropy (Zhang & Sabuncu, NeurIPS 2018): ``(1 − p_y^q)/q`` for q in (0, 1]; q → 0 is
    cross-entropy, q = 1 the MAE ``1 − p_y``. Same kernel and numerics as :func:`fastloss.comp_sum_loss` with
    τ = 1 + q."""
    fn = "fastloss.generalized_cross_entropy"
    V.check_single_label_args(fn, logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction)
    q = V.check_finite(fn, "q", q, positive=True)
    if q > 1:
        raise ValueError(f"{fn}: q must be in (0, 1], got {q}")
    if not _ops.use_kernel("cross_entropy_fwd", logits.device):
        return reference.generalized_cross_entropy(logits, target, q=q, weight=weight, ignore_index=ignore_index,
                                                   reduction=reduction)
    return _comp_sum(fn, logits, target, 1.0 + q, weight, ignore_index, reduction)


def _multilabel(fn, kind, logits, targets, *, scale, margin, ignore_index, reduction):
    mask, bad = reference.multilabel_mask(fn, logits, targets, ignore_index)
    C = logits.shape[-1]
    x = logits.reshape(-1, C)
    if x.stride(-1) != 1 and C > 1:
        x = x.contiguous()
    if mask.stride(-1) != 1 and C > 1:
        mask = mask.contiguous()
    rows, stats = torch.ops.fastloss.multilabel_row_fwd(x, mask, _ML_KIND[kind], scale, margin)
    if bad is not None:
        rows = torch.where(bad, torch.full_like(rows, float("nan")), rows)
    counted = stats[:, 3] > 0 if kind == "dexml" else torch.ones_like(rows, dtype=torch.bool)
    return row_loss_output(logits, rows, counted, reduction)


def zlpr_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    margin: float = 0.0,
    scale: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
):
    """Multi-label ZLPR loss (Su 2020; Su et al. 2022), the form MLCD uses:
    ``log(1 + Σ_{n∉P} e^{s_n}) + log(1 + Σ_{p∈P} e^{−s_p})`` with ``s_p = scale·(z_p − margin)`` and
    ``s_n = scale·(z_n + margin)``; the decision threshold is 0. The "1 +" is an implicit zero logit, no
    sentinel values are used, and both sums are online log-sum-exps (no overflow).

    ``targets``: a bool mask shaped like ``logits``, or padded class lists ``(..., K)`` whose ``ignore_index``
    entries are padding (repeats count once). Rows without positives are counted (their loss is the negatives'
    term). ``reduction="mean"`` averages over rows.
    """
    fn = "fastloss.zlpr_loss"
    V.check_multilabel_args(fn, logits, targets, ignore_index=ignore_index, reduction=reduction)
    margin = V.check_finite(fn, "margin", margin)
    scale = V.check_finite(fn, "scale", scale, positive=True)
    if not _ops.use_kernel("multilabel_row_fwd", logits.device):
        return reference.zlpr_loss(logits, targets, margin=margin, scale=scale, ignore_index=ignore_index,
                                   reduction=reduction)
    return _multilabel(fn, "zlpr", logits, targets, scale=scale, margin=margin, ignore_index=ignore_index,
                       reduction=reduction)


def decoupled_softmax_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    scale: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
):
    """Decoupled softmax loss of DEXML (Gupta et al., ICLR 2024): each positive competes only with the
    negatives, ``−(1/|P|) Σ_{p∈P} [s_p − log(e^{s_p} + Σ_{n∉P} e^{s_n})]`` with ``s = scale·z``, computed as
    ``(1/|P|) Σ_p softplus(lse_N − s_p)`` from one online log-sum-exp over the negatives (no −100 sentinel).

    ``targets``: as :func:`fastloss.zlpr_loss`. **Rows without positives** have loss 0 and are left out of
    ``reduction="mean"`` (NaN if no row has a positive); a row without negatives has loss 0.
    """
    fn = "fastloss.decoupled_softmax_loss"
    V.check_multilabel_args(fn, logits, targets, ignore_index=ignore_index, reduction=reduction)
    scale = V.check_finite(fn, "scale", scale, positive=True)
    if not _ops.use_kernel("multilabel_row_fwd", logits.device):
        return reference.decoupled_softmax_loss(logits, targets, scale=scale, ignore_index=ignore_index,
                                                reduction=reduction)
    return _multilabel(fn, "dexml", logits, targets, scale=scale, margin=0.0, ignore_index=ignore_index,
                       reduction=reduction)


@torch.no_grad()
def softmax_collapse_stats(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100) -> dict:
    """Softmax Collapse diagnostics of Prieto et al. (2025) over the rows whose target is not ignore_index.

    * ``softmax_collapse``: fraction of rows whose float32 softmax normaliser ``Σ_k exp(z_k − max)`` rounds to
      exactly 1 (the paper's ``softmax_collapse``),
    * ``zero_loss``: fraction whose float32 ``torch.nn.functional.cross_entropy`` is exactly 0 (``zero_terms``),
    * ``fastloss_zero_loss``: the same for :func:`fastloss.cross_entropy` (stays near 0: the rest mass is kept
      apart from the maximum, so only rows with ``Σ_{k≠y} e^{z_k−z_y}`` below float32's smallest normal collapse),
    * ``stablemax_zero_loss``: the same for :func:`fastloss.stablemax_cross_entropy`,
    * ``rows``: the number of rows counted.

    A diagnostic for logging (it returns Python floats, so it synchronises with the device).
    """
    fn = "fastloss.softmax_collapse_stats"
    V.check_logits_target(fn, logits, target)
    V.check_ignore_index(fn, ignore_index)
    C = logits.shape[-1]
    x = logits.reshape(-1, C).float()
    t = target.reshape(-1).long()
    keep = t != ignore_index
    x, t = x[keep], t[keep]
    n = x.shape[0]
    if n == 0:
        nan = float("nan")
        return {"rows": 0, "softmax_collapse": nan, "zero_loss": nan, "fastloss_zero_loss": nan,
                "stablemax_zero_loss": nan}
    V.check_target_range(fn, t, C, ignore_index)
    normaliser = torch.exp(x - x.amax(-1, keepdim=True)).sum(-1)
    torch_loss = torch.nn.functional.cross_entropy(x, t, reduction="none")
    from .functional import cross_entropy

    fl_loss = cross_entropy(x, t, reduction="none")
    sm_loss = stablemax_cross_entropy(x, t, reduction="none")
    frac = lambda b: float(b.float().mean())  # noqa: E731
    return {
        "rows": n,
        "softmax_collapse": frac(normaliser == 1.0),
        "zero_loss": frac(torch_loss == 0),
        "fastloss_zero_loss": frac(fl_loss == 0),
        "stablemax_zero_loss": frac(sm_loss == 0),
    }
