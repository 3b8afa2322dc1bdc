"""The bad-input contract (DESIGN.md section 5): clear exceptions naming the argument, before any kernel."""

import pytest
import torch

import fastloss
from fastloss import reference

FUNCS = {
    "cross_entropy": fastloss.cross_entropy,
    "zloss": fastloss.zloss,
    "reference.cross_entropy": reference.cross_entropy,
    "reference.zloss": reference.zloss,
}


def _good(device="cpu"):
    return torch.randn(4, 5, device=device), torch.randint(0, 5, (4,), device=device)


@pytest.mark.parametrize("name", list(FUNCS))
@pytest.mark.parametrize(
    "case",
    [
        ("1-D logits", lambda x, t: (x[0], t[0]), {}, ValueError, "logits must have shape"),
        ("mismatched N", lambda x, t: (x, t[:3]), {}, ValueError, "target must have shape"),
        ("float target", lambda x, t: (x, t.float()), {}, TypeError, "target must hold integer"),
        ("bool target", lambda x, t: (x, t > 0), {}, TypeError, "target must hold integer"),
        ("int logits", lambda x, t: (x.long(), t), {}, TypeError, "logits must be float"),
        ("no classes", lambda x, t: (x[:, :0], t), {}, ValueError, "at least one class"),
        ("unknown reduction", lambda x, t: (x, t), {"reduction": "avg"}, ValueError, "reduction must be"),
        ("float ignore_index", lambda x, t: (x, t), {"ignore_index": 1.5}, TypeError, "ignore_index"),
        ("not a tensor", lambda x, t: (x.tolist(), t), {}, TypeError, "logits must be a torch.Tensor"),
    ],
    ids=lambda c: c[0] if isinstance(c, tuple) else c,
)
def test_common_bad_inputs(name, case):
    label, make, kw, exc, msg = case
    if label == "float target" and "cross_entropy" in name:  # read as probability targets, of the wrong shape
        exc, msg = ValueError, r"probability target \(floating point\) must have the shape of logits"
    x, t = make(*_good())
    with pytest.raises(exc, match=msg):
        FUNCS[name](x, t, **kw)


