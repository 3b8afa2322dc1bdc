"""The spherical family on logits (Z-loss, spherical softmax, log-Taylor, squared error), one or K targets per row,
against the materialised reference, closed forms and gradcheck."""

import pytest
import torch

import fastloss
from fastloss import reference
from samples import TOL, grad_like, row_samples, streamed_rows

LOSSES = {
    "zloss": (fastloss.zloss, reference.zloss, {"a": 1.7, "b": 0.3}),
    "spherical_softmax": (fastloss.spherical_softmax_loss, reference.spherical_softmax_loss, {"eps": 1e-3}),
    "taylor_softmax": (fastloss.taylor_softmax_loss, reference.taylor_softmax_loss, {}),
    "mse": (fastloss.spherical_mse_loss, reference.spherical_mse_loss, {}),
}


def _multi_targets(t, C, K, gen):
    """(..., K) targets: the sample's target first, then random classes (repeats included) and padding."""
    extra = torch.randint(0, C, (*t.shape, K - 1), generator=gen).to(t.device)
    pad = torch.rand(extra.shape, generator=gen).to(t.device) < 0.3
    extra = torch.where(pad, torch.full_like(extra, -100), extra)
    if extra.numel() > 2:
        extra.reshape(-1, K - 1)[0, 0] = t.reshape(-1)[0] if t.numel() and t.reshape(-1)[0] >= 0 else 0
    return torch.cat([t[..., None], extra], -1)


def _loss_grad(fn, x, t, **kw):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, t, **kw)
    (g,) = torch.autograd.grad(loss, x, grad_like(loss)) if x.numel() else (torch.zeros_like(x),)
    return loss.detach(), g


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("K", [0, 1, 3, 40])  # 0: (...) targets; K: (..., K) targets with random weights
def test_matches_reference(device, name, dtype, reduction, K):
    fn, ref, kw = LOSSES[name]
    gen = torch.Generator().manual_seed(5)
    for s in row_samples(device, dtype):
        C = s.logits.shape[-1]
        t, w = s.target, None
        if K:
            t = _multi_targets(s.target, C, K, gen)
            w = (torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.2).to(device=device, dtype=dtype)
        loss, grad = _loss_grad(fn, s.logits, t, target_weight=w, reduction=reduction, **kw)
        ref_loss, ref_grad = _loss_grad(ref, s.logits.double(), t, target_weight=w, reduction=reduction, **kw)
        assert loss.dtype == dtype and loss.shape == ref_loss.shape, s.name
        rtol, atol = TOL[dtype]
        scale = ref_grad.abs().max().item() if ref_grad.numel() else 1.0
        torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol * 10, atol=atol * 10, equal_nan=True)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol * 10, atol=atol * 10 * (1 + scale),
                                   equal_nan=True, msg=lambda m, name=s.name: f"{name}: {m}")


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(device, name, dtype):
    """bf16/fp16 logits, fp32 maths: within a few roundings of the float64 result on the same values."""
    fn, ref, kw = LOSSES[name]
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(32, 1001, generator=gen) * 2).to(device=device, dtype=dtype)
    t = torch.randint(0, 1001, (32, 2), generator=gen).to(device)
    loss, grad = _loss_grad(fn, x, t, reduction="none", **kw)
    ref_loss, ref_grad = _loss_grad(ref, x.double(), t, reduction="none", **kw)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(loss.double(), ref_loss, rtol=4 * eps, atol=4 * eps)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=4 * eps, atol=4 * eps * ref_grad.abs().max().item())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [0, 2])
def test_cuda_many_rows_per_block(name, dtype, K):
    """Thousands of aligned 2-byte rows through the staged forward (a persistent grid, several rows per block,
    each row's shift loaded a row ahead, targets checked at the row's end), one or two weighted targets per row:
    loss and gradient against float64 of the same values; a bad target in row 7 gives NaN in that row only."""
    fn, ref, kw = LOSSES[name]
    gen = torch.Generator().manual_seed(8)
    for case, x, t in streamed_rows("cuda", dtype):
        C = x.shape[-1]
        w = None
        if K:
            t = _multi_targets(t, C, K, gen)
            w = (torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.2).to(device="cuda", dtype=dtype)
        rows = torch.arange(x.shape[0], device="cuda") != 7
        xi = x.detach().requires_grad_()  # the view itself: the offset slice keeps its row stride
        loss = fn(xi, t, target_weight=w, reduction="none", **kw)
        (grad,) = torch.autograd.grad(loss, xi, grad_like(loss))
        ref_loss, ref_grad = _loss_grad(ref, x.double(), t, target_weight=w, reduction="none", **kw)
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(loss.double(), ref_loss, rtol=4 * eps, atol=4 * eps, msg=case)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=4 * eps, atol=4 * eps * ref_grad.abs().max().item(),
                                   msg=case)
        if x.shape[0] > 7:
            bad = t.clone()
            bad[7] = C  # out of range (the first target of a multi-target row)
            xi = x.detach().requires_grad_()
            loss = fn(xi, bad, target_weight=w, reduction="none", **kw)
            (grad,) = torch.autograd.grad(loss, xi, grad_like(loss))
            assert loss[7].isnan() and grad[7].isnan().all(), case
            assert not loss[rows].isnan().any() and not grad[rows].isnan().any(), case


