"""Autograd of the forward ops: each saves its inputs and small per-row statistics, and its backward op
recomputes from logits + statistics (no N x C tensor is kept between forward and backward)."""

from __future__ import annotations

import torch

from . import _ops

if _ops.AVAILABLE:

    def _ce_setup(ctx, inputs, output):
        logits, target, weight, margin, margin_scalar, logit_scale, softcap, ignore_index, with_smoothing = inputs
        _, stats = output
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(logits, target, weight, stats)
        ctx.opts = (logit_scale, softcap, ignore_index, with_smoothing)

    def _ce_backward(ctx, grad_parts, _grad_stats):
        logits, target, weight, stats = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.ops.fastloss.cross_entropy_bwd(grad_parts, logits, target, weight, stats, *ctx.opts)
        return grad, None, None, None, None, None, None, None, None

    torch.library.register_autograd("fastloss::cross_entropy_fwd", _ce_backward, setup_context=_ce_setup)

    def _zloss_setup(ctx, inputs, output):
        logits, target, a, b, ignore_index = inputs
        _, stats = output
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(logits, target, stats)
        ctx.opts = (a, b, ignore_index)

    def _zloss_backward(ctx, grad_loss, _grad_stats):
        logits, target, stats = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.ops.fastloss.zloss_bwd(grad_loss, logits, target, stats, *ctx.opts)
        return grad, None, None, None, None

    torch.library.register_autograd("fastloss::zloss_fwd", _zloss_backward, setup_context=_zloss_setup)

    # stable-softmax family
    def _additive_setup(ctx, inputs, output):
        logits, target, *opts = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(logits, target, output[1])
        ctx.opts = opts

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

    def _multilabel_backward(ctx, grad_loss, _grad_stats):
        logits, mask, stats = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.ops.fastloss.multilabel_row_bwd(grad_loss, logits, mask, stats, *ctx.opts)
        return grad, None, None, None, None

    torch.library.register_autograd(
        "fastloss::multilabel_row_fwd", _multilabel_backward, setup_context=_multilabel_setup
    )
