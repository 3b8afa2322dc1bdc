"""Stable-softmax family: StableMax, Taylor (+ SM-Taylor margin), softplus, comp-sum / GCE, ZLPR, decoupled
softmax (DEXML) and the Softmax Collapse diagnostics: reference parity, independent closed forms, op
contracts (opcheck, float64 gradcheck, compile fullgraph), masking, ignore_index, low precision, bad input."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastloss
from fastloss import reference
from samples import TOL, check_compile_fullgraph, grad_like, loss_and_grad, row_samples

ops = torch.ops.fastloss

SINGLE = {
    "stablemax": ("stablemax_cross_entropy", [{}]),
    "taylor": ("taylor_softmax_loss", [{"order": n} for n in (2, 4, 6, 8, 10)] + [{"order": 4, "margin": 0.7}]),
    "softplus": ("softplus_cross_entropy", [{}, {"scale": 2.5}]),
    "comp_sum": ("comp_sum_loss", [{"tau": tau} for tau in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)]),
    "gce": ("generalized_cross_entropy", [{"q": 0.7}, {"q": 1.0}]),
}
SINGLE_CASES = [(name, kw) for name, (_, kws) in SINGLE.items() for kw in kws]


def _fns(kind):
    name = SINGLE[kind][0]
    return getattr(fastloss, name), getattr(reference, name)


def _case_id(c):
    return c[0] + "-" + "-".join(f"{k}{v}" for k, v in c[1].items())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", SINGLE_CASES, ids=_case_id)
def test_single_label_matches_reference(device, dtype, reduction, case):
    kind, kw = case
    fn, ref = _fns(kind)
    big = reduction == "none" and dtype == torch.float32 and kw is SINGLE[kind][1][0]  # C > 65536 once per kind
    for s in row_samples(device, dtype, big=big):
        if kind == "taylor" and kw["order"] >= 8:  # keep t_n(z) well inside float32 for the sample scale
            s = type(s)(s.name, s.logits * 0.3, s.target)
        loss, grad = loss_and_grad(fn, s, reduction=reduction, **kw)
        ref_loss, ref_grad = loss_and_grad(ref, s, reduction=reduction, **kw)
        assert loss.dtype == dtype and loss.shape == ref_loss.shape, s.name
        rtol, atol = TOL[dtype]
        if dtype == torch.float32:  # sums over up to 7e4 classes in float32
            rtol, atol = 2e-5, 2e-5 * (ref_loss.nan_to_num().abs().max().item() + 1 if ref_loss.numel() else 1)
        torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol, equal_nan=True, msg=s.name)
        gscale = ref_grad.nan_to_num().abs().max().item() if ref_grad.numel() else 1.0
        gatol = TOL[dtype][1] + (1e-5 * gscale if dtype != torch.float64 else 0.0)
        torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=gatol, equal_nan=True, msg=s.name)


@pytest.mark.parametrize("case", [("stablemax", {}), ("taylor", {"order": 6}), ("softplus", {"scale": 0.5}),
                                  ("comp_sum", {"tau": 0.3}), ("gce", {"q": 0.4})], ids=_case_id)
def test_class_weight_and_ignore(device, case):
    kind, kw = case
    fn, ref = _fns(kind)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(17, 29, generator=gen, dtype=torch.float64).to(device)
    t = torch.randint(0, 29, (17,), generator=gen).to(device)
    t[::4] = -100
    w = (torch.rand(29, generator=gen, dtype=torch.float64) + 0.2).to(device)
    for reduction in ("mean", "sum", "none"):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        a = fn(xa, t, weight=w, reduction=reduction, **kw)
        b = ref(xb, t, weight=w, reduction=reduction, **kw)
        torch.testing.assert_close(a, b)
        (ga,) = torch.autograd.grad(a.sum(), xa)
        (gb,) = torch.autograd.grad(b.sum(), xb)
        torch.testing.assert_close(ga, gb)
        assert (ga[t == -100] == 0).all()
    # the weighted mean divides by the sum of the counted rows' weights, like torch's cross-entropy
    rows = fn(x, t, reduction="none", **kw)
    counted = t != -100
    wy = w[t.clamp(min=0)] * counted
    torch.testing.assert_close(fn(x, t, weight=w, **kw), (rows * wy).sum() / wy.sum())
    assert math.isnan(fn(x, torch.full_like(t, -100), **kw).item())


# ------------------------------------------------------------------------------ independent closed forms


def _nll_from_probs_unnormalised(phi_rows, t):
    return -(phi_rows.gather(-1, t[:, None]).squeeze(-1) / phi_rows.sum(-1)).log()


def test_stablemax_matches_authors_float64(device):
    """The authors' computation (logits upcast to float64, log(s / sum s)) against our float32 kernel, also at
    logits of 1e4, where fp32 rounding is the only difference."""
    gen = torch.Generator().manual_seed(5)
    for scale in (1.0, 30.0, 1e4):
        x = (torch.randn(64, 1000, generator=gen) * scale).to(device)
        t = torch.randint(0, 1000, (64,), generator=gen).to(device)
        x[:8, :] *= 1e-3
        x[torch.arange(8), t[:8]] = 1e4  # confidently right rows: tiny but non-zero losses
        x64 = x.double().requires_grad_()
        s = torch.where(x64 >= 0, x64 + 1, 1 / (1 - x64))
        want = -torch.log(s / s.sum(-1, keepdim=True)).gather(-1, t[:, None]).squeeze(-1)
        (gwant,) = torch.autograd.grad(want.sum(), x64)
        xf = x.clone().requires_grad_()
        got = fastloss.stablemax_cross_entropy(xf, t, reduction="none")
        (g,) = torch.autograd.grad(got.sum(), xf)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
        torch.testing.assert_close(g.double(), gwant, rtol=1e-4, atol=1e-6 * gwant.abs().max().item())
        assert (got[:8] > 0).all()


@pytest.mark.parametrize("order", [2, 4, 6, 8, 10])
@pytest.mark.parametrize("margin", [0.0, 0.8])
def test_taylor_closed_form(device, order, margin):
    gen = torch.Generator().manual_seed(order)
    x = (torch.randn(9, 31, generator=gen, dtype=torch.float64) * 2).to(device).requires_grad_()
    t = torch.randint(0, 31, (9,), generator=gen).to(device)
    z = x - margin * F.one_hot(t, 31)  # SM-Taylor: the target's term at z_y - m, in numerator and sum
    f = sum(z**i / math.factorial(i) for i in range(order + 1))
    want = _nll_from_probs_unnormalised(f, t)
    (gwant,) = torch.autograd.grad(want.sum(), x)
    got = fastloss.taylor_softmax_loss(x, t, order=order, margin=margin, reduction="none")
    (g,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, gwant)


def test_softplus_closed_form(device):
    gen = torch.Generator().manual_seed(8)
    x = (torch.randn(9, 31, generator=gen, dtype=torch.float64) * 4).to(device).requires_grad_()
    t = torch.randint(0, 31, (9,), generator=gen).to(device)
    want = _nll_from_probs_unnormalised(F.softplus(1.7 * x, threshold=100), t)
    (gwant,) = torch.autograd.grad(want.sum(), x)
    got = fastloss.softplus_cross_entropy(x, t, scale=1.7, reduction="none")
    (g,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, gwant)
    # very negative target logits: log softplus(t) ~ t, the loss stays finite in float32
    xs = torch.full((2, 5), -60.0, device=device)
    xs[:, 1] = 0.0
    loss = fastloss.softplus_cross_entropy(xs, torch.tensor([0, 1], device=device), reduction="none")
    assert torch.isfinite(loss).all() and loss[0] > 59


def test_comp_sum_closed_forms(device):
    gen = torch.Generator().manual_seed(9)
    x = (torch.randn(12, 40, generator=gen, dtype=torch.float64) * 2).to(device).requires_grad_()
    t = torch.randint(0, 40, (12,), generator=gen).to(device)
    p = x.softmax(-1)
    py = p.gather(-1, t[:, None]).squeeze(-1)
    cases = {
        1.0: F.cross_entropy(x, t, reduction="none"),  # tau = 1: cross-entropy (peer: torch)
        0.0: 1 / py - 1,  # sum-exponential
        2.0: 1 - py,  # MAE
        0.5: ((1 / py) ** 0.5 - 1) / 0.5,
    }
    for tau, want in cases.items():
        torch.testing.assert_close(fastloss.comp_sum_loss(x, t, tau=tau, reduction="none"), want)
    q = 0.6
    torch.testing.assert_close(fastloss.generalized_cross_entropy(x, t, q=q, reduction="none"), (1 - py**q) / q)
    # gradient p_y^(tau - 1) (p - e_y)
    tau = 1.4
    (g,) = torch.autograd.grad(fastloss.comp_sum_loss(x, t, tau=tau, reduction="sum"), x)
    want = py[:, None] ** (tau - 1) * (p - F.one_hot(t, 40))
    torch.testing.assert_close(g, want.detach())


def test_comp_sum_keeps_tiny_losses(device):
    """A confident row: 1 - p_y^q would round to 0 in float32; the expm1 form keeps it."""
    x = torch.zeros(1, 100, device=device)
    x[0, 3] = 30.0
    t = torch.tensor([3], device=device)
    u = 99 * math.exp(-30.0)
    got = fastloss.generalized_cross_entropy(x, t, q=0.5, reduction="none")
    want = torch.tensor([-math.expm1(-0.5 * math.log1p(u)) / 0.5], dtype=torch.float64, device=device)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def _ml_data(device, dtype=torch.float64, N=7, C=23, seed=11):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, generator=gen, dtype=torch.float64) * 2).to(device=device, dtype=dtype)
    mask = torch.rand(N, C, generator=gen) < 0.2
    mask[0] = False  # a row without positives
    mask[1, :] = False
    mask[1, min(4, C - 1)] = True  # a single positive
    mask[2, :] = True  # a row without negatives
    return x, mask.to(device)


def _index_lists(mask, ignore_index=-100):
    K = int(mask.sum(-1).max()) + 2
    out = torch.full((mask.shape[0], K), ignore_index, dtype=torch.long)
    for i, row in enumerate(mask.cpu()):
        idx = row.nonzero().squeeze(-1)
        out[i, : len(idx)] = idx
        if len(idx):
            out[i, len(idx)] = idx[0]  # a repeat counts once
    return out.to(mask.device)


@pytest.mark.parametrize("margin,scale", [(0.0, 1.0), (0.3, 2.0)])
def test_zlpr_closed_form(device, margin, scale):
    x, mask = _ml_data(device)
    x = x.requires_grad_()
    rows = []
    for i in range(x.shape[0]):  # the ZLPR formula, row by row
        s = x[i]
        neg, pos = s[~mask[i]], s[mask[i]]
        rows.append(torch.log(1 + torch.exp(scale * (neg + margin)).sum()) +
                    torch.log(1 + torch.exp(-scale * (pos - margin)).sum()))
    want = torch.stack(rows)
    (gwant,) = torch.autograd.grad(want.sum(), x)
    for targets in (mask, _index_lists(mask)):
        got = fastloss.zlpr_loss(x, targets, margin=margin, scale=scale, reduction="none")
        (g,) = torch.autograd.grad(got.sum(), x)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(g, gwant)
    torch.testing.assert_close(fastloss.zlpr_loss(x, mask, margin=margin, scale=scale), want.mean())


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_decoupled_softmax_closed_form(device, scale):
    x, mask = _ml_data(device)
    x = x.requires_grad_()
    rows = []
    for i in range(x.shape[0]):  # DEXML's formula: -mean_p [s_p - log(e^{s_p} + sum_n e^{s_n})]
        s = scale * x[i]
        zn = torch.exp(s[~mask[i]]).sum()
        sp = s[mask[i]]
        rows.append(-(sp - torch.log(torch.exp(sp) + zn)).mean() if len(sp) else s.sum() * 0)
    want = torch.stack(rows)
    (gwant,) = torch.autograd.grad(want.sum(), x)
    for targets in (mask, _index_lists(mask)):
        got = fastloss.decoupled_softmax_loss(x, targets, scale=scale, reduction="none")
        (g,) = torch.autograd.grad(got.sum(), x)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(g, gwant)
    # rows without positives are left out of the mean
    has = mask.any(-1)
    torch.testing.assert_close(fastloss.decoupled_softmax_loss(x, mask, scale=scale), want[has].mean())
    assert math.isnan(fastloss.decoupled_softmax_loss(x, torch.zeros_like(mask)).item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name,kw", [("zlpr_loss", {"margin": 0.2, "scale": 1.5}),
                                     ("decoupled_softmax_loss", {"scale": 1.5})])
def test_multilabel_matches_reference(device, dtype, name, kw):
    fn, ref = getattr(fastloss, name), getattr(reference, name)
    for N, C in [(7, 23), (5, 1), (3, 70001), (0, 9), (4, 517)]:
        x, mask = _ml_data(device, N=max(N, 3), C=C, seed=C)
        x, mask = x[:N].to(dtype), mask[:N]
        x_strided = torch.cat([x, x[:, :1]], 1)[:, :C]  # row stride C + 1
        for xx in (x, x_strided):
            for targets in (mask, _index_lists(mask) if N else mask):
                xa, xb = xx.detach().clone().requires_grad_(), xx.detach().double().requires_grad_()
                a = fn(xa, targets, reduction="none", **kw)
                b = ref(xb, targets, reduction="none", **kw)
                gup = grad_like(b)
                (ga,) = torch.autograd.grad(a, xa, gup.to(a.dtype)) if N else (torch.zeros_like(xa),)
                (gb,) = torch.autograd.grad(b, xb, gup) if N else (torch.zeros_like(xb),)
                tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2}[dtype]
                torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * (1 + b.abs().max().item() if N else 1))
                torch.testing.assert_close(ga.double(), gb, rtol=tol,
                                           atol=tol * (gb.abs().max().item() if N else 1) + 1e-12)


def test_multilabel_bad_index_rows(device):
    x, mask = _ml_data(device)
    idx = _index_lists(mask)
    idx[3, 0] = 99
    with pytest.raises(IndexError, match="target index 99"):
        fastloss.zlpr_loss(x.cpu(), idx.cpu())
    with pytest.raises(IndexError, match="target index 99"):
        reference.decoupled_softmax_loss(x.cpu(), idx.cpu())


# ------------------------------------------------------------------------------ masking, collapse, low precision


@pytest.mark.parametrize("kind,kw", [("stablemax", {}), ("taylor", {"order": 4}), ("softplus", {"scale": 2.0})])
def test_neg_inf_lanes_are_masked_classes(device, kind, kw):
    """A -inf logit removes its class: same loss as the row without it, zero gradient there, no NaN."""
    fn, _ = _fns(kind)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 20, generator=gen, dtype=torch.float64).to(device)
    t = torch.randint(0, 10, (6,), generator=gen).to(device)
    xm = torch.cat([x[:, :10], torch.full_like(x[:, 10:], float("-inf"))], 1).requires_grad_()
    loss = fn(xm, t, reduction="none", **kw)
    (g,) = torch.autograd.grad(loss.sum(), xm)
    torch.testing.assert_close(loss, fn(x[:, :10], t, reduction="none", **kw))
    assert torch.isfinite(g).all() and (g[:, 10:] == 0).all()


def test_stablemax_never_collapses():
    """Gaps where float32 softmax cross-entropy is exactly 0 keep a positive StableMax loss and gradient."""
    C = 1000
    x = torch.zeros(4, C)
    t = torch.tensor([0, 1, 2, 3])
    for i, gap in enumerate([20.0, 40.0, 80.0, 120.0]):
        x[i, i] = gap
    assert (F.cross_entropy(x, t, reduction="none")[1:] == 0).all()
    xs = x.clone().requires_grad_()
    loss = fastloss.stablemax_cross_entropy(xs, t, reduction="none")
    (g,) = torch.autograd.grad(loss.sum(), xs)
    assert (loss > 0).all() and (g[torch.arange(4), t] < 0).all()
    stats = fastloss.softmax_collapse_stats(x, t)
    assert stats["rows"] == 4 and stats["zero_loss"] == 0.75 and stats["softmax_collapse"] == 0.75
    assert stats["fastloss_zero_loss"] == 0.25  # only gap 120: the rest mass e^-120 is below float32's range
    assert stats["stablemax_zero_loss"] == 0.0


def test_collapse_stats_ignore_and_empty():
    x = torch.randn(5, 7)
    t = torch.full((5,), -100)
    assert math.isnan(fastloss.softmax_collapse_stats(x, t)["zero_loss"])
    t[2] = 3
    assert fastloss.softmax_collapse_stats(x, t)["rows"] == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [("stablemax", {}), ("taylor", {"order": 4}), ("softplus", {}),
                                  ("comp_sum", {"tau": 0.5})], ids=_case_id)
def test_low_precision_inputs(device, dtype, case):
    """fp16/bf16 logits are read exactly and computed in float32: compare with float64 on the same values."""
    kind, kw = case
    fn, ref = _fns(kind)
    for s in row_samples(device, dtype)[:5]:
        loss, grad = loss_and_grad(fn, s, reduction="none", **kw)
        s64 = type(s)(s.name, s.logits.double(), s.target)
        ref_loss, ref_grad = loss_and_grad(ref, s64, reduction="none", **kw)
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(loss.double(), ref_loss, rtol=2 * eps, atol=1e-3)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=2 * eps, atol=2e-3)


def test_determinism(device):
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(32, 2049, generator=gen).to(device)
    t = torch.randint(0, 2049, (32,), generator=gen).to(device)
    mask = (torch.rand(32, 2049, generator=gen) < 0.01).to(device)
    fns = [lambda z: fastloss.stablemax_cross_entropy(z, t, reduction="none"),
           lambda z: fastloss.taylor_softmax_loss(z, t, order=6, reduction="none"),
           lambda z: fastloss.softplus_cross_entropy(z, t, reduction="none"),
           lambda z: fastloss.zlpr_loss(z, mask, reduction="none"),
           lambda z: fastloss.decoupled_softmax_loss(z, mask, reduction="none")]
    for f in fns:
        runs = []
        for _ in range(2):
            xi = x.clone().requires_grad_()
            loss = f(xi)
            (g,) = torch.autograd.grad(loss, xi, grad_like(loss))
            runs.append((loss, g))
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# ------------------------------------------------------------------------------ op contracts


FAST_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(device, dtype):
    # opcheck is slow: the small and odd layouts only (C=1, C=3, (B, T, C), N=0, strided rows), and the
    # compiled aot_dispatch check on one of them
    samples = [s for s in row_samples(device, dtype) if s.name in ("C3", "C1", "BTC", "N0", "row_strided")]
    for i, s in enumerate(samples):
        check = torch.library.opcheck if i == 0 else partial(torch.library.opcheck, test_utils=FAST_OPCHECK)
        C = s.logits.shape[-1]
        x = s.logits.reshape(-1, C)
        x = x if x.stride(-1) == 1 else x.contiguous()
        t = s.target.reshape(-1)
        for kind, order, scale, margin in [(0, 2, 1.0, 0.0), (1, 10, 0.3, 0.5), (2, 2, 1.7, 0.0)]:
            args = (x.detach().requires_grad_(), t, kind, order, scale, margin, -100)
            check(ops.additive_row_fwd.default, args)
            loss, stats = ops.additive_row_fwd(x.detach(), *args[1:])
            check(ops.additive_row_bwd.default,
                                  (torch.rand_like(loss), x.detach(), t, stats, kind, order, scale, margin, -100))
        mask = torch.rand(x.shape, device=device) < 0.2
        for kind in (0, 1):
            args = (x.detach().requires_grad_(), mask, kind, 1.3, 0.2)
            check(ops.multilabel_row_fwd.default, args)
            loss, stats = ops.multilabel_row_fwd(x.detach(), mask, kind, 1.3, 0.2)
            check(ops.multilabel_row_bwd.default,
                                  (torch.rand_like(loss), x.detach(), mask, stats, kind, 1.3, 0.2))


GRADCHECK = [
    ("stablemax_cross_entropy", {}),
    ("taylor_softmax_loss", {"order": 2, "margin": 0.4}),
    ("taylor_softmax_loss", {"order": 10, "reduction": "none"}),
    ("softplus_cross_entropy", {"scale": 1.6, "weight": True}),
    ("comp_sum_loss", {"tau": 0.3, "reduction": "sum"}),
    ("generalized_cross_entropy", {"q": 0.7, "weight": True}),
    ("zlpr_loss", {"margin": 0.25, "scale": 1.3}),
    ("decoupled_softmax_loss", {"scale": 1.2, "reduction": "none"}),
]


@pytest.mark.parametrize("case", GRADCHECK, ids=lambda c: c[0] + "-" + "-".join(c[1]))
def test_gradcheck_float64(device, case):
    name, kw = case
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    kw = dict(kw)
    if name in ("zlpr_loss", "decoupled_softmax_loss"):
        t = (torch.rand(2, 3, 7, generator=gen) < 0.3).to(device)
        t[0, 0] = False
    else:
        t = torch.randint(0, 7, (2, 3), generator=gen).to(device)
        t[0, 1] = -100
        if kw.get("weight"):
            kw["weight"] = torch.rand(7, generator=gen, dtype=torch.float64).to(device) + 0.5
    fn = getattr(fastloss, name)
    assert torch.autograd.gradcheck(lambda x: fn(x, t, **kw), (x,), eps=1e-6, atol=1e-7, rtol=1e-6)


COMPILE = {
    "stablemax": lambda z, t: fastloss.stablemax_cross_entropy(z, t),
    "taylor": lambda z, t: fastloss.taylor_softmax_loss(z, t, order=4, margin=0.3),
    "comp_sum": lambda z, t: fastloss.comp_sum_loss(z, t, tau=0.5),
    "zlpr": lambda z, t: fastloss.zlpr_loss(z, F.one_hot(t.clamp(min=0), z.shape[-1]).bool()),
    "dexml_index_lists": lambda z, t: fastloss.decoupled_softmax_loss(z, torch.stack([t, t.flip(-1)], -1)),
}


@pytest.mark.parametrize("name", list(COMPILE))
def test_compile_fullgraph(device, name):
    check_compile_fullgraph(COMPILE[name], device)


# ------------------------------------------------------------------------------ bad input

PUBLIC = ["stablemax_cross_entropy", "taylor_softmax_loss", "softplus_cross_entropy", "comp_sum_loss",
          "generalized_cross_entropy"]
REQUIRED = {"comp_sum_loss": {"tau": 1.0}, "generalized_cross_entropy": {"q": 0.5}}


@pytest.mark.parametrize("mod", [fastloss, reference], ids=["fastloss", "reference"])
@pytest.mark.parametrize("name", PUBLIC)
@pytest.mark.parametrize("case", [
    ("1-D logits", lambda x, t: (x[0], t[0]), {}, ValueError, "logits must have shape"),
    ("float target", lambda x, t: (x, t.float()), {}, TypeError, "target must hold integer"),
    ("mismatched N", lambda x, t: (x, t[:3]), {}, ValueError, "target must have shape"),
    ("bad weight", lambda x, t: (x, t), {"weight": torch.ones(4)}, ValueError, r"weight must have shape \(5,\)"),
    ("reduction", lambda x, t: (x, t), {"reduction": "avg"}, ValueError, "reduction must be"),
    pytest.param(("target range", lambda x, t: (x, t.clamp(max=1) + 4), {}, IndexError, "target 5"),
                 marks=pytest.mark.host_kernels),
], ids=lambda c: c[0] if isinstance(c, tuple) else c)
def test_single_label_bad_input(mod, name, case):
    _, make, kw, exc, msg = case
    x, t = make(torch.randn(4, 5), torch.randint(0, 5, (4,)))
    with pytest.raises(exc, match=msg):
        getattr(mod, name)(x, t, **REQUIRED.get(name, {}), **kw)


@pytest.mark.parametrize("mod", [fastloss, reference], ids=["fastloss", "reference"])
@pytest.mark.parametrize("name,kw,exc,msg", [
    ("taylor_softmax_loss", {"order": 3}, ValueError, "order must be an even number"),
    ("taylor_softmax_loss", {"order": 12}, ValueError, "order must be an even number"),
    ("taylor_softmax_loss", {"order": 2.0}, TypeError, "order must be an int"),
    ("taylor_softmax_loss", {"margin": float("nan")}, ValueError, "margin must be finite"),
    ("softplus_cross_entropy", {"scale": 0.0}, ValueError, "scale must be > 0"),
    ("comp_sum_loss", {"tau": -1.0}, ValueError, "tau must be >= 0"),
    ("generalized_cross_entropy", {"q": 0.0}, ValueError, "q must be > 0"),
    ("generalized_cross_entropy", {"q": 1.5}, ValueError, r"q must be in \(0, 1\]"),
    ("zlpr_loss", {"scale": -1.0}, ValueError, "scale must be > 0"),
    ("decoupled_softmax_loss", {"scale": float("inf")}, ValueError, "scale must be finite"),
])
def test_bad_options(mod, name, kw, exc, msg):
    x, t = torch.randn(4, 5), torch.randint(0, 5, (4,))
    if name in ("zlpr_loss", "decoupled_softmax_loss"):
        t = torch.rand(4, 5) < 0.5
    with pytest.raises(exc, match=msg):
        getattr(mod, name)(x, t, **kw)


@pytest.mark.parametrize("mod", [fastloss, reference], ids=["fastloss", "reference"])
@pytest.mark.parametrize("name", ["zlpr_loss", "decoupled_softmax_loss"])
@pytest.mark.parametrize("targets,exc,msg", [
    (torch.zeros(4, 6, dtype=torch.bool), ValueError, "bool targets mask must have the shape"),
    (torch.zeros(4, 5), TypeError, "targets must be a bool mask"),
    (torch.zeros(3, 2, dtype=torch.long), ValueError, "integer targets must have shape"),
    (torch.zeros(4, dtype=torch.long), ValueError, "integer targets must have shape"),
    ([[0]], TypeError, "targets must be a torch.Tensor"),
    (torch.full((4, 2), 7), IndexError, "target index 7"),
])
def test_multilabel_bad_targets(mod, name, targets, exc, msg):
    with pytest.raises(exc, match=msg):
        getattr(mod, name)(torch.randn(4, 5), targets)


# ------------------------------------------------------------------------------ properties


@st.composite
def _rows(draw):
    n, C = draw(st.integers(1, 5)), draw(st.integers(1, 600))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0, 1e3, 1e4]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(n, C, generator=gen) * scale
    t = torch.randint(0, C, (n,), generator=gen)
    mask = torch.rand(n, C, generator=gen) < draw(st.floats(0.0, 0.9))
    mask[torch.arange(n), t] = False  # -inf anywhere but on the target
    return x.masked_fill(mask, float("-inf")), t


@settings(max_examples=40, deadline=None)
@given(_rows(), st.sampled_from([("stablemax", {}), ("softplus", {"scale": 0.05}), ("comp_sum", {"tau": 1.5})]))
def test_single_label_properties(xt, case):
    """float32 against float64 on the same values at logit scales up to 1e4, with -inf lanes: finite, >= 0,
    masked lanes get exactly 0 gradient."""
    x, t = xt
    kind, kw = case
    fn, ref = _fns(kind)
    xa, xb = x.clone().requires_grad_(), x.double().requires_grad_()
    a, b = fn(xa, t, reduction="none", **kw), ref(xb, t, reduction="none", **kw)
    (ga,) = torch.autograd.grad(a.sum(), xa)
    (gb,) = torch.autograd.grad(b.sum(), xb)
    finite = torch.isfinite(b)
    if kind == "softplus":  # rows whose every scale * z is below -87 underflow in float32 (documented)
        finite &= (kw["scale"] * x).amax(-1) > -80
    assert torch.isfinite(a[finite]).all() and (a[finite] >= 0).all()
    if finite.any():
        scale = b[finite].abs().max().item() + 1
        torch.testing.assert_close(a.double()[finite], b[finite], rtol=1e-5, atol=1e-5 * scale)
        gscale = gb[finite].abs().max().item() + 1e-3
        torch.testing.assert_close(ga.double()[finite], gb[finite], rtol=1e-4, atol=1e-5 * gscale)
    assert (ga[torch.isinf(x)] == 0).all()


def test_cuda_bad_targets_give_nan_rows(device):
    """CUDA contract: an out-of-range target (or index) makes its row NaN without a host sync; with
    fastloss.set_validation(True) the same IndexError as on CPU."""
    if device != "cuda":
        pytest.skip("the CPU raises IndexError instead (tested above)")
    x = torch.randn(4, 9, device=device)
    t = torch.tensor([1, 50, -100, 3], device=device)
    for fn in (fastloss.stablemax_cross_entropy, fastloss.softplus_cross_entropy):
        loss = fn(x, t, reduction="none")
        assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 3]]).all() and loss[2] == 0
    idx = torch.tensor([[0, 2], [99, -100], [1, -100], [-100, -100]], device=device)
    loss = fastloss.zlpr_loss(x, idx, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()
    fastloss.set_validation(True)
    with pytest.raises(IndexError, match="target 50"):
        fastloss.stablemax_cross_entropy(x, t)
    with pytest.raises(IndexError, match="target index 99"):
        fastloss.zlpr_loss(x, idx)


@pytest.mark.parametrize("case", [("stablemax", {}), ("taylor", {"order": 2}), ("softplus", {}),
                                  ("gce", {"q": 0.5})], ids=_case_id)
def test_ignore_index_naming_a_real_class(device, case):
    """ignore_index = 2: rows with target 2 are dropped, class 2 stays in every normaliser."""
    kind, kw = case
    fn, ref = _fns(kind)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(20, 5, generator=gen, dtype=torch.float64).to(device)
    t = torch.randint(0, 5, (20,), generator=gen).to(device)
    t[:3] = 2
    got = fn(x, t, ignore_index=2, reduction="none", **kw)
    torch.testing.assert_close(got, ref(x, t, ignore_index=2, reduction="none", **kw))
    assert (got[t == 2] == 0).all() and (got[t != 2] > 0).all()
    keep = t != 2
    torch.testing.assert_close(got[keep], fn(x[keep], t[keep], reduction="none", **kw))


def test_comp_sum_gradient_when_target_is_unlikely(device):
    """p_y^(tau-1) tiny: the gradient p_y^(tau-1) (p - e_y) keeps its relative accuracy in float32."""
    x = torch.zeros(2, 50, device=device)
    x[:, 7] = 30.0  # the argmax; the targets sit 30 below it
    t = torch.tensor([3, 11], device=device)
    xa, xb = x.clone().requires_grad_(), x.double().requires_grad_()
    (ga,) = torch.autograd.grad(fastloss.comp_sum_loss(xa, t, tau=1.5, reduction="sum"), xa)
    (gb,) = torch.autograd.grad(reference.comp_sum_loss(xb, t, tau=1.5, reduction="sum"), xb)
    torch.testing.assert_close(ga.double(), gb, rtol=1e-4, atol=0)


def test_reference_softplus_at_exact_zero():
    """The float64 oracle's softplus has derivative 1/2 at exactly 0 (a zero logit in softplus normalisation, a
    tie in the decoupled softmax), as the kernels and finite differences have."""
    x = torch.tensor([[0.0, 1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[-50.0, -50.0]], dtype=torch.float64, requires_grad=True)
    cases = [(lambda m, v: m.softplus_cross_entropy(v, torch.tensor([0])), x),
             (lambda m, v: m.decoupled_softmax_loss(v, torch.tensor([[True, False]])), y)]
    for call, v in cases:
        want = torch.autograd.grad(call(fastloss, v), v)[0]
        got = torch.autograd.grad(call(reference, v), v)[0]
        torch.testing.assert_close(got, want)
        assert torch.autograd.gradcheck(lambda z, c=call: c(reference, z), (v,))


@pytest.mark.parametrize("kind,value,kw", [("stablemax", 0.0, {}), ("softplus", -10.0, {"scale": 2.0}),
                                           ("stablemax", -3.0, {}), ("softplus", 0.0, {"scale": 2.0})])
def test_reference_gradient_on_a_branch_point(kind, value, kw):
    """The references compute log φ piecewise (StableMax at z = 0, softplus at z = -20); with clamp masking each
    branch, a target exactly on the seam lost its own gradient term (the reference gave 0.2 where the kernels
    and finite differences give -0.8). gradcheck there, and the kernels agree."""
    fn = {"stablemax": "stablemax_cross_entropy", "softplus": "softplus_cross_entropy"}[kind]
    x = torch.tensor([[value, 0.5, 1.0, -1.0], [0.25, value, -2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1])
    assert torch.autograd.gradcheck(lambda z: getattr(reference, fn)(z, t, reduction="none", **kw), (x,))
    got, want = (torch.autograd.grad(getattr(m, fn)(x, t, reduction="sum", **kw), x)[0] for m in (fastloss, reference))
    torch.testing.assert_close(got, want)