@pytest.mark.parametrize("fn", [fastloss.cross_entropy, reference.cross_entropy])
@pytest.mark.parametrize(
    "kw,exc,msg",
    [
        ({"weight": torch.ones(4)}, ValueError, r"weight must have shape \(5,\)"),
        ({"weight": torch.ones(5, dtype=torch.long)}, TypeError, "weight must be a floating"),
        ({"softcap": 0.0}, ValueError, "softcap must be > 0"),
        ({"softcap": -1.0}, ValueError, "softcap must be > 0"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing must be in"),
        ({"label_smoothing": -0.1}, ValueError, "label_smoothing must be >= 0"),
        ({"lse_square_scale": -1.0}, ValueError, "lse_square_scale must be >= 0"),
        ({"logit_scale": float("nan")}, ValueError, "logit_scale must be finite"),
        ({"logit_scale": 1e39}, ValueError, "logit_scale must be within float32 range"),
        ({"target_margin": torch.ones(3)}, ValueError, r"target_margin must have shape \(5,\)"),
        ({"target_margin": "big"}, TypeError, "target_margin must be a number"),
    ],
)
def test_cross_entropy_bad_options(fn, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        fn(*_good(), **kw)


@pytest.mark.parametrize("fn", [fastloss.zloss, reference.zloss])
@pytest.mark.parametrize("a", [0.0, -1.0, float("inf")])
def test_zloss_bad_a(fn, a):
    with pytest.raises(ValueError, match="a must be"):
        fn(*_good(), a=a)


@pytest.mark.host_kernels
@pytest.mark.parametrize("fn", list(FUNCS.values()))
@pytest.mark.parametrize("bad", [5, -1, 100])
def test_target_out_of_range_cpu_raises_index_error(fn, bad):
    x, t = _good()
    t[2] = bad
    with pytest.raises(IndexError, match=f"target {bad}"):
        fn(x, t)


@pytest.mark.host_kernels
def test_ops_called_directly_raise_on_bad_indices():
    x, t = _good()
    t[1] = 7
    with pytest.raises(IndexError):
        torch.ops.fastloss.cross_entropy_fwd(x, t, None, None, 0.0, 1.0, 0.0, -100, False)
    # the contrastive backward checks its positives as the forward does (a huge one read out of bounds)
    q, k, s = torch.randn(4, 3), torch.randn(6, 3), torch.ones(4)
    _, _, rs, cs = torch.ops.fastloss.contrastive_fwd(q, k, s, None, torch.arange(4), None, None, 0, False, False,
                                                      False, 0.0, 0.0, 0)
    for bad in (1000, -1, 2**40):
        p = torch.tensor([0, bad, 1, 2])
        with pytest.raises(IndexError, match="out of bounds"):
            torch.ops.fastloss.contrastive_bwd(torch.ones(4), torch.ones(0), q, k, s, None, p, None, None, rs, cs,
                                               0, False, False, False, 0.0, 0.0, 0, True, True)


def test_ops_called_directly_stay_safe():
    x, t = _good()
    t[1] = 7
    with pytest.raises(RuntimeError, match="logits must be 2-D"):
        torch.ops.fastloss.spherical_fwd(x[0], t[:1, None], None, 0, 1.0, 0.0, 0.0, -100)
    with pytest.raises(RuntimeError, match="target must be int64"):
        torch.ops.fastloss.spherical_fwd(x, t.int()[:, None], None, 0, 1.0, 0.0, 0.0, -100)
    with pytest.raises(RuntimeError, match="unknown spherical loss kind"):
        torch.ops.fastloss.spherical_fwd(x, t.clamp(0, 4)[:, None], None, 7, 1.0, 0.0, 0.0, -100)
    with pytest.raises(RuntimeError, match="target_weight must have the shape"):
        torch.ops.fastloss.spherical_fwd(x, t.clamp(0, 4)[:, None], torch.ones(4, 2), 0, 1.0, 0.0, 0.0, -100)
    with pytest.raises(RuntimeError, match="grad_parts has shape"):
        torch.ops.fastloss.cross_entropy_bwd(torch.ones(3, 3), x, t.clamp(0, 4), None, torch.ones(4, 3), 1.0, 0.0,
                                             -100, False)
    # a meta tensor among CPU ones dispatches to the fake kernel: it must refuse, not return uninitialised memory
    with pytest.raises(RuntimeError, match="every tensor must be on one device"):
        torch.ops.fastloss.cross_entropy_fwd(x, t.clamp(0, 4).to("meta"), None, None, 0.0, 1.0, 0.0, -100, False)
    with pytest.raises(RuntimeError, match="every tensor must be on one device"):
        torch.ops.fastloss.cross_entropy_bwd(torch.ones(4, 3, device="meta"), x, t.clamp(0, 4), None,
                                             torch.ones(4, 3), 1.0, 0.0, -100, False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_devices_mismatch():
    x, t = _good()
    with pytest.raises(ValueError, match="target is on"):
        fastloss.cross_entropy(x.cuda(), t)
    with pytest.raises(ValueError, match="weight is on"):
        fastloss.cross_entropy(x.cuda(), t.cuda(), weight=torch.ones(5))


def test_devices_mismatch_meta():
    """Device checks without a GPU: a meta tensor is another device."""
    x, t = _good()
    with pytest.raises(ValueError, match="target is on"):
        fastloss.cross_entropy(x, t.to("meta"))
    with pytest.raises(ValueError, match="weight is on"):
        fastloss.cross_entropy(x, t, weight=torch.ones(5, device="meta"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("fn", [fastloss.cross_entropy, fastloss.zloss])
def test_cuda_bad_target_nan_without_sync_and_validation(fn):
    x, t = _good("cuda")
    x.requires_grad_()
    t[1] = 9
    loss = fn(x, t, reduction="none")
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert loss[1].isnan() and not loss[[0, 2, 3]].isnan().any()
    assert g[1].isnan().all() and not g[[0, 2, 3]].isnan().any()
    fastloss.set_validation(True)
    with pytest.raises(IndexError, match="target 9"):
        fn(x, t)


@pytest.mark.parametrize("call,name", [
    (lambda x, t, v: fastloss.cross_entropy(x, t, weight=v), "weight"),
    (lambda x, t, v: fastloss.cross_entropy(x, t, target_margin=v), "target_margin"),
    (lambda x, t, v: reference.cross_entropy(x, t, weight=v), "weight"),
    (lambda x, t, v: fastloss.zloss(x, torch.stack([t, t], -1), target_weight=torch.stack([v[:4], v[:4]], -1)),
     "target_weight"),
    (lambda x, t, v: fastloss.spherical_softmax_loss(x, t[:, None], target_weight=v[:4, None]), "target_weight"),
    (lambda x, t, v: fastloss.linear_spherical_loss(x, torch.randn(5, 5), t[:, None], target_weight=v[:4, None]),
     "target_weight"),
], ids=["ce_weight", "ce_margin", "reference_ce_weight", "zloss_target_weight", "spherical_target_weight",
        "linear_spherical_target_weight"])
def test_options_without_a_gradient_refuse_requires_grad(call, name):
    """Tensor options the kernels read but do not differentiate (torch's class weights raise the same way)
    refuse requires_grad=True rather than return None or a partial gradient for them; under no_grad, or
    detached, they run."""
    x, t = _good()
    v = (torch.rand(5) + 0.5).requires_grad_()
    with pytest.raises(RuntimeError, match=f"{name} does not take a gradient"):
        call(x, t, v)
    with torch.no_grad():
        assert torch.isfinite(call(x, t, v))
    assert torch.isfinite(call(x, t, v.detach()))


@pytest.mark.parametrize("call,msg", [
    (lambda x, t: fastloss.cross_entropy(x, t, softcap=1e39), "softcap must be within float32 range"),
    (lambda x, t: fastloss.zloss(x, t, a=1e39), "a must be within float32 range"),
    (lambda x, t: fastloss.spherical_softmax_loss(x, t, eps=1e39), "eps must be within float32 range"),
    (lambda x, t: fastloss.softplus_cross_entropy(x, t, scale=-1e39), "scale must be within float32 range"),
    (lambda x, t: fastloss.contrastive_loss(x, x, logit_scale=1e39), "logit_scale must be within float32 range"),
    (lambda x, t: fastloss.contrastive_loss(x, x, logit_scale=1.0, hard_negative_beta=1e39),
     "hard_negative_beta must be within float32 range"),
    (lambda x, t: fastloss.zloss(x[0, 0], t[0]), r"logits must have shape \(N, C\)"),
    (lambda x, t: fastloss.zloss(x, t[:, None][:, :0]), "needs K >= 1"),
    (lambda x, t: fastloss.nt_xent_loss(x, x, temperature=torch.ones(3)), "temperature must be a number or a scalar"),
], ids=["softcap", "zloss_a", "eps", "scale", "contrastive_scale", "beta", "zloss_0d", "zloss_K0", "nt_xent_t"])
def test_options_name_themselves(call, msg):
    """Finite options beyond float32 range (the kernels hold options in fp32: they gave inf / NaN rows) and odd
    shapes raise a ValueError naming the argument."""
    with pytest.raises(ValueError, match=msg):
        call(*_good())


@pytest.mark.parametrize("call,name", [
    (lambda x, t, v: fastloss.cross_entropy(x, t, return_lse=v), "return_lse"),
    (lambda x, t, v: fastloss.contrastive_loss(x, x, logit_scale=1.0, decoupled=v), "decoupled"),
    (lambda x, t, v: fastloss.contrastive_loss(x, x, logit_scale=1.0, symmetric=v), "symmetric"),
    (lambda x, t, v: fastloss.contrastive_loss(x, x, logit_scale=1.0, return_stats=v), "return_stats"),
    (lambda x, t, v: fastloss.linear_spherical_loss(x, torch.randn(5, 5), t, allow_tf32=v), "allow_tf32"),
], ids=["return_lse", "decoupled", "symmetric", "return_stats", "allow_tf32"])
def test_flags_take_bools_only(call, name):
    """A flag given a string ("no") or None is refused by name instead of being read as its truth value; real
    bools (also numpy's and 0-d torch bools) run."""
    x, t = _good()
    for bad in ("no", None, 1):
        with pytest.raises(TypeError, match=f"{name} must be True or False"):
            call(x, t, bad)
    for ok in (False, torch.tensor(False)):
        call(x, t, ok)
