"""Cross-entropy of a linear layer's output (an LM head) without the N x C logits.

The rows go through in chunks: a chunk's logits ``h_c Wᵀ + b`` are formed by one GEMM, reduced by the fused
cross-entropy kernels (``cross_entropy_fwd`` / ``_bwd``, with every option of :func:`fastloss.cross_entropy`)
and dropped, so the loss holds one chunk of logits at a time instead of N x C. Two schedules:

* **gradients in the forward** (``reduction`` "mean" or "sum", ``return_lse=False``, a gradient wanted): each
  chunk's logit gradient follows at once from its per-row statistics, since d loss / d parts is known before the
  loss is (`_reduce.cross_entropy_part_grads`), and turns into the chunk's hidden gradient and a share of the
  weight and bias gradients. The backward only scales them by the upstream gradient: three GEMMs per chunk, as
  in Liger's fused linear cross-entropy and torch's chunked ``F.linear_cross_entropy``.
* **recompute** (``reduction="none"``, ``return_lse=True``, or no gradient wanted): the forward keeps 12 bytes of
  statistics per row; the backward forms each chunk's logits again (four GEMMs per chunk in all), so any
  upstream gradient, per row or through the returned lse, is exact.

The weight and bias gradients accumulate over chunks in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _ops
from . import _validation as V
from ._autograd import first_order, prob_target_grad
from ._reduce import (
    combine_cross_entropy,
    cross_entropy_output,
    cross_entropy_part_grads,
    gather_class_weight,
    prob_cross_entropy_output,
)
from .linear_spherical import _HAS_MM_DTYPE, _autocast_operands

_MIN_CHUNK_LOGITS = 1 << 24  # 64 MB of fp32 logits


def default_chunk_rows(n: int, num_classes: int, d: int) -> int:
    """Rows per chunk, a power of two: a chunk of logits about the size of the hidden states (Liger's rule), but
    at least 2^24 logits: every chunk adds its share to the C x d weight gradient with one pass over it, which
    dominates the step when chunks are thin (measured on the CPU: 32-row chunks at C = 32768, d = 512 take
    1.9x the time of 512-row ones)."""
    rows = max(math.ceil(n / max(1, math.ceil(num_classes / max(d, 1)))), math.ceil(_MIN_CHUNK_LOGITS / num_classes))
    return max(1, 1 << max(0, rows - 1).bit_length())


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _Head:
    """The linear layer and the cross-entropy options, shared by both schedules; `prob`: probability targets
    (rows of t shaped like the logits, the cross_entropy_prob ops) instead of class indices."""

    def __init__(self, weight, bias, class_weight, margin, margin_scalar, logit_scale, softcap, ignore_index,
                 with_smoothing, chunk, prob):
        self.weight, self.bias, self.class_weight, self.margin = weight, bias, class_weight, margin
        self.logit_scale, self.softcap, self.prob = logit_scale, softcap, prob
        self.fwd_opts = (margin_scalar, logit_scale, softcap, ignore_index, with_smoothing)
        self.bwd_opts = (logit_scale, softcap, ignore_index, with_smoothing)
        self.prob_opts = (logit_scale, softcap, with_smoothing)
        self.chunk = chunk

    def spans(self, n: int):
        return ((r, min(r + self.chunk, n)) for r in range(0, n, self.chunk))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight, self.bias)

    def forward_rows(self, z: torch.Tensor, t: torch.Tensor):
        if self.prob:
            return torch.ops.fastloss.cross_entropy_prob_fwd(z, t, self.class_weight, *self.prob_opts)
        return torch.ops.fastloss.cross_entropy_fwd(z, t, self.class_weight, self.margin, *self.fwd_opts)

    def logit_grad(self, grad_parts, z, t, stats):
        if self.prob:
            return torch.ops.fastloss.cross_entropy_prob_bwd(grad_parts, z, t, self.class_weight, stats,
                                                             *self.prob_opts)
        return torch.ops.fastloss.cross_entropy_bwd(grad_parts, z, t, self.class_weight, stats, *self.bwd_opts)

    def accumulate(self, g, h_c, r0, r1, grads, need):
        """The chunk's logit gradient g into the hidden rows [r0, r1), the weight and the bias gradients."""
        grad_h, grad_w, grad_b = grads
        if need[0]:
            torch.mm(g, self.weight, out=grad_h[r0:r1])
        if need[1]:
            _add_t_mm(grad_w, g, h_c)
        if need[2]:
            grad_b += g.sum(0, dtype=grad_b.dtype)

    def new_grads(self, h, need):
        acc = _acc(h)
        return (torch.empty_like(h) if need[0] else None,
                torch.zeros(self.weight.shape, dtype=acc, device=h.device) if need[1] else None,
                torch.zeros(self.weight.shape[0], dtype=acc, device=h.device) if need[2] else None)


def _add_t_mm(acc: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """acc += gᵀ h with the products accumulated in acc's dtype (2-byte inputs: fp32 GEMM output on CUDA; the
    CPU has no such GEMM and upcasts the chunk)."""
    if g.dtype == acc.dtype:
        acc.addmm_(g.t(), h)
    elif g.device.type == "cuda" and _HAS_MM_DTYPE:
        torch.addmm(acc, g.t(), h, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(g.t().to(acc.dtype), h.to(acc.dtype))


def _finish(grads, head, need):
    grad_h, grad_w, grad_b = grads
    return (grad_h if need[0] else None,
            grad_w.to(head.weight.dtype) if need[1] else None,
            grad_b.to(head.bias.dtype) if need[2] else None)


class _RecomputeParts(torch.autograd.Function):
    """parts (N, 3) = [w_y (lse - z_y), sum_k w_k (lse - z_k), lse] of the logits h Wᵀ + b, chunk by chunk; the
    backward forms each chunk's logits again."""

    @staticmethod
    def forward(ctx, h, weight, bias, t, head):
        n = h.shape[0]
        parts = h.new_empty((n, 3), dtype=_acc(h))
        stats = torch.empty_like(parts)
        for r0, r1 in head.spans(n):
            parts[r0:r1], stats[r0:r1] = head.forward_rows(head.logits(h[r0:r1]), t[r0:r1])
        ctx.save_for_backward(h, t, stats)
        ctx.head = head
        return parts

    @staticmethod
    @first_order
    def backward(ctx, grad_parts):
        h, t, stats = ctx.saved_tensors
        head = ctx.head
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], head.bias is not None and ctx.needs_input_grad[2])
        grads = head.new_grads(h, need)
        grad_t = torch.empty_like(t) if ctx.needs_input_grad[3] else None  # probability targets only
        grad_parts = grad_parts.contiguous()
        with torch.autocast(h.device.type, enabled=False):  # the logits exactly as the forward formed them
            for r0, r1 in head.spans(h.shape[0]):
                h_c = h[r0:r1]
                z = head.logits(h_c)
                if any(need):
                    g = head.logit_grad(grad_parts[r0:r1], z, t[r0:r1], stats[r0:r1])
                    head.accumulate(g, h_c, r0, r1, grads, need)
                if grad_t is not None:
                    grad_t[r0:r1] = prob_target_grad(grad_parts[r0:r1], z, head.class_weight, stats[r0:r1],
                                                     head.logit_scale, head.softcap)
        return (*_finish(grads, head, need), grad_t, None)


class _GradsInForward(torch.autograd.Function):
    """The reduced loss (mean or sum), with the gradients of h, W and b formed chunk by chunk in the forward for
    an upstream gradient of 1; the backward scales them."""

    @staticmethod
    def forward(ctx, h, weight, bias, t, head, counted, w_y, combine):
        n = h.shape[0]
        need = ctx.needs_input_grad[:3]
        grads = head.new_grads(h, need)
        # rows (a, b, c): d loss / d parts = (a, b, c · lse), known before the loss is
        coef = cross_entropy_part_grads(counted, w_y, dtype=_acc(h), **combine)
        parts = h.new_empty((n, 3), dtype=_acc(h))
        for r0, r1 in head.spans(n):
            h_c, t_c = h[r0:r1], t[r0:r1]
            z = head.logits(h_c)
            parts_c, stats_c = head.forward_rows(z, t_c)
            parts[r0:r1] = parts_c
            grad_parts = coef[r0:r1].clone()
            grad_parts[:, 2] *= parts_c[:, 2]
            head.accumulate(head.logit_grad(grad_parts, z, t_c, stats_c), h_c, r0, r1, grads, need)
        nll, smooth, lse = parts.unbind(1)
        loss = combine_cross_entropy(nll, smooth, lse, counted, w_y, **combine)
        ctx.grads = _finish(grads, head, need)
        ctx.save_for_backward(h, weight, bias)  # only so that differentiating the gradients raises (first_order)
        return loss

    @staticmethod
    @first_order
    def backward(ctx, grad_loss):
        scaled = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in ctx.grads)
        return (*scaled, None, None, None, None, None)


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    target_margin: float | torch.Tensor = 0.0,
    return_lse: bool = False,
    chunk_size: int | None = None,
):
    """:func:`fastloss.cross_entropy` of ``F.linear(input, linear_weight, linear_bias)`` without the logits.

    Drop-in for ``torch.nn.functional.linear_cross_entropy(input, linear_weight, target, linear_bias=...,
    weight=..., reduction=..., ignore_index=..., label_smoothing=...)``, plus every option of
    :func:`fastloss.cross_entropy`: ``lse_square_scale``, ``softcap``, ``logit_scale``, ``target_margin`` and
    ``return_lse`` (per-row lse in float32, float64 for float64 inputs).

    ``input (..., d)``, ``linear_weight (C, d)`` and ``linear_bias (C,)`` share a floating dtype; ``target``
    ``(...)`` holds class indices, or is a floating tensor ``(..., C)`` of probability targets (soft labels,
    distillation; semantics, dtypes and refused options as in :func:`fastloss.cross_entropy`, and ``target`` gets
    a gradient when it requires one). The logits are formed ``chunk_size`` rows at a time (default: a chunk of
    logits about the size of ``input``, as Liger does, and at least 2^24 logits, a power of two of rows) in the
    input's dtype, exactly as ``F.linear`` forms them, and never all at once: peak memory is one chunk of logits
    and its gradient, plus the gradients themselves.

    With ``reduction`` "mean" or "sum", ``return_lse=False``, a gradient wanted (and none for ``target``), the
    gradients are formed in the forward (three GEMMs per chunk) and the backward scales them, so calling the
    forward without a backward under autograd costs the gradients too; run evaluation under
    ``torch.no_grad()``. Otherwise the forward keeps only per-row statistics and the backward forms the logits
    again. The weight and bias gradients accumulate over chunks in float32 (float64 for float64). Inside
    ``torch.autocast`` float32 operands are cast to the autocast dtype, as ``F.linear``'s would be.
    """
    fn = "fastloss.linear_cross_entropy"
    input, linear_weight, linear_bias = _autocast_operands(input, linear_weight, linear_bias)
    C = _check_linear_args(fn, input, linear_weight, linear_bias, target)
    logits_like = input.new_empty(()).expand(*input.shape[:-1], C)  # the logits' shape and dtype, no storage
    label_smoothing, lse_square_scale, logit_scale, softcap, target_margin = V.check_cross_entropy_args(
        fn, logits_like, target, weight=weight, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, logit_scale=logit_scale,
        softcap=softcap, target_margin=target_margin,
    )
    return_lse = V.check_bool(fn, "return_lse", return_lse)
    prob = V.is_prob_target(target)
    d = input.shape[-1]
    h = input.reshape(-1, d)
    t = target.reshape(-1, C) if prob else target.reshape(-1).long()
    if chunk_size is None:
        chunk_size = default_chunk_rows(h.shape[0], C, d)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be a positive int or None, got {chunk_size!r}")
    if not _ops.use_kernel("cross_entropy_prob_fwd" if prob else "cross_entropy_fwd", input.device):
        from . import reference
        return reference.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight, ignore_index=ignore_index,
            reduction=reduction, label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
            softcap=softcap, logit_scale=logit_scale, target_margin=target_margin, return_lse=return_lse,
        )
    if V.get_validation() and not prob:
        V.check_target_range(fn, target, C, ignore_index)
    per_class_margin = isinstance(target_margin, torch.Tensor)
    h = h if h.stride(-1) == 1 else h.contiguous()
    head = _Head(linear_weight, linear_bias, weight, target_margin if per_class_margin else None,
                 0.0 if per_class_margin else target_margin, logit_scale, softcap or 0.0, ignore_index,
                 label_smoothing > 0, chunk_size, prob)
    acc = _acc(h)
    # probability targets: every row counts, without w_y (torch's "mean" divides by the number of rows)
    counted = torch.ones(h.shape[0], dtype=torch.bool, device=h.device) if prob else t != ignore_index
    w_y = None if prob else gather_class_weight(weight.to(acc) if weight is not None else None, t, counted, C)
    wants_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (input, linear_weight, linear_bias))
    target_grad = prob and torch.is_grad_enabled() and target.requires_grad
    with torch.autocast(input.device.type, enabled=False):
        if reduction != "none" and not return_lse and wants_grad and not target_grad:
            combine = {"num_classes": C, "reduction": reduction, "label_smoothing": label_smoothing,
                       "lse_square_scale": lse_square_scale}
            loss = _GradsInForward.apply(h, linear_weight, linear_bias, t, head, counted, w_y, combine)
            return loss.to(_output_dtype(input, target, weight, prob))
        parts = _RecomputeParts.apply(h, linear_weight, linear_bias, t, head)
    nll, smooth, lse = parts.unbind(1)
    if prob:
        return prob_cross_entropy_output(
            logits_like, target, nll, smooth, lse, weight=weight, reduction=reduction,
            label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, return_lse=return_lse,
        )
    return cross_entropy_output(
        logits_like, nll, smooth, lse, counted, w_y, reduction=reduction, label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale, return_lse=return_lse,
    )


def _output_dtype(input, target, weight, prob) -> torch.dtype:
    """The loss dtype: the input's, or for probability targets torch's promotion over input, target and weight
    (as _reduce.prob_cross_entropy_output)."""
    if not prob:
        return input.dtype
    out = torch.promote_types(input.dtype, target.dtype)
    return torch.promote_types(out, weight.dtype) if weight is not None else out


def _check_linear_args(fn, input, weight, bias, target) -> int:
    """The linear layer's checks; returns the number of classes C."""
    V.check_linear_layer(fn, input, weight, bias, names=("input", "linear_weight", "linear_bias"))
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{fn}: target must be a torch.Tensor, got {type(target).__name__}")
    return weight.shape[0]
