"""fastloss.FactoredSphericalLinear: the implicit SGD step equals dense SGD on an explicit weight."""

import pytest
import torch

import fastloss
from fastloss import reference

LOSSES = ["zloss", "spherical_softmax", "taylor_softmax", "mse"]


def _dense_run(layer, loss, steps, lr, wd, dtype, m=8, seed=0, K=None, check_every_step=True, **loss_kw):
    """Runs the factored layer and dense SGD (in float64, on the same inputs) side by side; returns the worst
    relative differences."""
    gen = torch.Generator().manual_seed(seed)
    W = layer.weight.detach().double().requires_grad_()
    b = layer.bias.detach().double().requires_grad_() if layer.has_bias else None
    out, d = W.shape
    worst = {"loss": 0.0, "grad_hidden": 0.0, "weight": 0.0, "bias": 0.0}
    rel = lambda x, y: ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()  # noqa: E731
    for _ in range(steps):
        h = torch.randn(m, d, generator=gen, dtype=torch.float64).to(dtype)
        t = torch.randint(0, out, (m,) if K is None else (m, K), generator=gen)
        t.view(-1)[1] = t.view(-1)[2]  # a repeated target in every minibatch
        t.view(-1)[3] = -100
        h1 = h.clone().requires_grad_()
        loss1 = layer(h1, t)
        loss1.backward()
        layer.sgd_step(lr, weight_decay=wd)
        h2 = h.double().requires_grad_()
        loss2 = reference.linear_spherical_loss(h2, W, t, bias=b, loss=loss, **loss_kw)
        loss2.backward()
        with torch.no_grad():
            W -= lr * (W.grad + wd * W)
            W.grad = None
            if b is not None:
                b -= lr * b.grad
                b.grad = None
        if check_every_step or _ == steps - 1:
            worst["loss"] = max(worst["loss"], rel(loss1.detach().double(), loss2.detach()))
            worst["grad_hidden"] = max(worst["grad_hidden"], rel(h1.grad.double(), h2.grad))
            worst["weight"] = max(worst["weight"], rel(layer.weight.double(), W.detach()))
            if b is not None:
                worst["bias"] = max(worst["bias"], rel(layer.bias.double(), b.detach()))
    return worst


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("wd", [0.0, 0.02])
def test_equals_dense_sgd_float64(loss, bias, wd):
    torch.manual_seed(0)
    layer = fastloss.FactoredSphericalLinear(7, 53, loss=loss, bias=bias, dtype=torch.float64)
    worst = _dense_run(layer, loss, 60, lr=0.05, wd=wd, dtype=torch.float64)
    assert max(worst.values()) < 1e-9, worst
    drift = layer.consistency()
    assert max(drift.values()) < 1e-10, drift


def test_multi_target_and_stabilisation_float64():
    """(m, K) targets, and the periodic re-inversion / re-factorisation / recompute paths exercised."""
    torch.manual_seed(1)
    layer = fastloss.FactoredSphericalLinear(5, 31, loss="zloss", dtype=torch.float64, reinvert_period=3,
                                             stabilize_period=4, recompute_period=5)
    worst = _dense_run(layer, "zloss", 40, lr=0.3, wd=0.01, dtype=torch.float64, K=3)
    assert max(worst.values()) < 1e-9, worst


@pytest.mark.parametrize("loss", LOSSES)
def test_float32_300_steps(loss):
    """A float32 layer (V in float32, the d x d state in float64) over 300 steps stays within 1e-4 of exact
    (float64) dense SGD on the same inputs. Spherical softmax runs with eps=1e-2: at its default 1e-4 the target
    term's gradient reaches 100 and this SGD trajectory amplifies rounding, so that dense float32 SGD itself
    drifts by ~1e-3 from the exact one."""
    torch.manual_seed(2)
    kw = {"eps": 1e-2} if loss == "spherical_softmax" else {}
    layer = fastloss.FactoredSphericalLinear(16, 200, loss=loss, dtype=torch.float32, **kw)
    worst = _dense_run(layer, loss, 300, lr=0.02, wd=0.001, dtype=torch.float32, m=16, check_every_step=False, **kw)
    assert worst["weight"] < 1e-4 and worst["bias"] < 1e-4, worst


def test_dense_views_and_state_dict():
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(23, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(23, generator=gen, dtype=torch.float64)
    layer = fastloss.FactoredSphericalLinear.from_dense(W, b, loss="taylor_softmax")
    torch.testing.assert_close(layer.weight, W)
    torch.testing.assert_close(layer.bias, b)
    h = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(layer.logits(h), h @ W.t() + b)
    t = torch.randint(0, 23, (4,), generator=gen)
    layer(h.requires_grad_(), t).backward()
    layer.sgd_step(0.1)
    clone = fastloss.FactoredSphericalLinear(6, 23, loss="taylor_softmax", dtype=torch.float64)
    clone.load_state_dict(layer.state_dict())
    torch.testing.assert_close(clone.weight, layer.weight)
    torch.testing.assert_close(clone.logits(h.detach()), layer.logits(h.detach()))
    torch.testing.assert_close(clone.logits(h.detach()), h.detach() @ layer.weight.t() + layer.bias)


def test_bad_inputs():
    layer = fastloss.FactoredSphericalLinear(4, 10)
    h, t = torch.randn(3, 4), torch.tensor([1, 2, 3])
    with pytest.raises(RuntimeError, match="backward"):
        layer.sgd_step(0.1)
    layer(h.requires_grad_(), t).backward()
    for lr in (0.0, -1.0):
        with pytest.raises(ValueError, match="lr"):
            layer.sgd_step(lr)
    with pytest.raises(IndexError, match="out of bounds"):
        layer(h, torch.tensor([1, 10, 3]))
    with pytest.raises(ValueError, match="width"):
        layer(torch.randn(3, 5), t)
    with pytest.raises(ValueError, match="batch"):
        layer(torch.randn(4), t)
    with pytest.raises(ValueError, match="loss must be one of"):
        fastloss.FactoredSphericalLinear(4, 10, loss="softmax")
    with pytest.raises(RuntimeError, match="target_weight does not take a gradient"):
        layer(h, t[:, None], target_weight=torch.ones(3, 1, requires_grad=True))


def test_all_ignored_batch_leaves_the_weights():
    """A batch with every target ignored: the mean loss is NaN (as torch's), the hidden gradient zero, and the
    SGD step leaves the weights as they were (no NaN from 1/0 times a zero coefficient)."""
    layer = fastloss.FactoredSphericalLinear(8, 20, dtype=torch.float64)
    before = layer.weight.clone()
    h = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    loss = layer(h, torch.full((5,), -100))
    loss.backward()
    layer.sgd_step(0.1)
    assert torch.isnan(loss)
    assert (h.grad == 0).all()
    torch.testing.assert_close(layer.weight, before, rtol=0, atol=0)
