"""Blockwise contrastive losses: CLIP / InfoNCE, SigLIP, DCL, HCL, NT-Xent and SupCon without the N x M matrix.

    loss = fastloss.clip_loss(image, text, logit_scale)                # open_clip ClipLoss, one device
    loss = fastloss.siglip_loss(image, text, logit_scale, logit_bias)  # open_clip SigLipLoss, one device
    loss = fastloss.contrastive_loss(q, k, logit_scale=s, hard_negative_beta=0.5, decoupled=True)

The fused path runs the engine of ``csrc/contrastive_engine.h``: one GEMM per block of query rows, an epilogue
that folds the block into per-row (and per-column) log-sum-exp statistics in one read of the block, and a
backward that recomputes each block. A row-wise loss (every variant but the symmetric CLIP form) reduced to a
scalar while gradients are wanted takes the gradient in the same pass instead (``contrastive_fwd_grad``): each
block's rows are complete once it is folded, so its tile also gives their gradient, 3 GEMMs per block instead of
4, and the backward only scales the kept gradients (O((N + M) d) floats between forward and backward; the
gradient work is spent even if no backward follows, so evaluate under ``torch.no_grad()``).

Memory is one block of ``block_rows x M`` accumulation-type floats plus O((N + M) d): by default 2^22 elements
(16 MiB fp32) on CPU and 2^27 (512 MiB fp32, 2048 rows at M = 65536, plus a 256 MiB fp16/bf16 copy of the
gradient block in the mixed-precision backward) on CUDA; O(M) for a fixed row count, never N x M. Features are
used as given (normalise them yourself, as open_clip does). Every function has a materialised twin of the same
name in :mod:`fastloss.reference`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _ops
from . import _validation as V
from ._reduce import mean_over

SOFTMAX, SIGMOID, SUPCON = 0, 1, 2
_LOSSES = {"softmax": SOFTMAX, "sigmoid": SIGMOID}
# Columns of the statistics records (fastloss/contrastive.h).
_MAX, _POS, _COUNT, _LSE = 0, 3, 5, 6


class ContrastiveStats(NamedTuple):
    """Detached per-row metrics (``return_stats=True``): the row's log-normaliser over its candidates and
    whether its positive beats every negative (top-1). ``col_*`` are the key->query direction (symmetric)."""

    lse: torch.Tensor
    correct: torch.Tensor
    col_lse: torch.Tensor | None = None
    col_correct: torch.Tensor | None = None


class Parts(NamedTuple):
    """What the fused op and the reference both produce before the reduction."""

    row_loss: torch.Tensor  # (N,) accumulation dtype
    col_loss: torch.Tensor | None  # (M,) when symmetric
    counted: torch.Tensor | None  # (N,) bool: SupCon anchors that have a positive
    stats: ContrastiveStats | None
    total: torch.Tensor | None = None  # () sum of row_loss carrying its gradient (contrastive_fwd_grad)


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------- validation
def _check_features(fn: str, name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{fn}: {name} must have shape (rows, d), got shape {tuple(x.shape)}")
    if x.dtype not in V._FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{fn}: {name} needs at least one row and one feature, got shape {tuple(x.shape)}")


def _scale_vector(fn: str, name: str, value, query: torch.Tensor) -> torch.Tensor:
    """A scalar or per-row (N,) multiplier as an (N,) tensor of the accumulation type (gradient preserved)."""
    N, acc = query.shape[0], _acc(query)
    if isinstance(value, torch.Tensor):
        if value.device != query.device:
            raise ValueError(f"{fn}: {name} is on {value.device} but the features are on {query.device}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{fn}: {name} must be a floating tensor, got {value.dtype}")
        if value.numel() == 1 and value.dim() <= 1:
            return value.to(acc).reshape(1).expand(N)
        if value.dim() == 1 and value.shape[0] == N:
            return value.to(acc)
        raise ValueError(
            f"{fn}: {name} must be a scalar tensor or have shape ({N},) (one per query row), got {tuple(value.shape)}"
        )
    v = V.check_finite(fn, name, value)
    return torch.full((N,), v, dtype=acc, device=query.device)


def _bias_tensor(fn: str, value, query: torch.Tensor):
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"{fn}: logit_bias must be a scalar tensor, got shape {tuple(value.shape)}")
        if value.device != query.device:
            raise ValueError(f"{fn}: logit_bias is on {value.device} but the features are on {query.device}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{fn}: logit_bias must be a floating tensor, got {value.dtype}")
        return value.to(_acc(query)).reshape(())
    return torch.tensor(V.check_finite(fn, "logit_bias", value), dtype=_acc(query), device=query.device)


def _check_index_vector(fn: str, name: str, v, n: int, device) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor of indices, got {type(v).__name__}")
    if v.dtype.is_floating_point or v.dtype.is_complex or v.dtype == torch.bool:
        raise TypeError(f"{fn}: {name} must hold integer indices (int64 or int32), got {v.dtype}")
    if v.dim() != 1 or v.shape[0] != n:
        raise ValueError(f"{fn}: {name} must have shape ({n},), got {tuple(v.shape)}")
    if v.device != device:
        raise ValueError(f"{fn}: {name} is on {v.device} but the features are on {device}")
    return v.long()


def _check_positive_range(fn: str, positive: torch.Tensor, M: int) -> None:
    bad = (positive < 0) | (positive >= M)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise IndexError(f"{fn}: positive {int(positive[i])} of row {i} is out of bounds for {M} keys")


# ---------------------------------------------------------------------------------------------- fused parts
def _stats_from_records(st: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # log-normaliser over the candidates; top-1: the positive beats the largest negative (the record's max).
    return st[:, _LSE], st[:, _POS] > st[:, _MAX]


def fused_parts(query, key, scale, bias, positive, labels, *, kind, symmetric, exclude_self, decoupled, beta, eps,
                block_rows, want_stats, want_grad=False) -> Parts:
    """want_grad: the caller reduces to a scalar and needs its gradient, so a row-wise loss takes it in the same
    pass (contrastive_fwd_grad); row_loss is then detached and `total` carries the gradient."""
    labels_q = labels_k = labels
    total = None
    if want_grad and not symmetric:
        total, row_loss, row_st, *_grads = torch.ops.fastloss.contrastive_fwd_grad(
            query, key, scale, bias, positive, labels_q, labels_k, kind, exclude_self, decoupled, beta, eps,
            block_rows, query.requires_grad, key.requires_grad,  # a frozen side (e.g. a key queue) skips its GEMM
        )
        col_loss = col_st = None
    else:
        row_loss, col_loss, row_st, col_st = torch.ops.fastloss.contrastive_fwd(
            query, key, scale, bias, positive, labels_q, labels_k, kind, symmetric, exclude_self, decoupled, beta,
            eps, block_rows,
        )
    counted = row_st[:, _COUNT] > 0 if kind == SUPCON else None
    stats = None
    if want_stats:
        lse, correct = _stats_from_records(row_st.detach())
        stats = ContrastiveStats(lse, correct)
        if symmetric:
            stats = stats._replace(**dict(zip(("col_lse", "col_correct"),
                                              _stats_from_records(col_st.detach()), strict=True)))
    return Parts(row_loss, col_loss if symmetric else None, counted, stats, total)


# ---------------------------------------------------------------------------------------------- the shared driver
def _reduce(parts: Parts, reduction: str, query: torch.Tensor) -> torch.Tensor:
    rows = parts.row_loss
    if parts.col_loss is not None:
        rows = 0.5 * (rows + parts.col_loss)
    if reduction == "none":
        out = rows
    else:
        total = rows.sum() if parts.total is None else parts.total
        if reduction == "sum":
            out = total
        elif parts.counted is not None:  # SupCon: anchors without positives are left out of the mean
            out = mean_over(total, parts.counted.sum())
        else:
            out = total / rows.shape[0]
    return out.to(query.dtype)


def run(fn: str, parts_fn, query, key, *, positive=None, labels=None, logit_scale, logit_bias=None, symmetric=False,
        loss="softmax", decoupled=False, hard_negative_beta=0.0, label_smoothing=0.0, reduction="mean",
        return_stats=False, exclude_self=False, supcon=False, block_rows=None):
    """Validates every argument (naming it), then runs `parts_fn` (fused or reference) and reduces."""
    _check_features(fn, "query", query)
    _check_features(fn, "key", key)
    if key.shape[1] != query.shape[1]:
        raise ValueError(
            f"{fn}: query and key must have the same width d, got {query.shape[1]} and {key.shape[1]}"
        )
    if key.dtype != query.dtype:
        raise TypeError(f"{fn}: query and key must have the same dtype, got {query.dtype} and {key.dtype}")
    if key.device != query.device:
        raise ValueError(f"{fn}: key is on {key.device} but query is on {query.device}")
    N, M = query.shape[0], key.shape[0]
    V.check_reduction(fn, reduction)
    symmetric, decoupled = V.check_bool(fn, "symmetric", symmetric), V.check_bool(fn, "decoupled", decoupled)
    return_stats = V.check_bool(fn, "return_stats", return_stats)
    if loss not in _LOSSES:
        raise ValueError(f"{fn}: loss must be 'softmax' or 'sigmoid', got {loss!r}")
    kind = SUPCON if supcon else _LOSSES[loss]
    beta = V.check_finite(fn, "hard_negative_beta", hard_negative_beta, nonnegative=True)
    eps = V.check_finite(fn, "label_smoothing", label_smoothing, nonnegative=True)
    if eps > 1.0:
        raise ValueError(f"{fn}: label_smoothing must be in [0, 1], got {eps}")
    if kind != SOFTMAX and (decoupled or beta or eps):
        raise ValueError(f"{fn}: decoupled, hard_negative_beta and label_smoothing apply to the softmax loss only")
    if symmetric and kind != SOFTMAX:
        raise ValueError(f"{fn}: symmetric applies to the softmax loss (the sigmoid loss already scores every pair)")
    if symmetric and N != M:
        raise ValueError(f"{fn}: symmetric=True needs as many queries as keys, got N={N} and M={M}")
    if symmetric and positive is not None:
        raise ValueError(f"{fn}: symmetric=True uses the diagonal positives; leave positive=None")
    if return_stats and kind == SUPCON:
        raise ValueError(f"{fn}: return_stats is available for the softmax and sigmoid losses")
    if block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1):
        raise ValueError(f"{fn}: block_rows must be a positive int or None, got {block_rows!r}")
    if kind == SUPCON:
        labels = _check_index_vector(fn, "labels", labels, N, query.device)
        positive = None
    elif positive is None:
        if N > M:
            raise ValueError(f"{fn}: the default diagonal positives need N <= M, got N={N} and M={M}; pass positive")
        positive = torch.arange(N, device=query.device)
    else:
        positive = _check_index_vector(fn, "positive", positive, N, query.device)
        # a host sync: not under torch.compile, where the CPU kernel raises the same IndexError itself and CUDA
        # poisons the row (NaN), as without validation
        if (query.device.type == "cpu" or V.get_validation()) and not torch.compiler.is_compiling():
            _check_positive_range(fn, positive, M)
    scale = _scale_vector(fn, "logit_scale", logit_scale, query)
    bias = _bias_tensor(fn, logit_bias, query)
    want_grad = reduction != "none" and torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (query, key, scale, bias))
    parts = parts_fn(
        query, key, scale, bias, positive, labels, kind=kind, symmetric=symmetric, exclude_self=exclude_self,
        decoupled=bool(decoupled), beta=beta, eps=eps, block_rows=block_rows or 0, want_stats=return_stats,
        want_grad=want_grad,
    )
    out = _reduce(parts, reduction, query)
    return (out, parts.stats) if return_stats else out


def _fused_or_reference(query, parts=None):
    if parts is not None:  # the reference twins pass their materialised parts
        return parts
    if isinstance(query, torch.Tensor) and _ops.use_kernel("contrastive_fwd", query.device):
        return fused_parts
    from . import reference

    return reference.contrastive_parts


# ---------------------------------------------------------------------------------------------- public API
def contrastive_loss(query, key, *, positive=None, logit_scale, logit_bias=None, symmetric=False, loss="softmax",
                     decoupled=False, hard_negative_beta=0.0, label_smoothing=0.0, reduction="mean",
                     return_stats=False, block_rows=None, _parts=None):
    """InfoNCE-family loss of queries ``(N, d)`` against keys ``(M, d)`` without the ``N x M`` logits.

    Logits ``s_ij = t_i <query_i, key_j> + b``. ``positive`` (N,) indexes each row's positive key (default:
    the diagonal, which needs ``N <= M``; extra keys are extra negatives, e.g. a queue or mined negatives).
    ``logit_scale`` is a multiplier (not its log): a Python number, a scalar tensor or a per-row ``(N,)``
    tensor (individual temperatures); tensors get gradients, as does ``logit_bias``.

    * ``loss="softmax"``: ``L_i = log(e^{s_ip} + sum_neg e^{s_ij}) - s_ip``;
      ``decoupled=True`` (DCL) drops ``e^{s_ip}`` from the denominator;
      ``hard_negative_beta=β > 0`` (HCL, τ⁺ = 0) replaces the negatives' mass by
      ``Nn · sum_neg e^{(1+β)s} / sum_neg e^{βs}``;
      ``label_smoothing=ε`` adds ``ε (s_ip - mean_j s_ij)`` (cross-entropy smoothing over the M keys);
      ``symmetric=True`` (needs N == M, diagonal positives) averages with the key->query direction, as CLIP.
    * ``loss="sigmoid"`` (SigLIP): ``L_i = sum_j softplus(-z_ij s_ij)`` with ``z = +1`` on ``(i, positive_i)``
      and ``-1`` elsewhere; the mean divides by N, as open_clip's SigLipLoss.

    ``reduction`` none / sum / mean over rows (symmetric: of the two directions' average). ``return_stats=True``
    returns ``(loss, ContrastiveStats)`` with each row's log-normaliser over its candidates and top-1 hit
    (the positive beats every negative), detached; for ``loss="sigmoid"`` the same softmax metrics of the
    same logits, from the same single pass. ``block_rows`` sets the tile height (memory ``block_rows x M``
    floats; default 2^22 elements, 16 MiB fp32, on CPU and 2^27, 512 MiB, on CUDA).
    fp16/bf16 features are multiplied in fp32 (fp64 for fp64); no TF32 unless enabled in torch globally.
    With ``reduction`` "mean" or "sum" and an input that requires grad, a non-symmetric loss computes its
    gradient during the forward pass (3 GEMMs per tile instead of 4; the backward only scales it), so run
    evaluation under ``torch.no_grad()``. A side that does not require grad (a queue of keys as in MoCo, a frozen
    tower) skips its gradient GEMM.
    """
    fn = "fastloss.contrastive_loss"
    return run(fn, _fused_or_reference(query, _parts), query, key, positive=positive, logit_scale=logit_scale,
               logit_bias=logit_bias, symmetric=symmetric, loss=loss, decoupled=decoupled,
               hard_negative_beta=hard_negative_beta, label_smoothing=label_smoothing, reduction=reduction,
               return_stats=return_stats, block_rows=block_rows)


def clip_loss(image, text, logit_scale, logit_bias=None, *, reduction="mean", block_rows=None, _parts=None):
    """Symmetric CLIP loss ``(CE(image->text) + CE(text->image)) / 2`` in one call and one fused backward;
    equal to open_clip's ``ClipLoss`` on one device (``logit_bias`` as in its 2025 version)."""
    return run("fastloss.clip_loss", _fused_or_reference(image, _parts), image, text, logit_scale=logit_scale,
               logit_bias=logit_bias, symmetric=True, reduction=reduction, block_rows=block_rows)


def siglip_loss(image, text, logit_scale, logit_bias, *, reduction="mean", block_rows=None, _parts=None):
    """SigLIP: ``-sum_ij log σ(z_ij (t x_i·y_j + b)) / N`` with ``z = 2I - 1``; equal to open_clip's
    ``SigLipLoss`` on one device, with gradients for ``logit_scale`` and ``logit_bias``."""
    return run("fastloss.siglip_loss", _fused_or_reference(image, _parts), image, text, logit_scale=logit_scale,
               logit_bias=logit_bias, loss="sigmoid", reduction=reduction, block_rows=block_rows)


def nt_xent_loss(z1, z2, *, temperature, reduction="mean", block_rows=None, _parts=None):
    """SimCLR's NT-Xent over the 2N views ``[z1; z2]``: each view's positive is its twin, every other view
    (self excluded) a negative; the mean runs over the 2N rows. ``temperature`` a number or a scalar tensor."""
    fn = "fastloss.nt_xent_loss"
    _check_features(fn, "z1", z1)
    _check_features(fn, "z2", z2)
    if z1.shape != z2.shape:
        raise ValueError(f"{fn}: z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    z = torch.cat([z1, z2])
    n = z1.shape[0]
    positive = torch.arange(2 * n, device=z.device).add_(n).remainder_(2 * n)
    return run(fn, _fused_or_reference(z, _parts), z, z, positive=positive, logit_scale=_inverse(fn, temperature),
               reduction=reduction, exclude_self=True, block_rows=block_rows)


def supcon_loss(features, labels, *, temperature, base_temperature=None, reduction="mean", block_rows=None,
                _parts=None):
    """SupCon L_out (Khosla et al. 2020): ``L_i = lse_{j != i}(s_ij) - mean_{p in P(i)} s_ip`` with
    ``P(i)`` = other rows with the same label and ``s = <f_i, f_j> / temperature``. Anchors without positives
    give 0 and are left out of the mean (NaN when no anchor has a positive). Stack several views as rows.
    ``base_temperature`` (default: ``temperature``, i.e. no change) scales the loss by
    ``temperature / base_temperature``, as the authors' reference implementation does (e.g. 0.07)."""
    fn = "fastloss.supcon_loss"
    _check_features(fn, "features", features)
    base = None if base_temperature is None else V.check_finite(fn, "base_temperature", base_temperature,
                                                                 positive=True)
    out = run(fn, _fused_or_reference(features, _parts), features, features, labels=labels,
              logit_scale=_inverse(fn, temperature), reduction=reduction, exclude_self=True, supcon=True,
              block_rows=block_rows)
    # a tensor temperature keeps its gradient through the factor, as in the reference implementation
    return out if base is None else (out * (temperature / base)).to(out.dtype)


def _inverse(fn, temperature):
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1 or temperature.dim() > 1:
            raise ValueError(f"{fn}: temperature must be a number or a scalar tensor, got shape "
                             f"{tuple(temperature.shape)}")
        return 1.0 / temperature
    return 1.0 / V.check_finite(fn, "temperature", temperature, positive=True)
