"""Metadata-only kernels of every op, for torch.compile / FakeTensor tracing."""

from __future__ import annotations

import functools

import torch

from . import _ops


def _acc(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _fake(op: str):
    """register_fake for fastloss::op, refusing tensors on different devices: a meta tensor among real ones
    dispatches here, and outputs made on the real tensors' device would hold uninitialised memory."""
    def register(fn):
        @functools.wraps(fn)
        def checked(*args, **kwargs):
            devices = {str(a.device) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
            if len(devices) > 1:
                raise RuntimeError(f"fastloss::{op}: every tensor must be on one device, got {sorted(devices)}")
            return fn(*args, **kwargs)
        return torch.library.register_fake(f"fastloss::{op}")(checked)
    return register


if _ops.AVAILABLE:

    @_fake("cross_entropy_fwd")
    def _(logits, target, weight, target_margin, margin_scalar, logit_scale, softcap, ignore_index, with_smoothing):
        n = logits.shape[0]
        return logits.new_empty((n, 3), dtype=_acc(logits)), logits.new_empty((n, 3), dtype=_acc(logits))

    @_fake("cross_entropy_bwd")
    def _(grad_parts, logits, target, weight, stats, logit_scale, softcap, ignore_index, with_smoothing):
        return logits.new_empty(logits.shape)

    @_fake("cross_entropy_prob_fwd")
    def _(logits, target, weight, logit_scale, softcap, with_smoothing):
        n = logits.shape[0]
        return logits.new_empty((n, 3), dtype=_acc(logits)), logits.new_empty((n, 3), dtype=_acc(logits))

    @_fake("cross_entropy_prob_bwd")
    def _(grad_parts, logits, target, weight, stats, logit_scale, softcap, with_smoothing):
        return logits.new_empty(logits.shape)

    @_fake("spherical_fwd")
    def _(logits, target, target_weight, kind, a, b, eps, ignore_index):
        n = logits.shape[0]
        return logits.new_empty((n,), dtype=_acc(logits)), logits.new_empty((n, 2), dtype=_acc(logits))

    @_fake("spherical_bwd")
    def _(grad_loss, logits, target, target_weight, stats, kind, a, b, eps, ignore_index):
        return logits.new_empty(logits.shape)

    @_fake("spherical_row_terms")
    def _(mu, m2, target_out, target_dev, target, target_weight, kind, a, b, eps, num_classes, ignore_index):
        n, k = target.shape
        return mu.new_empty((n,)), mu.new_empty((n, 3 + k))

    def _gram_acc(t):
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    @_fake("spherical_gather_dot")
    def _(hidden, weight, bias, target, center, offset, ignore_index):
        return hidden.new_empty((*target.shape, 2), dtype=_gram_acc(hidden))

    @_fake("spherical_row_stats")
    def _(hidden, hq, stat):
        return hq.new_empty((hidden.shape[0], 2))

    @_fake("spherical_split_bf16")
    def _(x, col_shift, row_scale):
        return x.new_empty(x.shape, dtype=torch.bfloat16), x.new_empty(x.shape, dtype=torch.bfloat16)

    @_fake("spherical_weight_grad")
    def _(gw, row, bias, v, dtype):
        return gw.new_empty(gw.shape, dtype=dtype)

    @_fake("spherical_grad_hidden")
    def _(hq, ab, gamma, weight, target, stat, offset, ignore_index, with_dense):
        return hq.new_empty(hq.shape)

    # --- contrastive family
    @_fake("contrastive_fwd")
    def _(query, key, scale, bias, positive, labels_q, labels_k, kind, symmetric, exclude_self, decoupled, beta,
          label_smoothing, block_rows):
        n, m, acc = query.shape[0], key.shape[0] if symmetric else 0, _acc(query)
        return (query.new_empty((n,), dtype=acc), query.new_empty((m,), dtype=acc),
                query.new_empty((n, 7), dtype=acc), query.new_empty((m, 7), dtype=acc))

    def _wanted(x, want):  # a gradient the caller does not want comes back as (0, d)
        return x.shape if want else (0, x.shape[1])

    @_fake("contrastive_fwd_grad")
    def _(query, key, scale, bias, positive, labels_q, labels_k, kind, exclude_self, decoupled, beta,
          label_smoothing, block_rows, query_grad=True, key_grad=True):
        n, acc = query.shape[0], _acc(query)
        dq = query.new_empty(_wanted(query, query_grad), dtype=acc)
        dk = key.new_empty(_wanted(key, key_grad), dtype=acc)
        return (query.new_empty((), dtype=acc), query.new_empty((n,), dtype=acc), query.new_empty((n, 7), dtype=acc),
                dq, dk, query.new_empty((n,), dtype=acc), query.new_empty((), dtype=acc))

    @_fake("contrastive_bwd")
    def _(grad_row, grad_col, query, key, scale, bias, positive, labels_q, labels_k, row_stats, col_stats, kind,
          symmetric, exclude_self, decoupled, beta, label_smoothing, block_rows, query_grad=True, key_grad=True):
        acc = _acc(query)
        return (query.new_empty(_wanted(query, query_grad)), key.new_empty(_wanted(key, key_grad)),
                query.new_empty((query.shape[0],), dtype=acc), query.new_empty((), dtype=acc))

    # sparsemax family
    @_fake("sparsemax_fwd")
    def _(logits, entmax15):
        return logits.new_empty(logits.shape)

    @_fake("sparsemax_bwd")
    def _(grad, probs, entmax15):
        return probs.new_empty(probs.shape)

    @_fake("sparsemax_loss_fwd")
    def _(logits, target, ignore_index, entmax15):
        n = logits.shape[0]
        return logits.new_empty((n,), dtype=_acc(logits)), logits.new_empty((n, 2), dtype=_acc(logits))

    @_fake("sparsemax_loss_bwd")
    def _(grad_loss, logits, target, stats, ignore_index, entmax15):
        return logits.new_empty(logits.shape)

    # stable-softmax family
    @_fake("additive_row_fwd")
    def _(logits, target, kind, order, scale, margin, ignore_index):
        n = logits.shape[0]
        return logits.new_empty((n,), dtype=_acc(logits)), logits.new_empty((n, 2), dtype=_acc(logits))

    @_fake("additive_row_bwd")
    def _(grad_loss, logits, target, stats, kind, order, scale, margin, ignore_index):
        return logits.new_empty(logits.shape)

    @_fake("multilabel_row_fwd")
    def _(logits, mask, kind, scale, margin):
        n = logits.shape[0]
        return logits.new_empty((n,), dtype=_acc(logits)), logits.new_empty((n, 4), dtype=_acc(logits))

    @_fake("multilabel_row_bwd")
    def _(grad_loss, logits, mask, stats, kind, scale, margin):
        return logits.new_empty(logits.shape)
