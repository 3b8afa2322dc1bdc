"""nn.Module wrappers with the constructor arguments of their torch counterparts."""

from __future__ import annotations

import torch
from torch.nn import _reduction

from . import functional as F
from .spherical import DEFAULT_EPS


class CrossEntropyLoss(torch.nn.Module):
    """Drop-in for :class:`torch.nn.CrossEntropyLoss` (class-last logits) backed by
    :func:`fastloss.cross_entropy`, with its extra keyword options."""

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        lse_square_scale: float = 0.0,
        softcap: float | None = None,
        logit_scale: float = 1.0,
        target_margin: float | torch.Tensor = 0.0,
    ):
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = _reduction.legacy_get_string(size_average, reduce)
        self.register_buffer("weight", weight)
        if isinstance(target_margin, torch.Tensor):
            self.register_buffer("target_margin", target_margin)
        else:
            self.target_margin = target_margin
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.logit_scale = logit_scale

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, lse_square_scale=self.lse_square_scale, softcap=self.softcap,
            logit_scale=self.logit_scale, target_margin=self.target_margin,
        )


class ZLoss(torch.nn.Module):
    """Module form of :func:`fastloss.zloss` (de Brébisson & Vincent's Z-loss)."""

    def __init__(self, a: float = 1.0, b: float = 0.0, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        self.a, self.b, self.ignore_index, self.reduction = a, b, ignore_index, reduction

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.zloss(input, target, a=self.a, b=self.b, ignore_index=self.ignore_index, reduction=self.reduction)


class LinearSphericalLoss(torch.nn.Module):
    """Module form of :func:`fastloss.linear_spherical_loss`: ``forward(hidden, weight, target, bias=None)``."""

    def __init__(self, loss: str = "zloss", *, a: float = 1.0, b: float = 0.0, eps: float = DEFAULT_EPS,
                 ignore_index: int = -100, reduction: str = "mean", process_group=None, allow_tf32: bool = False,
                 bf16_split: bool | None = None, centred_gram: bool | None = None,
                 weight_grad_precision: str = "fp32"):
        super().__init__()
        self.loss, self.a, self.b, self.eps = loss, a, b, eps
        self.ignore_index, self.reduction = ignore_index, reduction
        self.process_group, self.allow_tf32, self.bf16_split = process_group, allow_tf32, bf16_split
        self.centred_gram, self.weight_grad_precision = centred_gram, weight_grad_precision

    def forward(self, hidden, weight, target, bias=None, target_weight=None):
        from .linear_spherical import linear_spherical_loss

        return linear_spherical_loss(hidden, weight, target, bias=bias, loss=self.loss, a=self.a, b=self.b,
                                     eps=self.eps, target_weight=target_weight, ignore_index=self.ignore_index,
                                     reduction=self.reduction, process_group=self.process_group,
                                     allow_tf32=self.allow_tf32, bf16_split=self.bf16_split,
                                     centred_gram=self.centred_gram,
                                     weight_grad_precision=self.weight_grad_precision)


class LinearCrossEntropyLoss(torch.nn.Module):
    """Drop-in for :class:`torch.nn.LinearCrossEntropyLoss` (an owned ``self.linear`` head, ``forward(input,
    target)``) backed by :func:`fastloss.linear_cross_entropy`, with its extra keyword options. K-dimensional
    ``out_features`` are not supported."""

    def __init__(self, in_features: int, num_classes: int, *, bias: bool = False, device=None, dtype=None,
                 reduction: str = "mean", weight: torch.Tensor | None = None, ignore_index: int = -100,
                 label_smoothing: float = 0.0, lse_square_scale: float = 0.0, softcap: float | None = None,
                 logit_scale: float = 1.0, target_margin: float | torch.Tensor = 0.0, chunk_size: int | None = None):
        super().__init__()
        self.linear = torch.nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight", weight)
        if isinstance(target_margin, torch.Tensor):
            self.register_buffer("target_margin", target_margin)
        else:
            self.target_margin = target_margin
        self.reduction, self.ignore_index, self.label_smoothing = reduction, ignore_index, label_smoothing
        self.lse_square_scale, self.softcap, self.logit_scale = lse_square_scale, softcap, logit_scale
        self.chunk_size = chunk_size

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from .linear_cross_entropy import linear_cross_entropy

        return linear_cross_entropy(
            input, self.linear.weight, target, linear_bias=self.linear.bias, weight=self.weight,
            ignore_index=self.ignore_index, reduction=self.reduction, label_smoothing=self.label_smoothing,
            lse_square_scale=self.lse_square_scale, softcap=self.softcap, logit_scale=self.logit_scale,
            target_margin=self.target_margin, chunk_size=self.chunk_size,
        )


# --- contrastive family: drop-ins for open_clip's single-device ClipLoss / SigLipLoss call signatures.
class ClipLoss(torch.nn.Module):
    """``loss = ClipLoss()(image_features, text_features, logit_scale[, logit_bias])``, like open_clip's
    ``ClipLoss`` on one device (``output_dict=True`` returns ``{"contrastive_loss": loss}``), backed by
    :func:`fastloss.clip_loss`; the N x N logits are never stored."""

    def __init__(self, *, output_dict: bool = False, block_rows: int | None = None):
        super().__init__()
        self.output_dict, self.block_rows = output_dict, block_rows

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=None):
        from .contrastive import clip_loss

        loss = clip_loss(image_features, text_features, logit_scale, logit_bias, block_rows=self.block_rows)
        return {"contrastive_loss": loss} if (self.output_dict if output_dict is None else output_dict) else loss


class SigLipLoss(torch.nn.Module):
    """``loss = SigLipLoss()(image_features, text_features, logit_scale, logit_bias)``, like open_clip's
    ``SigLipLoss`` on one device, backed by :func:`fastloss.siglip_loss`."""

    def __init__(self, *, output_dict: bool = False, block_rows: int | None = None):
        super().__init__()
        self.output_dict, self.block_rows = output_dict, block_rows

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=None):
        from .contrastive import siglip_loss

        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, block_rows=self.block_rows)
        return {"contrastive_loss": loss} if (self.output_dict if output_dict is None else output_dict) else loss

# sparsemax family -------------------------------------------------------------------------------------------------
class Sparsemax(torch.nn.Module):
    """Module form of :func:`fastloss.sparsemax` (like ``entmax.Sparsemax``)."""

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.sparsemax(input, dim=self.dim)


class Entmax15(Sparsemax):
    """Module form of :func:`fastloss.entmax15` (like ``entmax.Entmax15``)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.entmax15(input, dim=self.dim)


class SparsemaxLoss(torch.nn.Module):
    """Module form of :func:`fastloss.sparsemax_loss`; ``reduction="elementwise_mean"`` (entmax's name) is "mean"."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = "mean" if reduction == "elementwise_mean" else reduction

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.sparsemax_loss(input, target, ignore_index=self.ignore_index, reduction=self.reduction)


class Entmax15Loss(SparsemaxLoss):
    """Module form of :func:`fastloss.entmax15_loss`."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.entmax15_loss(input, target, ignore_index=self.ignore_index, reduction=self.reduction)
