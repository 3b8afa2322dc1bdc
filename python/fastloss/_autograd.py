"""Autograd of the forward ops: each saves its inputs and small per-row statistics, and its backward op
recomputes from logits + statistics (no N x C tensor is kept between forward and backward).

The backward ops have no autograd of their own, so gradients are first-order: every backward is wrapped in
`first_order`, and differentiating its result again raises instead of returning a silently partial second
derivative (torch's `once_differentiable` alone would not catch `torch.autograd.grad(..., inputs=x)`, which
prunes its error node)."""

from __future__ import annotations

import functools

import torch

from . import _ops


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on a gradient, tied to the forward's inputs, whose own backward raises."""

    @staticmethod
    def forward(ctx, grad, *anchors):
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError("fastloss: second derivatives are not supported (the backward kernels are first-order; "
                           "double backward, e.g. create_graph=True through a fastloss loss, cannot be differentiated)")


def first_order(backward):
    """Decorates a backward(ctx, *grads): run without building a graph; when a graph is being built
    (create_graph=True), each returned gradient is tied to the saved inputs and upstream gradients that require
    grad, so that differentiating it raises."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            out = backward(ctx, *grads)
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return out
        anchors = [t for t in (*ctx.saved_tensors, *grads) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not anchors:
            return out
        single = not isinstance(out, tuple)
        tied = tuple(_NoDoubleBackward.apply(g, *anchors) if isinstance(g, torch.Tensor) else g
                     for g in ((out,) if single else out))
        return tied[0] if single else tied

    return wrapper


def prob_target_grad(grad_parts, logits, weight, stats, logit_scale, softcap):
    """d loss / d t_k = g_nll w_k (lse - z_k) of cross_entropy_prob_fwd's rows (accumulation type): formed here,
    O(N C) temporaries. lse - z is taken next to the maximum, (m - z) + log1p(r): exact on the maximal class;
    a masked class (z = -inf) gets 0, as in the reference."""
    acc = stats.dtype
    z = logits.to(acc) * logit_scale
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    per_class = (stats[:, :1] - z) + torch.log1p(stats[:, 1:2])
    per_class = torch.where(z == float("-inf"), torch.zeros((), dtype=acc, device=z.device), per_class)
    g = grad_parts[:, 0].to(acc)[:, None] * per_class
    return g * weight.to(acc) if weight is not None else g


if _ops.AVAILABLE:

    def _ce_setup(ctx, inputs, output):
        logits, target, weight, margin, margin_scalar, logit_scale, softcap, ignore_index, with_smoothing = inputs
        _, stats = output
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(logits, target, weight, stats)
        ctx.opts = (logit_scale, softcap, ignore_index, with_smoothing)

    @first_order
    def _ce_backward(ctx, grad_parts, _grad_stats):
        logits, target, weight, stats = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.ops.fastloss.cross_entropy_bwd(grad_parts, logits, target, weight, stats, *ctx.opts)
        return grad, None, None, None, None, None, None, None, None

    torch.library.register_autograd("fastloss::cross_entropy_fwd", _ce_backward, setup_context=_ce_setup)

    def _ce_prob_setup(ctx, inputs, output):
        logits, target, weight, logit_scale, softcap, with_smoothing = inputs
        _, stats = output
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(logits, target, weight, stats)
        ctx.opts = (logit_scale, softcap, with_smoothing)

    @first_order
    def _ce_prob_backward(ctx, grad_parts, _grad_stats):
        logits, target, weight, stats = ctx.saved_tensors
        grad_logits = grad_target = None
        if ctx.needs_input_grad[0]:
            grad_logits = torch.ops.fastloss.cross_entropy_prob_bwd(grad_parts, logits, target, weight, stats,
                                                                    *ctx.opts)
        if ctx.needs_input_grad[1]:
            grad_target = prob_target_grad(grad_parts, logits, weight, stats, *ctx.opts[:2]).to(target.dtype)
        return grad_logits, grad_target, None, None, None, None

    torch.library.register_autograd("fastloss::cross_entropy_prob_fwd", _ce_prob_backward,
                                    setup_context=_ce_prob_setup)

    def _spherical_setup(ctx, inputs, output):
        logits, target, target_weight, *opts = inputs
        _, stats = output
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(logits, target, target_weight, stats)
        ctx.opts = opts

    @first_order
    def _spherical_backward(ctx, grad_loss, _grad_stats):
        logits, target, target_weight, stats = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.ops.fastloss.spherical_bwd(grad_loss, logits, target, target_weight, stats, *ctx.opts)
        return grad, None, None, None, None, None, None, None

    torch.library.register_autograd("fastloss::spherical_fwd", _spherical_backward, setup_context=_spherical_setup)

    # --- contrastive family: the backward op recomputes every tile from the features and the row/column records.
    def _contrastive_setup(ctx, inputs, output):
        query, key, scale, bias, positive, labels_q, labels_k, *opts = inputs
        _, _, row_stats, col_stats = output
        ctx.mark_non_differentiable(row_stats, col_stats)
        ctx.save_for_backward(query, key, scale, bias, positive, labels_q, labels_k, row_stats, col_stats)
        ctx.opts = tuple(opts)

    @first_order
    def _contrastive_backward(ctx, grad_row, grad_col, _g_row_stats, _g_col_stats):
        query, key, scale, bias, positive, labels_q, labels_k, row_stats, col_stats = ctx.saved_tensors
        if grad_row is None:
            grad_row = row_stats.new_zeros(row_stats.shape[0])
        if grad_col is None:
            grad_col = col_stats.new_zeros(col_stats.shape[0])
        need = ctx.needs_input_grad
        dq, dk, dscale, dbias = torch.ops.fastloss.contrastive_bwd(
            grad_row, grad_col, query, key, scale, bias, positive, labels_q, labels_k, row_stats, col_stats,
            *ctx.opts, need[0], need[1],  # a frozen side skips its GEMM
        )
        return (dq if need[0] else None, dk if need[1] else None, dscale if need[2] else None,
                dbias if bias is not None and need[3] else None, None, None, None, None, None, None, None, None,
                None, None)

    torch.library.register_autograd(
        "fastloss::contrastive_fwd", _contrastive_backward, setup_context=_contrastive_setup
    )

    # contrastive_fwd_grad already holds the gradient of its scalar `total`: the backward only scales it.
    def _contrastive_grad_setup(ctx, inputs, output):
        query, key, scale, bias = inputs[:4]
        _, row_loss, row_stats, dq, dk, dscale, dbias = output
        ctx.mark_non_differentiable(row_loss, row_stats, dq, dk, dscale, dbias)
        # the inputs only tie a double backward to them (first_order); the gradients are the kept ones
        ctx.save_for_backward(dq, dk, dscale, dbias if bias is not None else None, query, key, scale, bias)
        ctx.dtypes = (query.dtype, key.dtype, scale.dtype, None if bias is None else bias.dtype)

    @first_order
    def _contrastive_grad_backward(ctx, grad_total, *_unused):
        need = ctx.needs_input_grad
        grads = [None if t is None or not n else (grad_total * t).to(dt)
                 for t, n, dt in zip(ctx.saved_tensors[:4], need[:4], ctx.dtypes, strict=True)]
        return (*grads, *([None] * 11))  # positive .. block_rows, query_grad, key_grad

    torch.library.register_autograd(
        "fastloss::contrastive_fwd_grad", _contrastive_grad_backward, setup_context=_contrastive_grad_setup
    )

    # sparsemax family: the activation saves its output (the backward needs only p); the loss saves the logits
    # and two numbers per row.
    def _sparsemax_setup(ctx, inputs, output):
        ctx.entmax15 = inputs[1]
        ctx.save_for_backward(output)

    @first_order
    def _sparsemax_backward(ctx, grad):
        (probs,) = ctx.saved_tensors
        return torch.ops.fastloss.sparsemax_bwd(grad, probs, ctx.entmax15), None

    torch.library.register_autograd("fastloss::sparsemax_fwd", _sparsemax_backward, setup_context=_sparsemax_setup)

    def _sparsemax_loss_setup(ctx, inputs, output):
        logits, target, ignore_index, entmax15 = inputs
        _, stats = output
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(logits, target, stats)
        ctx.opts = (ignore_index, entmax15)

    @first_order
    def _sparsemax_loss_backward(ctx, grad_loss, _grad_stats):
        logits, target, stats = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.ops.fastloss.sparsemax_loss_bwd(grad_loss, logits, target, stats, *ctx.opts)
        return grad, None, None, None

    torch.library.register_autograd(
        "fastloss::sparsemax_loss_fwd", _sparsemax_loss_backward, setup_context=_sparsemax_loss_setup
    )

    # stable-softmax family
    def _additive_setup(ctx, inputs, output):
        logits, target, *opts = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(logits, target, output[1])
        ctx.opts = opts

    @first_order
    def _additive_backward(ctx, grad_loss, _grad_stats):
        logits, target, stats = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.ops.fastloss.additive_row_bwd(grad_loss, logits, target, stats, *ctx.opts)
        return grad, None, None, None, None, None, None

    torch.library.register_autograd("fastloss::additive_row_fwd", _additive_backward, setup_context=_additive_setup)

    def _multilabel_setup(ctx, inputs, output):
        logits, mask, *opts = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(logits, mask, output[1])
        ctx.opts = opts

    @first_order
    def _multilabel_backward(ctx, grad_loss, _grad_stats):
        logits, mask, stats = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.ops.fastloss.multilabel_row_bwd(grad_loss, logits, mask, stats, *ctx.opts)
        return grad, None, None, None, None

    torch.library.register_autograd(
        "fastloss::multilabel_row_fwd", _multilabel_backward, setup_context=_multilabel_setup
    )
