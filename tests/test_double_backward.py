"""fastloss gradients are first-order: differentiating a gradient again raises instead of returning a silently
partial second derivative (the backward ops have no autograd of their own)."""

import pytest
import torch

import fastloss

gen = torch.Generator().manual_seed(3)
X = torch.randn(4, 7, generator=gen, dtype=torch.float64)
T = torch.tensor([1, 6, 0, 3])
H = torch.randn(4, 5, generator=gen, dtype=torch.float64)
W = torch.randn(7, 5, generator=gen, dtype=torch.float64)

CASES = {
    "cross_entropy": lambda x: fastloss.cross_entropy(x, T),
    "zloss": lambda x: fastloss.zloss(x, T),
    "spherical_softmax": lambda x: fastloss.spherical_softmax_loss(x, T),
    "stablemax": lambda x: fastloss.stablemax_cross_entropy(x, T),
    "zlpr": lambda x: fastloss.zlpr_loss(x, T[:, None]),
    "sparsemax": lambda x: (fastloss.sparsemax(x) * torch.arange(7.0, dtype=x.dtype)).sum(),
    "sparsemax_loss": lambda x: fastloss.sparsemax_loss(x, T),
    "infonce_one_pass": lambda x: fastloss.contrastive_loss(x, X.flip(0), logit_scale=2.0),
    "infonce_per_row": lambda x: fastloss.contrastive_loss(x, X.flip(0), logit_scale=2.0, reduction="none").sum(),
    "clip": lambda x: fastloss.clip_loss(x, X.flip(0), 2.0),
    "linear_spherical": lambda h: fastloss.linear_spherical_loss(h[:, :5], W, T),
    "factored": lambda h: fastloss.FactoredSphericalLinear(5, 7, dtype=torch.float64)(h[:, :5], T),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("upstream", ["plain", "weighted"])
def test_second_derivative_raises(name, upstream):
    x = X.clone().requires_grad_()
    loss = CASES[name](x)
    if upstream == "weighted":  # an upstream gradient that itself depends on x
        loss = loss * x.sum()
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives are not supported"):
        torch.autograd.grad(g.square().sum(), x)
