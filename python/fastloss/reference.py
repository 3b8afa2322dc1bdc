"""Pure-PyTorch twins of every fastloss function: the CPU fallback and the test oracle.

Same signatures and the same maths as the fused kernels (rest-mass log-sum-exp, shifted statistics), written
for clarity with ordinary differentiable torch ops; float64 inputs are computed in float64, everything else
in float32.
"""

from __future__ import annotations

import torch

from . import _validation as V
from ._reduce import cross_entropy_output, gather_class_weight, prob_cross_entropy_output, row_loss_output


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
    if V.is_prob_target(target):
        return _prob_cross_entropy(logits, target, weight, reduction, label_smoothing, lse_square_scale, softcap,
                                   logit_scale, return_lse)
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


def _prob_cross_entropy(logits, target, weight, reduction, label_smoothing, lse_square_scale, softcap, logit_scale,
                        return_lse):
    """cross_entropy with probability targets: sum_k w_k t'_k (lse - z_k), t' = (1 - eps) t + eps / C, split into
    the parts the kernels return. A class with w_k t_k = 0 adds 0, also where z_k = -inf (torch: NaN)."""
    C = logits.shape[-1]
    x = logits.reshape(-1, C).to(_acc_dtype(logits))
    t = target.reshape(-1, C).to(x.dtype)
    z = _premap(x, logit_scale, softcap)
    m, rest, top = log_sum_exp_rest(z)
    lse = m + torch.log1p(rest + top)
    w = weight.to(x.dtype) if weight is not None else None
    u = t * w if w is not None else t
    per_class = lse[:, None] - z
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    # a masked class (z = -inf) drops out of the sum (its target's gradient is 0), unless it holds target mass
    masked = z == float("-inf")
    nll = (u * torch.where(masked, zero, per_class)).sum(-1)
    nll = nll + torch.where(masked & (u != 0), u.detach() * float("inf"), zero).sum(-1)
    if label_smoothing:
        smooth = (per_class * w).sum(-1) if w is not None else per_class.sum(-1)
    else:
        smooth = torch.zeros_like(nll)
    return prob_cross_entropy_output(
        logits, target, nll, smooth, lse, weight=weight, reduction=reduction, label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale, return_lse=return_lse,
    )


# ------------------------------------------------------------------------------------------ spherical family

def spherical_loss(kind, logits, target, target_weight=None, *, a=1.0, b=0.0, eps=0.0, ignore_index=-100,
                   reduction="mean"):
    """Materialised spherical-family loss (kind 0 Z-loss, 1 spherical softmax, 2 log-Taylor, 3 squared error),
    straight from the definitions; targets (...) or (..., K) with optional weights."""
    fn = "fastloss.reference.spherical_loss"
    multi = V.check_spherical_args(fn, logits, target, target_weight, ignore_index=ignore_index,
                                   reduction=reduction)
    V.check_target_range(fn, target, logits.shape[-1], ignore_index)
    C = logits.shape[-1]
    x = logits.reshape(-1, C).to(_acc_dtype(logits))
    K = target.shape[-1] if multi else 1
    t = target.reshape(-1, K).long()
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))
    w = target_weight.reshape(-1, K).to(x.dtype) if target_weight is not None else torch.ones_like(t, dtype=x.dtype)
    w = torch.where(valid, w, torch.zeros_like(w))
    counted = valid.any(-1)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    oc = x.gather(-1, safe)
    if kind == 3:  # squared error to y = sum_j w_j e_{c_j}
        y = torch.zeros_like(x).scatter_add(-1, safe, w)
        rows = (x - y).square().sum(-1)
    else:
        if kind == 0:
            # about the row's first value, as the kernels do: a constant row is then exactly 0, not a
            # mean's last bit away from it (a variance ~1e-34 would make its z-scores garbage)
            x0 = x[..., :1]
            xs, oc = x - x0, oc - x0
            mu = xs.mean(-1, keepdim=True)
            var = (xs - mu).square().mean(-1, keepdim=True)
            flat = var == 0
            sigma = torch.sqrt(torch.where(flat, torch.ones_like(var), var))
            u = a * (b - ((oc - mu) / sigma).masked_fill(flat, 0.0))
            terms = _softplus(u) / a
        elif kind == 1:
            terms = torch.log((x.square() + eps).sum(-1, keepdim=True)) - torch.log(oc.square() + eps)
        else:
            def taylor(v):
                return 1 + v + v.square() / 2
            terms = torch.log(taylor(x).sum(-1, keepdim=True)) - torch.log(taylor(oc))
        wsum = w.sum(-1)
        rows = (w * terms).sum(-1) / torch.where(wsum == 0, torch.ones_like(wsum), wsum)
        rows = torch.where(wsum == 0, zero, rows)
    rows = torch.where(counted, rows, zero)
    return row_loss_output(logits, rows, counted, reduction)