def test_closed_forms(device):
    """Each member by its textbook formula, written out independently of both implementations."""
    gen = torch.Generator().manual_seed(7)
    C = 19
    o = (torch.randn(5, C, generator=gen, dtype=torch.float64) * 1.5 + 0.5).to(device)
    c = torch.randint(0, C, (5,), generator=gen).to(device)
    oc = o.gather(-1, c[:, None]).squeeze(-1)
    eps = 1e-3
    want = {
        "spherical_softmax": -torch.log((oc**2 + eps) / (o**2 + eps).sum(-1)),
        "taylor_softmax": -torch.log((1 + oc + oc**2 / 2) / (1 + o + o**2 / 2).sum(-1)),
        "mse": (o**2).sum(-1) - 2 * oc + 1,
    }
    for name, value in want.items():
        fn, _, kw = LOSSES[name]
        torch.testing.assert_close(fn(o, c, reduction="none", **kw), value)
    # gradient template dL/do_k = alpha + beta o_k + gamma [k = c] (research/spherical.md section 1)
    x = o.clone().requires_grad_()
    (g,) = torch.autograd.grad(fastloss.taylor_softmax_loss(x, c, reduction="sum"), x)
    Z = (1 + o + o**2 / 2).sum(-1, keepdim=True)
    want_g = (1 + o) / Z - torch.nn.functional.one_hot(c, C) * ((1 + oc) / (1 + oc + oc**2 / 2))[:, None]
    torch.testing.assert_close(g, want_g)


def test_multi_target_definitions(device):
    """K targets: weighted mean of the per-target losses; squared error to y = sum_j w_j e_{c_j} (repeats add)."""
    o = torch.tensor([[0.5, -1.0, 2.0, 0.25]], dtype=torch.float64, device=device)
    t = torch.tensor([[2, 0, 2, -100]], device=device)
    w = torch.tensor([[1.0, 3.0, 0.5, 9.0]], dtype=torch.float64, device=device)
    y = torch.tensor([[3.0, 0.0, 1.5, 0.0]], dtype=torch.float64, device=device)
    torch.testing.assert_close(fastloss.spherical_mse_loss(o, t, target_weight=w), ((o - y) ** 2).sum())
    per = [fastloss.zloss(o, torch.tensor([c], device=device), a=1.3) for c in (2, 0, 2)]
    want = (1.0 * per[0] + 3.0 * per[1] + 0.5 * per[2]) / 4.5
    torch.testing.assert_close(fastloss.zloss(o, t, target_weight=w, a=1.3), want)


def test_rows_without_targets(device):
    x = torch.randn(3, 6, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.tensor([[1, -100], [-100, -100], [2, 2]], device=device)
    w = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64, device=device)
    for fn in (fastloss.zloss, fastloss.spherical_softmax_loss, fastloss.taylor_softmax_loss):
        rows = fn(x, t, target_weight=w, reduction="none")
        assert rows[1] == 0 and rows[2] == 0  # no valid target; weights summing to 0
        (g,) = torch.autograd.grad(fn(x, t, target_weight=w), x)
        assert (g[1:] == 0).all()
        torch.testing.assert_close(fn(x, t, target_weight=w), rows[0] / 2)  # mean over the 2 counted rows
    assert torch.isnan(fastloss.zloss(x, torch.full((3, 2), -100, device=device)))


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradcheck_float64(device, name):
    fn, _, kw = LOSSES[name]
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    t = torch.randint(0, 7, (2, 3, 2), generator=gen).to(device)
    t[0, 1, 0] = -100
    w = (torch.rand(2, 3, 2, generator=gen, dtype=torch.float64) + 0.5).to(device)
    assert torch.autograd.gradcheck(lambda x: fn(x, t, target_weight=w, reduction="none", **kw), (x,), eps=1e-6,
                                    atol=1e-7, rtol=1e-6)


def test_spherical_softmax_eps(device):
    x = torch.zeros(2, 5, dtype=torch.float64, device=device)
    t = torch.tensor([0, 3], device=device)
    want = torch.tensor(5.0, dtype=torch.float64, device=device).log()
    torch.testing.assert_close(fastloss.spherical_softmax_loss(x, t, eps=1e-4), want)
    with pytest.raises(ValueError, match="eps"):
        fastloss.spherical_softmax_loss(x, t, eps=-1.0)
    with pytest.raises(ValueError, match="order"):
        fastloss.taylor_softmax_loss(x, t, order=3)
    with pytest.raises(ValueError, match="target_weight"):
        fastloss.zloss(x, t[:, None], target_weight=torch.ones(2, 3, dtype=torch.float64, device=device))
