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

    # --- contrastive family
    @torch.library.register_fake("fastloss::contrastive_fwd")
    def _(query, key, scale, bias, positive, labels_q, labels_k, kind, symmetric, exclude_self, decoupled, beta,
          label_smoothing, block_rows):
        n, m, acc = query.shape[0], key.shape[0] if symmetric else 0, _acc(query)
        return (query.new_empty((n,), dtype=acc), query.new_empty((m,), dtype=acc),
                query.new_empty((n, 8), dtype=acc), query.new_empty((m, 8), dtype=acc))

    @torch.library.register_fake("fastloss::contrastive_bwd")
    def _(grad_row, grad_col, query, key, scale, bias, positive, labels_q, labels_k, row_stats, col_stats, kind,
          symmetric, exclude_self, decoupled, beta, label_smoothing, block_rows):
        acc = _acc(query)
        return (query.new_empty(query.shape), key.new_empty(key.shape),
                query.new_empty((query.shape[0],), dtype=acc), query.new_empty((), dtype=acc))
