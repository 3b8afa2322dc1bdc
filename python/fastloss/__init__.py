"""fastloss: fused C++/CUDA training losses for huge output spaces.

    import fastloss
    loss = fastloss.cross_entropy(logits, target, label_smoothing=0.1, lse_square_scale=1e-4)
    loss = fastloss.zloss(logits, target)

Every function has a pure-PyTorch twin in :mod:`fastloss.reference` (same signature), which is also what runs
when the compiled extension is missing.
"""

import torch  # noqa: F401  (loads libc10/libtorch before the extension)

from . import (  # noqa: F401  (registrations)
    _autograd,
    _fake,
    _ops,  # loads fastloss._C (or warns once and falls back to fastloss.reference)
    nn,
    optim,  # OrthoGrad
    reference,
)
from ._validation import get_validation, set_validation
from .contrastive import clip_loss, contrastive_loss, nt_xent_loss, siglip_loss, supcon_loss
from .factored import FactoredSphericalLinear
from .functional import cross_entropy, spherical_mse_loss, spherical_softmax_loss, zloss
from .linear_cross_entropy import linear_cross_entropy
from .linear_spherical import linear_spherical_loss
from .sparsemax import entmax15, entmax15_loss, sparsemax, sparsemax_loss  # sparsemax family
from .stable_softmax import (  # stable-softmax family
    comp_sum_loss,
    decoupled_softmax_loss,
    generalized_cross_entropy,
    softmax_collapse_stats,
    softplus_cross_entropy,
    stablemax_cross_entropy,
    taylor_softmax_loss,
    zlpr_loss,
)

__version__ = "0.1.0"


def build_info() -> dict:
    """What this installation of fastloss was built with and which devices each op has kernels for."""
    return _ops.build_info(__version__)


__all__ = [
    "FactoredSphericalLinear",
    "build_info",
    "clip_loss",
    "contrastive_loss",
    "cross_entropy",
    "get_validation",
    "linear_cross_entropy",
    "linear_spherical_loss",
    "nn",
    "nt_xent_loss",
    "reference",
    "set_validation",
    "siglip_loss",
    "spherical_mse_loss",
    "spherical_softmax_loss",
    "supcon_loss",
    "zloss",
    # sparsemax family
    "entmax15",
    "entmax15_loss",
    "optim",
    "sparsemax",
    "sparsemax_loss",
    # stable-softmax family
    "comp_sum_loss",
    "decoupled_softmax_loss",
    "generalized_cross_entropy",
    "softmax_collapse_stats",
    "softplus_cross_entropy",
    "stablemax_cross_entropy",
    "taylor_softmax_loss",
    "zlpr_loss",
]
