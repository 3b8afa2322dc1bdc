"""fastloss.zloss (de Brebisson & Vincent's Z-loss) against its reference and its closed-form gradient."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastloss
from fastloss import reference
from samples import TOL, grad_like, loss_and_grad, row_samples


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ab", [(1.0, 0.0), (2.5, 1.2), (0.3, -0.7)])
def test_matches_reference(device, dtype, reduction, ab):
    a, b = ab
    for s in row_samples(device, dtype):
        loss, grad = loss_and_grad(fastloss.zloss, s, a=a, b=b, reduction=reduction)
        ref_loss, ref_grad = loss_and_grad(reference.zloss, s, a=a, b=b, reduction=reduction)
        assert loss.dtype == dtype and loss.shape == ref_loss.shape
        rtol, atol = TOL[dtype]
        torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol, equal_nan=True)
        torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=atol * 10, equal_nan=True)


def test_closed_form(device):
    """Loss and gradient by the paper's formulas, written out here independently."""
    gen = torch.Generator().manual_seed(11)
    C, a, b = 23, 1.7, 0.4
    o = (torch.randn(6, C, generator=gen, dtype=torch.float64) * 2 + 3).to(device).requires_grad_()
    c = torch.randint(0, C, (6,), generator=gen).to(device)
    loss = fastloss.zloss(o, c, a=a, b=b, reduction="sum")
    (g,) = torch.autograd.grad(loss, o)
    od = o.detach()
    mu, sigma = od.mean(-1, keepdim=True), od.std(-1, unbiased=False, keepdim=True)
    z = (od - mu) / sigma
    zc = z.gather(-1, c[:, None])
    torch.testing.assert_close(loss, (F.softplus(a * (b - zc)) / a).sum())
    gs = torch.sigmoid(a * (b - zc))
    want = gs / (C * sigma) * (1 + zc * z) - gs / sigma * F.one_hot(c, C)
    torch.testing.assert_close(g, want)
    assert g.sum(-1).abs().max() < 1e-12 and (g * od).sum(-1).abs().max() < 1e-10  # shift/scale invariance


