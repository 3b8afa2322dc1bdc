"""Sparsemax, entmax-1.5 and their Fenchel-Young losses (csrc/include/fastloss/sparsemax.h).

Both maps are ``p = [(alpha - 1) z - tau]_+^(1 / (alpha - 1))`` with the threshold ``tau`` that makes ``p`` sum to
1 (alpha = 2: sparsemax, alpha = 1.5: entmax-1.5), so they return exact zeros. The kernels find ``tau`` without
sorting (Newton passes from a lower bound, finished by the closed form on the support, exact to rounding) in
one pass-per-step over a short candidate list, so no sorted copy or index tensor of the row is ever made.
"""

from __future__ import annotations

import torch

from . import _ops, reference
from . import _validation as V
from ._reduce import row_loss_output

__all__ = ["entmax15", "entmax15_loss", "sparsemax", "sparsemax_loss"]


def _threshold_map(fn: str, logits: torch.Tensor, dim: int, entmax15: bool) -> torch.Tensor:
    dim = V.check_threshold_input(fn, logits, dim)
    if not _ops.use_kernel("sparsemax_fwd", logits.device):
        return reference._threshold_map(fn, logits, dim, entmax15)
    x = logits.movedim(dim, -1)
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    if rows.stride(-1) != 1 and shape[-1] > 1:
        rows = rows.contiguous()
    p = torch.ops.fastloss.sparsemax_fwd(rows, entmax15)
    return p.reshape(shape).movedim(-1, dim)


def sparsemax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sparsemax (Martins & Astudillo, 2016): the Euclidean projection of ``logits`` onto the probability
    simplex along ``dim``, ``p = [z - tau]_+``. Same values and gradients as ``entmax.sparsemax``.

    Any float dtype (computed in float32, float64 for float64), result in the logits' dtype. ``-inf`` logits
    are masked classes (p = 0, gradient 0); a slice that is entirely ``-inf`` gives p = 0 (not NaN); a NaN
    logit makes its slice NaN. The backward is the Jacobian-vector product on the support,
    ``g - mean_S(g)`` there and 0 elsewhere, computed from the saved output.
    """
    return _threshold_map("fastloss.sparsemax", logits, dim, False)


def entmax15(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """1.5-entmax (Peters, Niculae & Martins, 2019) along ``dim``: ``p = [z/2 - tau]_+^2``. Same values and
    gradients as ``entmax.entmax15``; the backward uses the weights ``w = sqrt(p)``:
    ``w * g - (<w, g> / sum w) * w``. Masking and dtypes as :func:`sparsemax`.
    """
    return _threshold_map("fastloss.entmax15", logits, dim, True)


def _fy_loss(fn, logits, target, ignore_index, reduction, entmax15):
    V.check_logits_target(fn, logits, target)
    V.check_reduction(fn, reduction)
    V.check_ignore_index(fn, ignore_index)
    if not _ops.use_kernel("sparsemax_loss_fwd", logits.device):
        impl = reference.entmax15_loss if entmax15 else reference.sparsemax_loss
        return impl(logits, target, ignore_index=ignore_index, reduction=reduction)
    C = logits.shape[-1]
    if V.get_validation():
        V.check_target_range(fn, target, C, ignore_index)
    x = logits.reshape(-1, C)
    if x.stride(-1) != 1 and C > 1:
        x = x.contiguous()
    t = target.reshape(-1).long()
    rows, _ = torch.ops.fastloss.sparsemax_loss_fwd(x, t, ignore_index, entmax15)
    return row_loss_output(logits, rows, t != ignore_index, reduction)


def sparsemax_loss(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                   reduction: str = "mean") -> torch.Tensor:
    """Sparsemax Fenchel-Young loss ``<p - e_y, z> + (1 - ||p||^2) / 2`` with ``p = sparsemax(z)``, over the last
    dimension; gradient ``p - e_y``. Equals ``entmax.sparsemax_loss`` / ``entmax.SparsemaxLoss``.

    Fused: the forward keeps two numbers per row (row maximum and threshold) and the backward recomputes p
    from the logits, so no (N, C) probability tensor is held between them. ``ignore_index`` rows give loss 0
    and gradient 0 (any integer, also negative ones); ``reduction`` is ``"mean"`` over counted rows (NaN when
    there are none, like torch), ``"sum"`` or ``"none"``. ``-inf`` logits mask classes; a row whose target is
    masked has loss ``+inf`` (never NaN) and gradient ``p - e_y``; a row with every lane masked has loss ``+inf``
    and gradient 0 (ignore such rows). Class dimension last.
    """
    return _fy_loss("fastloss.sparsemax_loss", logits, target, ignore_index, reduction, False)


def entmax15_loss(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """1.5-entmax Fenchel-Young loss ``<p - e_y, z> + (1 - sum p^1.5) / 0.75`` with ``p = entmax15(z)``;
    gradient ``p - e_y``. Equals ``entmax.entmax15_loss`` / ``entmax.Entmax15Loss``. Options, masking and
    memory as :func:`sparsemax_loss`.
    """
    return _fy_loss("fastloss.entmax15_loss", logits, target, ignore_index, reduction, True)