def zloss(logits, target, *, a=1.0, b=0.0, target_weight=None, ignore_index=-100, reduction="mean"):
    """Reference of :func:`fastloss.zloss`: softplus(a (b - z_c)) / a with z = (o - mean) / std per row.

    A constant row (std = 0) has z = 0, loss softplus(a b) / a and gradient 0.
    """
    a, b = V.check_zloss_args("fastloss.reference.zloss", a, b)
    return spherical_loss(0, logits, target, target_weight, a=a, b=b, ignore_index=ignore_index,
                          reduction=reduction)


def spherical_softmax_loss(logits, target, *, eps=1e-4, target_weight=None, ignore_index=-100, reduction="mean"):
    """Reference of :func:`fastloss.spherical_softmax_loss`."""
    eps = V.check_finite("fastloss.reference.spherical_softmax_loss", "eps", eps, nonnegative=True)
    return spherical_loss(1, logits, target, target_weight, eps=eps, ignore_index=ignore_index, reduction=reduction)


def spherical_mse_loss(logits, target, *, target_weight=None, ignore_index=-100, reduction="mean"):
    """Reference of :func:`fastloss.spherical_mse_loss`."""
    return spherical_loss(3, logits, target, target_weight, ignore_index=ignore_index, reduction=reduction)


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, ignore_index=-100,
                         reduction="mean", label_smoothing=0.0, lse_square_scale=0.0, softcap=None, logit_scale=1.0,
                         target_margin=0.0, return_lse=False, chunk_size=None):
    """Reference of :func:`fastloss.linear_cross_entropy`: the logits ``F.linear(input, linear_weight,
    linear_bias)`` materialised (in the input's dtype, as the fused path forms each chunk), then
    :func:`cross_entropy`. ``chunk_size`` is accepted and ignored."""
    from .linear_cross_entropy import _check_linear_args

    _check_linear_args("fastloss.reference.linear_cross_entropy", input, linear_weight, linear_bias, target)
    logits = torch.nn.functional.linear(input, linear_weight, linear_bias)
    return cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, softcap=softcap,
                         logit_scale=logit_scale, target_margin=target_margin, return_lse=return_lse)


def linear_spherical_loss(hidden, weight, target, *, bias=None, loss="zloss", a=1.0, b=0.0, eps=1e-4,
                          target_weight=None, ignore_index=-100, reduction="mean", process_group=None,
                          allow_tf32=False):
    """Reference of :func:`fastloss.linear_spherical_loss`: materialises the logits (N x V) and applies the
    spherical loss to them. Single process only."""
    from .linear_spherical import _check_linear_args

    fn = "fastloss.reference.linear_spherical_loss"
    kind, _ = _check_linear_args(fn, hidden, weight, target, bias, loss, target_weight, ignore_index, reduction)
    if process_group is not None:
        raise ValueError(f"{fn}: the reference runs in one process (process_group must be None)")
    acc = _acc_dtype(hidden)
    logits = hidden.to(acc) @ weight.to(acc).t()
    if bias is not None:
        logits = logits + bias.to(acc)
    out = spherical_loss(kind, logits, target, target_weight, a=a, b=b, eps=eps, ignore_index=ignore_index,
                         reduction=reduction)
    return out.to(hidden.dtype)


# --------------------------------------------------------------------------------------------------------------
# sparsemax family: sparsemax, entmax-1.5 and their Fenchel-Young losses (sort-based, the textbook algorithm)
# --------------------------------------------------------------------------------------------------------------


