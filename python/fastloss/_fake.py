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

    # sparsemax family
    @torch.library.register_fake("fastloss::sparsemax_fwd")
    def _(logits, entmax15):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("fastloss::sparsemax_bwd")
    def _(grad, probs, entmax15):
        return probs.new_empty(probs.shape)

    @torch.library.register_fake("fastloss::sparsemax_loss_fwd")
    def _(logits, target, ignore_index, entmax15):
        n = logits.shape[0]
        return logits.new_empty((n,), dtype=_acc(logits)), logits.new_empty((n, 2), dtype=_acc(logits))

    @torch.library.register_fake("fastloss::sparsemax_loss_bwd")
    def _(grad_loss, logits, target, stats, ignore_index, entmax15):
        return logits.new_empty(logits.shape)
