"""fastloss.cross_entropy with probability targets (torch's floating-point target) against
torch.nn.functional.cross_entropy (the peer) and fastloss.reference; the ops cross_entropy_prob_fwd / _bwd."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastloss
from fastloss import reference
from samples import LOW_PRECISION, TOL, check_compile_fullgraph, grad_like, materialise_options, row_samples

REDUCTIONS = ["mean", "sum", "none"]
OPTIONS = [{}, {"label_smoothing": 0.15}, {"weight": "rand"}, {"weight": "rand", "label_smoothing": 0.3}]


def torch_ce(x, t, **kw):
    """The peer, with fastloss's class-last layout."""
    C = x.shape[-1]
    out = F.cross_entropy(x.reshape(-1, C), t.reshape(-1, C), **kw)
    return out.reshape(x.shape[:-1]) if kw.get("reduction") == "none" else out


def prob_targets(x, kind, seed=3):
    """Targets shaped like x in float64: a dense softmax, or sparse rows (about 3 non-zero classes, exact zeros
    elsewhere: the kernels skip u = 0)."""
    gen = torch.Generator().manual_seed(seed)
    shape = x.shape
    if kind == "dense":
        return torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64) * 2, -1).to(x.device)
    keep = torch.rand(shape, generator=gen) < 3.0 / max(shape[-1], 1)
    t = torch.rand(shape, generator=gen, dtype=torch.float64) * keep
    t = t / t.sum(-1, keepdim=True).clamp(min=1e-12)
    return t.to(x.device)


def _fresh(x):
    """A leaf copy of x in storage of its own, with x's strides and storage offset (so its alignment too)."""
    span = x.storage_offset() + 1 + sum((n - 1) * s for n, s in zip(x.shape, x.stride(), strict=True) if n > 0)
    buf = torch.zeros(span, dtype=x.dtype, device=x.device)
    return buf.as_strided(x.shape, x.stride(), x.storage_offset()).copy_(x).requires_grad_()