def _threshold_rows(z: torch.Tensor, entmax15: bool):
    """(p, u, empty) for rows z (N, C) of the accumulation type: p = [u - tau]_+^beta with u = (alpha - 1)(z - max),
    the support found by sorting (Martins & Astudillo 2016; Peters et al. 2019) and tau differentiable through
    the closed form on that support. Rows without a finite maximum (all -inf) are flagged `empty` (p = 0)."""
    scale = 0.5 if entmax15 else 1.0
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    empty = z.detach().amax(-1) == float("-inf")
    z = torch.where(empty[:, None], zero, z)  # finite stand-in rows: no inf * 0 in their backward
    u = scale * (z - z.detach().amax(-1, keepdim=True))
    # Masked lanes (u <= -1 can never be in the support since tau >= -1) become finite stand-ins for the sort.
    us = torch.where(u > -1, u, torch.full_like(u, -2.0)).detach()
    srt = torch.sort(us, dim=-1, descending=True).values
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    cs = srt.cumsum(-1)
    if entmax15:
        mean = cs / k
        var = (srt.square().cumsum(-1) / k - mean.square()).clamp(min=0)
        tau_k = mean - torch.sqrt((1.0 / k - var).clamp(min=0))
        ksup = (tau_k <= srt).sum(-1, keepdim=True).clamp(min=1)
    else:
        ksup = (1 + k * srt > cs).sum(-1, keepdim=True).clamp(min=1)
    supp = us >= srt.gather(-1, ksup - 1)
    n = supp.sum(-1, keepdim=True).to(z.dtype)
    u_s = torch.where(supp, u, zero)  # -inf lanes leave the graph here
    s1 = u_s.sum(-1, keepdim=True)
    if entmax15:
        mu = s1 / n
        var = torch.where(supp, (u_s - mu).square(), zero).sum(-1, keepdim=True) / n
        tau = mu - torch.sqrt((1.0 / n - var).clamp(min=0))
    else:
        tau = (s1 - 1) / n
    # [u - tau]_+ as a where, not a clamp: a lane exactly at the threshold (u == tau, frequent on a 2-byte grid)
    # is outside the support, also in the backward (clamp's gradient there changed between torch releases)
    p = torch.where(u > tau, u - tau, zero)
    p = p.square() if entmax15 else p
    p = torch.where(empty[:, None], zero, p)
    return p, u, empty


def _threshold_map(fn: str, logits: torch.Tensor, dim: int, entmax15: bool) -> torch.Tensor:
    dim = V.check_threshold_input(fn, logits, dim)
    x = logits.movedim(dim, -1)
    shape = x.shape
    p, _, _ = _threshold_rows(x.reshape(-1, shape[-1]).to(_acc_dtype(logits)), entmax15)
    return p.reshape(shape).movedim(-1, dim).to(logits.dtype)


def sparsemax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Reference of :func:`fastloss.sparsemax`: Euclidean projection of ``logits`` onto the simplex along ``dim``."""
    return _threshold_map("fastloss.reference.sparsemax", logits, dim, False)


def entmax15(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Reference of :func:`fastloss.entmax15` (alpha = 1.5 entmax along ``dim``)."""
    return _threshold_map("fastloss.reference.entmax15", logits, dim, True)


def _fy_loss(fn, logits, target, ignore_index, reduction, entmax15):
    V.check_logits_target(fn, logits, target)
    V.check_reduction(fn, reduction)
    V.check_ignore_index(fn, ignore_index)
    x, t, counted, safe_t = _flat_rows(fn, logits, target, ignore_index)
    p, u, empty = _threshold_rows(x, entmax15)
    scale, alpha = (0.5, 1.5) if entmax15 else (1.0, 2.0)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    # <p - e_y, z> + (1 - sum p^alpha) / (alpha (alpha - 1)), shift-invariant form; 0 * (-inf) never formed.
    pz = (p * torch.where(p > 0, u, zero)).sum(-1) / scale
    u_y = u.gather(-1, safe_t[:, None]).squeeze(-1) / scale
    loss = pz - u_y + (1 - p.pow(alpha).sum(-1)) / (alpha * (alpha - 1))
    loss = torch.where(empty, torch.full_like(loss, float("inf")), loss)
    loss = torch.where(counted, loss, zero)
    return row_loss_output(logits, loss, counted, reduction)


def sparsemax_loss(logits, target, *, ignore_index: int = -100, reduction: str = "mean"):
    """Reference of :func:`fastloss.sparsemax_loss` (sparsemax Fenchel-Young loss)."""
    return _fy_loss("fastloss.reference.sparsemax_loss", logits, target, ignore_index, reduction, False)


