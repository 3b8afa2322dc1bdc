"""fastloss.optim.OrthoGrad (⊥Grad of Prieto et al. 2025) against a step computed by hand."""

import io

import pytest
import torch

from fastloss.optim import OrthoGrad


def _hand_projected(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """g - (w.g / w.w) w, rescaled to |g|, written out in float64."""
    w, g = w.double().flatten(), g.double().flatten()
    go = g - (w @ g) / (w @ w) * w
    return go * (g.norm() / go.norm())


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, generator=gen).requires_grad_(), torch.randn(5, generator=gen).requires_grad_()]


def _grads(params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def test_sgd_step_by_hand():
    params = _params()
    before = [p.detach().clone() for p in params]
    _grads(params)
    grads = [p.grad.clone() for p in params]
    opt = OrthoGrad(params, base_optimizer=torch.optim.SGD, lr=0.1)
    opt.step()
    for p, w0, g in zip(params, before, grads, strict=True):
        g_orth = _hand_projected(w0, g)
        torch.testing.assert_close(p.detach().double().flatten(), w0.double().flatten() - 0.1 * g_orth,
                                   rtol=1e-6, atol=1e-6)
        # The gradient left in .grad is orthogonal to the weight and keeps the original norm.
        assert abs(float(p.grad.flatten().double() @ w0.flatten().double())) < 1e-5
        torch.testing.assert_close(p.grad.norm(), g.norm())


def test_adamw_equals_adamw_on_projected_grads():
    a, b = _params(), _params()
    opt_a = OrthoGrad(a, base_optimizer=torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1)
    for step in range(3):
        _grads(a, seed=10 + step)
        _grads(b, seed=10 + step)
        for p in b:
            p.grad = _hand_projected(p.detach(), p.grad).float().view_as(p)
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a, b, strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_zero_weight_and_zero_grad_are_finite():
    w = torch.zeros(6, requires_grad=True)
    w.grad = torch.ones(6)
    v = torch.ones(3, requires_grad=True)
    v.grad = torch.zeros(3)
    OrthoGrad([w, v], lr=1.0).step()
    torch.testing.assert_close(w.detach(), -torch.ones(6))  # nothing to project out of a zero weight
    torch.testing.assert_close(v.detach(), torch.ones(3))
    assert torch.isfinite(w.grad).all() and torch.isfinite(v.grad).all()


def test_state_dict_round_trip():
    a = _params()
    opt = OrthoGrad(a, base_optimizer=torch.optim.Adam, lr=1e-2, betas=(0.8, 0.9))
    for step in range(2):
        _grads(a, seed=step)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # a real round trip: no tensor shared with the live optimizer
    buf.seek(0)
    sd = torch.load(buf)
    assert sd["state"] and sd["param_groups"][0]["betas"] == (0.8, 0.9)
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_b = OrthoGrad(b, base_optimizer=torch.optim.Adam, lr=5.0)  # lr comes back from the state dict
    opt_b.load_state_dict(sd)
    assert opt_b.param_groups[0]["lr"] == 1e-2 and opt_b.param_groups is opt_b.base_optimizer.param_groups
    for step in range(2, 4):
        _grads(a, seed=step)
        _grads(b, seed=step)
        opt.step()
        opt_b.step()
    for pa, pb in zip(a, b, strict=True):
        torch.testing.assert_close(pa, pb)


def test_scheduler_and_closure():
    params = _params()
    opt = OrthoGrad(params, lr=1.0, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def closure():
        opt.zero_grad()
        loss = sum((p * p).sum() + p.sum() for p in params)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.ndim == 0
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5


def test_bad_base_optimizer():
    with pytest.raises(TypeError, match="base_optimizer must be a torch.optim.Optimizer subclass"):
        OrthoGrad(_params(), base_optimizer=torch.optim.SGD(_params(), lr=0.1))