def loss_and_grads(fn, x, t, **kw):
    """Loss, d logits, d target (upstream gradient != 1)."""
    xi, ti = _fresh(x), _fresh(t)
    out = fn(xi, ti, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    if xi.numel() == 0:
        return loss.detach(), torch.zeros_like(xi), torch.zeros_like(ti)
    gx, gt = torch.autograd.grad(loss, (xi, ti), grad_like(loss))
    return loss.detach(), gx, gt


def assert_close(a, b, dtype, scale=1.0):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_matches_torch(device, dtype, reduction, opts, kind):
    for s in row_samples(device, dtype):
        x = s.logits
        t = prob_targets(x, kind).to(dtype)
        kw = materialise_options(opts, x.shape[-1], device, dtype)
        loss, gx, gt = loss_and_grads(fastloss.cross_entropy, x, t, reduction=reduction, **kw)
        ref, rgx, rgt = loss_and_grads(torch_ce, x, t, reduction=reduction, **kw)
        assert loss.dtype == ref.dtype and loss.shape == ref.shape, s.name
        assert_close(loss, ref, dtype)
        assert_close(gx, rgx, dtype)
        assert_close(gt, rgt, dtype, scale=10.0)  # w (lse - z): magnitudes up to ~10 here


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("target_dtype", ["same", torch.float32])
@pytest.mark.parametrize("opts", OPTIONS[:3], ids=lambda o: "-".join(o) or "plain")
def test_low_precision_vs_float64(device, dtype, target_dtype, opts):
    """2-byte logits (targets in the same dtype, or float32 read as such): loss and gradients within a few
    roundings of the float64 result on the same values; the loss dtype is torch's promotion."""
    for s in row_samples(device, dtype)[:4] + row_samples(device, dtype)[6:7]:
        x = s.logits
        t = prob_targets(x, "dense").to(dtype if target_dtype == "same" else target_dtype)
        kw = materialise_options(opts, x.shape[-1], device, dtype)
        check_vs_float64(x, t, kw, s.name)


def check_vs_float64(x, t, kw, what):
    """Loss and gradients of 2-byte logits within a few roundings of float64 maths on the same values."""
    loss, gx, gt = loss_and_grads(fastloss.cross_entropy, x, t, reduction="none", **kw)
    kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    ref, rgx, rgt = loss_and_grads(torch_ce, x.double(), t.double(), reduction="none", **kw64)
    assert loss.dtype == torch.promote_types(x.dtype, t.dtype), what
    eps = torch.finfo(loss.dtype).eps
    torch.testing.assert_close(loss.double(), ref, rtol=2 * eps, atol=1e-6, msg=lambda m: f"{what}: {m}")
    geps = torch.finfo(x.dtype).eps
    if gx.numel():
        torch.testing.assert_close(gx.double(), rgx, rtol=2 * geps, atol=geps * rgx.abs().max().item() + 1e-7,
                                   msg=lambda m: f"{what}: {m}")
        teps = torch.finfo(t.dtype).eps
        torch.testing.assert_close(gt.double(), rgt, rtol=2 * teps, atol=teps * rgt.abs().max().item() + 1e-6,
                                   msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("target_dtype", ["same", torch.float32])
def test_row_alignments(device, dtype, target_dtype):
    """Logits and target rows that start at different offsets from the 16-byte grid, with padded logit rows: the
    CUDA kernels read both rows in packs only where the packs line up (for float32 targets, two target packs per
    logit pack) and element by element elsewhere; under FASTLOSS_CUEMU=1 the emulator faults a misaligned pack."""
    gen = torch.Generator().manual_seed(11)
    tdtype = dtype if target_dtype == "same" else target_dtype
    N = 3
    for C in (1, 7, 8, 9, 17, 64, 131):
        for x_off, pad in ((0, 0), (1, 0), (5, 0), (8, 0), (0, 3), (2, 8)):
            for t_off in (0, 1, 2, 4):
                stride = C + pad
                xbuf = (torch.randn(x_off + N * stride, generator=gen, dtype=torch.float64) * 3).to(device, dtype)
                x = xbuf[x_off:].view(N, stride)[:, :C]
                tbuf = torch.zeros(t_off + N * C, dtype=tdtype, device=device)
                t = tbuf[t_off:].view(N, C)
                t.copy_(prob_targets(x, "dense"))
                check_vs_float64(x, t, {}, f"C={C} logits +{x_off} pad {pad}, targets +{t_off}")


EXTRAS = [
    {"lse_square_scale": 0.01},
    {"logit_scale": 1.7},
    {"logit_scale": -0.6, "label_smoothing": 0.2},
    {"softcap": 2.5, "weight": "rand"},
    {"softcap": 1.5, "logit_scale": 2.0, "lse_square_scale": 0.1, "label_smoothing": 0.1, "weight": "rand"},
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", EXTRAS, ids=lambda o: "-".join(o))
def test_extras_match_reference_float64(device, reduction, opts):
    for s in row_samples(device, torch.float64):
        x = s.logits
        t = prob_targets(x, "sparse")
        kw = materialise_options(opts, x.shape[-1], device, torch.float64)
        for fn_kw in ({}, {"return_lse": True}):
            loss, gx, gt = loss_and_grads(fastloss.cross_entropy, x, t, reduction=reduction, **kw, **fn_kw)
            ref, rgx, rgt = loss_and_grads(reference.cross_entropy, x, t, reduction=reduction, **kw, **fn_kw)
            assert_close(loss, ref, torch.float64)
            assert_close(gx, rgx, torch.float64)
            assert_close(gt, rgt, torch.float64)


def test_reference_matches_torch(device):
    """The reference itself is torch's formula (lse_square_scale and the pre-maps aside)."""
    for s in row_samples(device, torch.float64):
        t = prob_targets(s.logits, "dense")
        w = torch.rand(s.logits.shape[-1], dtype=torch.float64, device=device) + 0.2
        for red in REDUCTIONS:
            a = reference.cross_entropy(s.logits, t, weight=w, label_smoothing=0.2, reduction=red)
            b = torch_ce(s.logits, t, weight=w, label_smoothing=0.2, reduction=red)
            assert_close(a, b, torch.float64)


def test_one_hot_matches_class_indices(device):
    """A one-hot probability target gives the class-index loss and gradient (no ignored rows)."""
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(7, 300, generator=gen) * 4).to(device)
    y = torch.randint(0, 300, (7,), generator=gen).to(device)
    t = F.one_hot(y, 300).float()
    for kw in ({}, {"label_smoothing": 0.1, "lse_square_scale": 1e-3, "softcap": 5.0}):
        xi, xj = x.clone().requires_grad_(), x.clone().requires_grad_()
        a = fastloss.cross_entropy(xi, t, reduction="none", **kw)
        b = fastloss.cross_entropy(xj, y, reduction="none", **kw)
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)
        (ga,), (gb,) = torch.autograd.grad(a.sum(), xi), torch.autograd.grad(b.sum(), xj)
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


def test_softmax_collapse_fp32(device):
    """A one-hot target on a logit 40 above the rest: torch's fp32 loss is 0; here the loss log1p(r) and the
    target lane's gradient -r / (1 + r) are exact."""
    x = torch.zeros(3, 1000, device=device)
    y = torch.tensor([3, 999, 0], device=device)
    x[torch.arange(3), y] = 40.0
    t = F.one_hot(y, 1000).float()
    xi = x.clone().requires_grad_()
    loss = fastloss.cross_entropy(xi, t, reduction="none")
    (g,) = torch.autograd.grad(loss.sum(), xi)
    assert (torch_ce(x, t, reduction="none") <= 0).all(), "torch itself collapses here"
    r = 999 * math.exp(-40.0)
    want = torch.full((3,), math.log1p(r), dtype=torch.float64, device=device)
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(g[torch.arange(3), y].double(), torch.full_like(want, -r / (1 + r)), rtol=1e-6, atol=0)
    torch.testing.assert_close(g[0, 0].double(), torch.tensor(math.exp(-40.0) / (1 + r), dtype=torch.float64,
                                                              device=device), rtol=1e-6, atol=0)


def test_target_on_maximum_keeps_digits(device):
    """Mass spread over the two largest logits of a row whose lse is ~1e3: the sum kept next to the maximum
    matches float64 to fp32 rounding of the loss itself (S lse - sum u z would lose ~1e-4 absolute)."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, 5000, generator=gen, dtype=torch.float64) - 30.0
    x[:, 0], x[:, 1] = 1000.0, 1000.0 - 1e-3 * 2**-10 * 1024
    t = torch.zeros_like(x)
    t[:, 0], t[:, 1] = 0.75, 0.25
    xi, ti = x.float().to(device).requires_grad_(), t.float().to(device).requires_grad_()
    loss = fastloss.cross_entropy(xi, ti, reduction="none")
    (gt,) = torch.autograd.grad(loss.sum(), ti)
    x64, t64 = x.float().double(), t.clone().requires_grad_()
    ref = torch_ce(x64, t64, reduction="none")
    (rgt,) = torch.autograd.grad(ref.sum(), t64)
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=1e-5, atol=0)
    # the target's gradient lse - z on the maximal classes: digits of log1p(r) kept, not lost to ulp(1000)
    torch.testing.assert_close(gt[:, :2].double().cpu(), rgt[:, :2], rtol=1e-5, atol=0)


def test_masked_classes(device):
    """-inf logits: a class with target 0 adds 0 (torch: NaN); target mass on a -inf class gives +inf."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(6, 1030, generator=gen, dtype=torch.float64)
    x[:, ::3] = float("-inf")
    t = prob_targets(x, "dense")
    t[:, ::3] = 0.0
    t = t / t.sum(-1, keepdim=True)
    x, t = x.to(device), t.to(device)
    xi = x.clone().requires_grad_()
    loss = fastloss.cross_entropy(xi, t, reduction="none")
    (g,) = torch.autograd.grad(loss.sum(), xi)
    keep = x[0] != float("-inf")
    ref = torch_ce(x[:, keep], t[:, keep], reduction="none")
    torch.testing.assert_close(loss, ref)
    assert (g[:, ~keep] == 0).all() and torch.isfinite(g).all()
    for dtype in (torch.float32, torch.bfloat16):
        lf = fastloss.cross_entropy(x.to(dtype), t.to(dtype), reduction="none")
        torch.testing.assert_close(lf.double(), ref, rtol=1e-2, atol=1e-2)
    t_bad = t.clone()
    t_bad[:, 0] = 0.1
    assert (fastloss.cross_entropy(x, t_bad, reduction="none") == float("inf")).all()
    # a whole CPU chunk (512 classes) and more masked, with and without target mass there; an all-masked row
    xw = torch.randn(3, 1500, generator=gen, dtype=torch.float64)
    xw[:, :600] = float("-inf")
    xw[2] = float("-inf")
    tw = prob_targets(xw, "dense")
    tw[:, :600] = 0.0
    tw[2] = 0.0
    got = fastloss.cross_entropy(xw.to(device), tw.to(device), reduction="none")
    want = reference.cross_entropy(xw.to(device), tw.to(device), reduction="none")
    torch.testing.assert_close(got, want)
    assert got[2] == 0
    tw[:, 7] = 0.2
    assert (fastloss.cross_entropy(xw.to(device), tw.to(device), reduction="none") == float("inf")).all()


@pytest.mark.parametrize("case", [{}, {"label_smoothing": 0.2, "weight": True, "reduction": "sum"},
                                  {"lse_square_scale": 0.3, "softcap": 1.5, "logit_scale": 1.7, "reduction": "none"}],
                         ids=["plain", "smooth-weight-sum", "extras-none"])
def test_gradcheck_float64(device, case):
    kw = dict(case)
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    t = torch.rand(2, 3, 7, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(7, generator=gen, dtype=torch.float64).to(device) + 0.5
    assert torch.autograd.gradcheck(lambda a, b: fastloss.cross_entropy(a, b, **kw), (x, t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(device, dtype):
    ops = torch.ops.fastloss
    for s in row_samples(device, dtype):
        C = s.logits.shape[-1]
        x = s.logits.reshape(-1, C)
        x = x if x.stride(-1) == 1 else x.contiguous()
        w = torch.rand(C, device=device, dtype=dtype) + 0.5
        for t in (prob_targets(x, "dense").to(dtype), prob_targets(x, "sparse").float()):
            for args in [(t, None, 1.0, 0.0, False), (t, w, 0.7, 3.0, True)]:
                full = (x.detach().requires_grad_(), *args)
                torch.library.opcheck(ops.cross_entropy_prob_fwd.default, full)
                parts, stats = ops.cross_entropy_prob_fwd(x.detach(), *args)
                bwd = (torch.rand_like(parts), x.detach(), args[0], args[1], stats, *args[2:])
                torch.library.opcheck(ops.cross_entropy_prob_bwd.default, bwd)


def test_compile_fullgraph(device):
    def soft(z, t):
        C = z.shape[-1]
        q = torch.softmax(torch.zeros(C, device=z.device).index_fill(0, t.clamp(0, C - 1).reshape(-1)[:1], 2.0), 0)
        return fastloss.cross_entropy(z, q.expand_as(z).contiguous(), label_smoothing=0.1)

    check_compile_fullgraph(soft, device)


def test_module_and_dtypes(device):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 11, generator=gen).to(device)
    t = torch.softmax(torch.randn(5, 11, generator=gen), -1).to(device)
    m = fastloss.nn.CrossEntropyLoss(label_smoothing=0.1)
    torch.testing.assert_close(m(x, t), F.cross_entropy(x, t, label_smoothing=0.1))
    for xd, td in [(torch.bfloat16, torch.float32), (torch.float32, torch.float64), (torch.float16, torch.bfloat16)]:
        got = fastloss.cross_entropy(x.to(xd), t.to(td))
        assert got.dtype == F.cross_entropy(x.to(xd).float(), t.to(td).float()).to(
            torch.promote_types(xd, td)).dtype == torch.promote_types(xd, td)
        ref = F.cross_entropy(x.to(xd).double(), t.to(td).double())
        torch.testing.assert_close(got.double(), ref, rtol=1e-2, atol=1e-3)


def test_weight_dtype_promotes(device):
    x, t = torch.randn(4, 6, device=device), torch.rand(4, 6, device=device)
    for xd, wd in [(torch.float32, torch.float64), (torch.bfloat16, torch.float32)]:
        w = torch.rand(6, device=device, dtype=wd)
        got = fastloss.cross_entropy(x.to(xd), t.to(xd), weight=w)
        assert got.dtype == F.cross_entropy(x.to(xd).double(), t.double(), weight=w.double()).to(
            torch.promote_types(xd, wd)).dtype == torch.promote_types(xd, wd)


def test_deterministic(device):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(64, 5003, generator=gen).to(device, torch.bfloat16)
    t = torch.softmax(torch.randn(64, 5003, generator=gen), -1).to(device, torch.bfloat16)
    outs = []
    for _ in range(2):
        xi = x.clone().requires_grad_()
        loss = fastloss.cross_entropy(xi, t, label_smoothing=0.1)
        (g,) = torch.autograd.grad(loss, xi)
        outs.append((loss, g))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("fn", [fastloss.cross_entropy, reference.cross_entropy])
@pytest.mark.parametrize(
    "make,kw,exc,msg",
    [
        (lambda x, t: (x, t[:, :4]), {}, ValueError, "probability target .* must have the shape of logits"),
        (lambda x, t: (x, t[:, 0]), {}, ValueError, "probability target .* must have the shape of logits"),
        (lambda x, t: (x, t), {"ignore_index": 0}, ValueError, "ignore_index=0 is not supported"),
        (lambda x, t: (x, t), {"target_margin": 0.5}, ValueError, "target_margin needs class-index targets"),
        (lambda x, t: (x, t), {"target_margin": torch.ones(5)}, ValueError, "target_margin needs class-index"),
        (lambda x, t: (x, t), {"weight": torch.ones(4)}, ValueError, r"weight must have shape \(5,\)"),
        (lambda x, t: (x, t), {"softcap": 0.0}, ValueError, "softcap must be > 0"),
        (lambda x, t: (x[0], t[0]), {}, ValueError, "logits must have shape"),
        (lambda x, t: (x, t.to("meta")), {}, ValueError, "target is on meta"),
    ],
)
def test_bad_inputs(fn, make, kw, exc, msg):
    x, t = torch.randn(4, 5), torch.rand(4, 5)
    with pytest.raises(exc, match=msg):
        fn(*make(x, t), **kw)


def test_ops_refuse_bad_shapes():
    ops = torch.ops.fastloss
    x = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="probability target must have the shape of logits"):
        ops.cross_entropy_prob_fwd(x, torch.rand(4, 6), None, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="probability target must be floating point"):
        ops.cross_entropy_prob_fwd(x, torch.ones(4, 5, dtype=torch.long), None, 1.0, 0.0, False)
    parts, stats = ops.cross_entropy_prob_fwd(x, torch.rand(4, 5), None, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="stats has shape"):
        ops.cross_entropy_prob_bwd(parts, x, torch.rand(4, 5), None, stats[:3], 1.0, 0.0, False)
