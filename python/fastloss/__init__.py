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
    reference,
)
from ._validation import get_validation, set_validation
from .functional import cross_entropy, zloss
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
    "build_info",
    "cross_entropy",
    "get_validation",
    "nn",
    "reference",
    "set_validation",
    "zloss",
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
