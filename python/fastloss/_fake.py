"""Metadata-only kernels of every op, for torch.compile / FakeTensor tracing."""

from __future__ import annotations

import torch

from . import _ops


def _acc(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


if _ops.AVAILABLE:

    @torch.library.register_fake("fastloss::cross_entropy_fwd")
    def _(logits, target, weight, target_margin, margin_scalar, logit_scale, softcap, ignore_index, with_smoothing):
        n = logits.shape[0]
        return logits.new_empty((n, 3), dtype=_acc(logits)), logits.new_empty((n, 3), dtype=_acc(logits))

    @torch.library.register_fake("fastloss::cross_entropy_bwd")
    def _(grad_parts, logits, target, weight, stats, logit_scale, softcap, ignore_index, with_smoothing):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("fastloss::zloss_fwd")
    def _(logits, target, a, b, ignore_index):
        n = logits.shape[0]
        return logits.new_empty((n,), dtype=_acc(logits)), logits.new_empty((n, 2), dtype=_acc(logits))

    @torch.library.register_fake("fastloss::zloss_bwd")
    def _(grad_loss, logits, target, stats, a, b, ignore_index):
        return logits.new_empty(logits.shape)

    # stable-softmax family
    @torch.library.register_fake("fastloss::additive_row_fwd")
    def _(logits, target, kind, order, scale, margin, ignore_index):
        n = logits.shape[0]
        return logits.new_empty((n,), dtype=_acc(logits)), logits.new_empty((n, 2), dtype=_acc(logits))

    @torch.library.register_fake("fastloss::additive_row_bwd")
    def _(grad_loss, logits, target, stats, kind, order, scale, margin, ignore_index):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("fastloss::multilabel_row_fwd")
    def _(logits, mask, kind, scale, margin):
        n = logits.shape[0]
        return logits.new_empty((n,), dtype=_acc(logits)), logits.new_empty((n, 4), dtype=_acc(logits))

    @torch.library.register_fake("fastloss::multilabel_row_bwd")
    def _(grad_loss, logits, mask, stats, kind, scale, margin):
        return logits.new_empty(logits.shape)