def test_large_mean_small_spread(device):
    """|mu| >> sigma in fp32: the mean taken relative to the row's first logit keeps the digits that
    q/C - mu^2 would cancel away."""
    gen = torch.Generator().manual_seed(12)
    x = (1e4 + torch.randn(8, 4097, generator=gen) * 1e-2).to(device)
    t = torch.randint(0, 4097, (8,), generator=gen).to(device)
    loss, grad = loss_and_grad(fastloss.zloss, _S(x, t), reduction="none")
    ref_loss, ref_grad = loss_and_grad(reference.zloss, _S(x.double(), t), reduction="none")
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-3 * ref_grad.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [1000, 1 << 18])
def test_outlier_first_logit_wide_row(device, dtype, C):
    """The row statistics are taken relative to the row's first logit (for |mean| >> std); an outlier there (a
    special token's logit, 20 std off) made q - s·d cancel by (20)^2, and a wide row lost its small terms
    (m2 relative error 4e-4 at C = 2^18 before groups were centred on their own means and merged pairwise).
    Now m2 and the mean stay within 1e-6 of float64, and every spherical loss and its gradient within 1e-5."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, C, generator=gen)
    x[:, 0] = 20.0
    x = x.to(device, dtype)
    t = torch.randint(1, C, (3, 1), generator=gen).to(device)
    _, stats = torch.ops.fastloss.spherical_fwd(x, t, None, 0, 1.0, 0.0, 0.0, -100)
    xd = x.double()
    mean = xd.mean(1)
    m2 = (xd - mean[:, None]).square().sum(1)
    std = (m2 / C).sqrt()
    # d = mean - x[0] is stored in fp32: its own rounding (|d| <= std sqrt(C)) is the floor
    d = mean - xd[:, 0]
    assert ((stats[:, 0].double() - d).abs() <= 4 * 2**-24 * d.abs() + 1e-6 * std).all()
    torch.testing.assert_close(stats[:, 1].double(), m2, rtol=1e-6, atol=0)
    for fn, ref in ((fastloss.zloss, reference.zloss),
                    (fastloss.spherical_softmax_loss, reference.spherical_softmax_loss),
                    (fastloss.taylor_softmax_loss, reference.taylor_softmax_loss),
                    (fastloss.spherical_mse_loss, reference.spherical_mse_loss)):
        loss, grad = loss_and_grad(fn, _S(x, t), reduction="none")  # (bf16: the 2-byte kernels, staged too)
        ref_loss, ref_grad = loss_and_grad(ref, _S(xd, t), reduction="none")
        tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps  # bf16 outputs: their own rounding
        torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=0, msg=lambda m, f=fn: f"{f}: {m}")
        torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol * ref_grad.abs().max().item(),
                                   msg=lambda m, f=fn: f"{f}: {m}")


class _S:
    def __init__(self, x, t):
        self.logits, self.target, self.kwargs, self.name = x, t, {}, "adhoc"

    def fresh(self, requires_grad=True):
        return self.logits.detach().clone().requires_grad_(requires_grad), self.target.clone()


def test_constant_rows_and_ignored(device):
    x = torch.zeros(3, 10, device=device, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, -100, 9], device=device)
    loss = fastloss.zloss(x, t, a=2.0, b=0.5, reduction="none")
    (g,) = torch.autograd.grad(loss.sum(), x)
    want = F.softplus(torch.tensor(2.0 * 0.5, dtype=torch.float64)) / 2.0
    torch.testing.assert_close(loss, torch.stack([want, want * 0, want]).to(device))
    assert (g == 0).all()
    assert math.isnan(fastloss.zloss(x, torch.full((3,), -100, device=device)).item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(device, dtype):
    """Low-precision logits are read exactly and computed in fp32: compare with float64 on the same values."""
    for s in row_samples(device, dtype)[:5]:
        loss, grad = loss_and_grad(fastloss.zloss, s, reduction="none")
        s64 = type(s)(s.name, s.logits.double(), s.target)
        ref_loss, ref_grad = loss_and_grad(reference.zloss, s64, reduction="none")
        torch.testing.assert_close(loss.double(), ref_loss, rtol=2 * torch.finfo(dtype).eps, atol=1e-3)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=2 * torch.finfo(dtype).eps, atol=1e-3)


def test_module_and_determinism(device):
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(32, 2049, generator=gen).to(device)
    t = torch.randint(0, 2049, (32,), generator=gen).to(device)
    mod = fastloss.nn.ZLoss(a=1.5, b=0.2)
    torch.testing.assert_close(mod(x, t), fastloss.zloss(x, t, a=1.5, b=0.2))
    runs = []
    for _ in range(2):
        xi = x.clone().requires_grad_()
        loss = fastloss.zloss(xi, t, reduction="none")
        (g,) = torch.autograd.grad(loss, xi, grad_like(loss))
        runs.append((loss, g))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_reference_constant_row_and_zero_argument():
    """The float64 oracle itself: a constant row whose mean does not round back to its value is still constant
    (loss softplus(a·b)/a, gradient 0, as the kernel gives), and softplus' derivative at exactly 0 is 1/2 (a
    z-score equal to b), matching the kernel and finite differences."""
    c = torch.full((1, 13), -2.310411800234176, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([3])
    for fn in (reference.zloss, fastloss.zloss):
        loss = fn(c, t, a=2.0, b=0.5)
        (g,) = torch.autograd.grad(loss, c)
        torch.testing.assert_close(loss, F.softplus(torch.tensor(1.0, dtype=torch.float64)) / 2.0)
        assert (g == 0).all()
    x = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64, requires_grad=True)  # z_c = 0 = b
    want = torch.autograd.grad(fastloss.zloss(x, torch.tensor([1])), x)[0]
    got = torch.autograd.grad(reference.zloss(x, torch.tensor([1])), x)[0]
    torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda y: reference.zloss(y, torch.tensor([1])), (x,))