def entmax15_loss(logits, target, *, ignore_index: int = -100, reduction: str = "mean"):
    """Reference of :func:`fastloss.entmax15_loss` (entmax-1.5 Fenchel-Young loss)."""
    return _fy_loss("fastloss.reference.entmax15_loss", logits, target, ignore_index, reduction, True)


# ------------------------------------------------------------------------------------------------------------
# Contrastive family (fastloss/contrastive.py): the same losses on the materialised N x M logits, float64-capable.
# Argument checks and reductions are shared with the fused path (contrastive.run); only the parts differ.


def _masked_lse(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logsumexp over the masked lanes of each row; -inf (with a zero, not NaN, gradient) for an empty row."""
    has = mask.any(-1)
    safe = torch.where(mask, x, torch.where(has[:, None], float("-inf"), 0.0))
    return torch.where(has, torch.logsumexp(safe, -1), float("-inf"))


def _softmax_direction(S, pos, cand, *, decoupled, beta, eps):
    """Per-row softmax loss, log-normaliser and top-1 of logits S (R, C) with positive column pos (R,) and
    candidate mask cand (self excluded)."""
    R, C = S.shape
    pos_mask = torch.nn.functional.one_hot(pos, C).bool()
    neg = cand & ~pos_mask
    s_p = S.gather(1, pos[:, None]).squeeze(1)
    if beta > 0:
        nn_ = neg.sum(1).to(S.dtype)
        n = _masked_lse((1 + beta) * S, neg) - _masked_lse(beta * S, neg) + torch.log(nn_)
        n = torch.where(nn_ > 0, n, float("-inf"))
    else:
        n = _masked_lse(S, neg)
    lse = n if decoupled else torch.logaddexp(s_p, n)
    loss = lse - s_p
    if eps:
        mean = torch.where(cand, S, 0.0).sum(1) / cand.sum(1).to(S.dtype)
        loss = loss + eps * (s_p - mean)
    neg_max = torch.where(neg, S, float("-inf")).amax(1)
    return loss, lse.detach(), (s_p > neg_max).detach()


def contrastive_parts(query, key, scale, bias, positive, labels, *, kind, symmetric, exclude_self, decoupled, beta,
                      eps, block_rows, want_stats, want_grad=False):
    """Materialised twin of contrastive.fused_parts (block_rows and want_grad are ignored: autograd differentiates
    the materialised loss)."""
    from . import contrastive as C

    acc = _acc_dtype(query)
    S = scale[:, None] * (query.to(acc) @ key.to(acc).T)
    if bias is not None:
        S = S + bias
    N, M = S.shape
    idx = torch.arange(N, device=S.device)
    cand = torch.ones(N, M, dtype=torch.bool, device=S.device)
    if exclude_self:
        cand[idx[idx < M], idx[idx < M]] = False
    if kind == C.SIGMOID:
        pos_mask = torch.nn.functional.one_hot(positive, M).bool()
        z = 2.0 * pos_mask.to(acc) - 1.0
        loss = -torch.nn.functional.logsigmoid(z * S).sum(1)  # exact; F.softplus turns linear above 20
        stats = None
        if want_stats:  # softmax-style metrics of the same logits: LSE over the candidates, positive vs negatives
            neg_max = torch.where(cand & ~pos_mask, S, float("-inf")).amax(1)
            s_p = S.gather(1, positive[:, None]).squeeze(1)
            stats = C.ContrastiveStats(_masked_lse(S, cand).detach(), (s_p > neg_max).detach())
        return C.Parts(loss, None, None, stats)
    if kind == C.SUPCON:
        P = (labels[:, None] == labels[None, :]) & cand
        cnt = P.sum(1)
        lse = _masked_lse(S, cand)
        mean_pos = torch.where(P, S, 0.0).sum(1) / cnt.clamp(min=1).to(acc)
        loss = torch.where(cnt > 0, lse - mean_pos, 0.0)
        return C.Parts(loss, None, cnt > 0, None)
    loss, lse, correct = _softmax_direction(S, positive, cand, decoupled=decoupled, beta=beta, eps=eps)
    stats = C.ContrastiveStats(lse, correct) if want_stats else None
    col_loss = None
    if symmetric:
        col_loss, col_lse, col_correct = _softmax_direction(
            S.T, torch.arange(M, device=S.device), cand.T, decoupled=decoupled, beta=beta, eps=eps
        )
        if want_stats:
            stats = stats._replace(col_lse=col_lse, col_correct=col_correct)
    return C.Parts(loss, col_loss, None, stats)


def contrastive_loss(query, key, *, positive=None, logit_scale, logit_bias=None, symmetric=False, loss="softmax",
                     decoupled=False, hard_negative_beta=0.0, label_smoothing=0.0, reduction="mean",
                     return_stats=False, block_rows=None):
    """Reference of :func:`fastloss.contrastive_loss` (materialises the logits)."""
    from . import contrastive as C

    return C.contrastive_loss(
        query, key, positive=positive, logit_scale=logit_scale, logit_bias=logit_bias, symmetric=symmetric,
        loss=loss, decoupled=decoupled, hard_negative_beta=hard_negative_beta, label_smoothing=label_smoothing,
        reduction=reduction, return_stats=return_stats, block_rows=block_rows, _parts=contrastive_parts,
    )


def clip_loss(image, text, logit_scale, logit_bias=None, *, reduction="mean", block_rows=None):
    """Reference of :func:`fastloss.clip_loss`."""
    from . import contrastive as C

    return C.clip_loss(image, text, logit_scale, logit_bias, reduction=reduction, _parts=contrastive_parts)


def siglip_loss(image, text, logit_scale, logit_bias, *, reduction="mean", block_rows=None):
    """Reference of :func:`fastloss.siglip_loss`."""
    from . import contrastive as C

    return C.siglip_loss(image, text, logit_scale, logit_bias, reduction=reduction, _parts=contrastive_parts)


def nt_xent_loss(z1, z2, *, temperature, reduction="mean", block_rows=None):
    """Reference of :func:`fastloss.nt_xent_loss`."""
    from . import contrastive as C

    return C.nt_xent_loss(z1, z2, temperature=temperature, reduction=reduction, _parts=contrastive_parts)


def supcon_loss(features, labels, *, temperature, base_temperature=None, reduction="mean", block_rows=None):
    """Reference of :func:`fastloss.supcon_loss`."""
    from . import contrastive as C

    return C.supcon_loss(features, labels, temperature=temperature, base_temperature=base_temperature,
                         reduction=reduction, _parts=contrastive_parts)
# ---------------------------------------------------------------------------------------------- stable softmax
# Additive normalisers p_k = phi(z_k) / sum_j phi(z_j) (StableMax, Taylor, softplus), comp-sum / GCE and the
# multi-label losses (ZLPR, decoupled softmax). -inf logits are masked classes (phi = 0) for every kind.

from ._reduce import comp_sum_from_nll, weighted_row_output  # noqa: E402


def _softplus(z):
    # log(1 + e^z) = -log σ(-z): exact at any z, and its derivative σ(z) is 1/2 at z = 0 (the form
    # max(z, 0) + log1p(e^-|z|) has derivative 0 there under autograd)
    return -torch.nn.functional.logsigmoid(-z)


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
    # (each branch's argument masked with where, not clamp: clamp passes no gradient at its bound, and z = 0 or
    # z = -20 exactly would lose the target's own term)
    if kind == "stablemax":  # sign(z) log1p|z|
        pos = z >= 0
        return torch.where(pos, torch.log1p(torch.where(pos, z, 0.0)), -torch.log1p(-torch.where(pos, 0.0, z)))
    if kind == "taylor":
        return torch.log(_phi(kind, z, order))
    tail = z <= -20
    return torch.where(tail, z - 0.5 * torch.exp(torch.where(tail, z, -20.0)),
                       torch.log(_softplus(torch.where(tail, -20.0, z))))


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


def taylor_softmax_loss(logits, target, *, order=2, margin=0.0, weight=None, target_weight=None, ignore_index=-100,
                        reduction="mean"):
    """Reference of :func:`fastloss.taylor_softmax_loss`."""
    fn = "fastloss.reference.taylor_softmax_loss"
    if target.dim() == logits.dim() or target_weight is not None:  # several targets: the spherical member
        if order != 2 or margin != 0.0 or weight is not None:
            raise ValueError(f"{fn}: (..., K) targets and target_weight are for order=2 without margin or weight")
        return spherical_loss(2, logits, target, target_weight, ignore_index=ignore_index, reduction=reduction)
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
