"""fastloss.cross_entropy against torch.nn.functional.cross_entropy (the peer) and fastloss.reference."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastloss
from fastloss import reference
from samples import (
    LOW_PRECISION,
    TOL,
    as_bytes,
    grad_like,
    loss_and_grad,
    materialise_options,
    row_samples,
    streamed_losses,
    streamed_rows,
)

REDUCTIONS = ["mean", "sum", "none"]


def torch_ce(x, t, **kw):
    """The peer, with fastloss's class-last layout."""
    C = x.shape[-1]
    out = F.cross_entropy(x.reshape(-1, C), t.reshape(-1), **kw)
    return out.reshape(t.shape) if kw.get("reduction") == "none" else out


def assert_close(a, b, dtype, scale=1.0):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale, equal_nan=True)


TORCH_OPTIONS = [
    {},
    {"label_smoothing": 0.15},
    {"weight": "rand"},
    {"weight": "rand", "label_smoothing": 0.3},
    {"ignore_index": 2},  # ignore_index naming a real class
    {"ignore_index": 2, "label_smoothing": 0.1, "weight": "rand"},
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", TORCH_OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_matches_torch(device, dtype, reduction, opts):
    for s in row_samples(device, dtype):
        kw = materialise_options(opts, s.logits.shape[-1], device, dtype)
        if kw.get("ignore_index") == 2:
            s.target[s.target == -100] = 2
        loss, grad = loss_and_grad(fastloss.cross_entropy, s, reduction=reduction, **kw)
        ref_loss, ref_grad = loss_and_grad(torch_ce, s, reduction=reduction, **kw)
        assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape, s.name
        assert_close(loss, ref_loss, dtype)
        assert_close(grad, ref_grad, dtype)


def truth_grad_max(s, kw):
    kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    return loss_and_grad(torch_ce, type(s)(s.name, s.logits.double(), s.target), **kw64)[1].abs().max()


def _errors_vs_float64(fn, s, **kw):
    """Max abs error of fn's loss and gradient against torch in float64 on the same input values."""
    kw64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    truth_loss, truth_grad = loss_and_grad(torch_ce, type(s)(s.name, s.logits.double(), s.target), **kw64)
    loss, grad = loss_and_grad(fn, s, **kw)
    return (loss.double() - truth_loss).abs().max(), (grad.double() - truth_grad).abs().max(), truth_loss


def test_matches_torch_wide_rows(device):
    """C > 65536 in fp32: as accurate as torch's own fp32 path (judged in float64; ours is usually better)."""
    s = row_samples(device, torch.float32, big=True)[-1]
    assert s.logits.shape[-1] > 65536
    for kw in ({}, {"label_smoothing": 0.1}):
        err, gerr, truth = _errors_vs_float64(fastloss.cross_entropy, s, **kw)
        terr, tgerr, _ = _errors_vs_float64(torch_ce, s, **kw)
        assert err <= max(terr, 1e-6 * truth.abs().max()), (err, terr)
        assert gerr <= max(tgerr, 1e-9), (gerr, tgerr)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("opts", TORCH_OPTIONS[:4], ids=lambda o: "-".join(o) or "plain")
def test_low_precision_no_worse_than_torch(device, dtype, opts):
    """fp16/bf16 are judged against the error of torch's own low-precision path (float64 truth)."""
    if device == "cpu" and dtype == torch.float16 and opts.get("weight") is not None:
        pytest.skip("torch has no CPU fp16 weighted nll kernel")
    eps = torch.finfo(dtype).eps
    for s in row_samples(device, dtype)[:4]:
        kw = materialise_options(opts, s.logits.shape[-1], device, dtype)
        err, gerr, truth = _errors_vs_float64(fastloss.cross_entropy, s, **kw)
        terr, tgerr, _ = _errors_vs_float64(torch_ce, s, **kw)
        assert err <= 2 * terr + 4 * eps * truth.abs().max() + 1e-6, (s.name, err, terr)
        # plus one rounding of the largest gradient to the output dtype (fp32 maths, rounded once)
        assert gerr <= 2 * tgerr + eps * truth_grad_max(s, kw) + 1e-6, (s.name, gerr, tgerr)


def _wide_low_precision_rows(device, dtype):
    """2-byte rows long enough for every CUDA thread to see full groups of packs (C = 70001: misaligned rows with
    head and tail elements; C = 32768: aligned; an offset slice), with adversarial rows: ties of the maximum
    inside and across groups, half the classes masked with -inf, a target 40 above the rest (Softmax Collapse
    in a naive fp32 sum), targets at the first and last class, an ignored row."""
    gen = torch.Generator().manual_seed(11)
    out = []
    for shape, cut in (((6, 70001), 0), ((4, 32768), 0), ((3, 40000), 5)):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 3
        N, C = shape[0], shape[1] - cut
        t = torch.randint(0, C, (N,), generator=gen)
        t[0], t[1] = 0, C - 1
        x[1, cut:] = torch.round(x[1, cut:])  # many lanes tie with the row maximum
        if N > 3:
            x[2, cut:] = 0.0
            x[2, cut + t[2]] = 40.0  # confidently right: loss ~ C e^-40, must stay > 0
            x[3, cut:][torch.rand(C, generator=gen) < 0.5] = float("-inf")
            x[3, cut + t[3]] = 1.0
            t[N - 1] = -100
        x = x.to(dtype)[:, cut:]
        out.append((x.to(device), t.to(device)))
    return out


def _check_low_precision_vs_float64(x, t, opts, rows):
    """cross_entropy(reduction="none") of 2-byte logits and its gradient against the float64 reference of the
    same values, on the given rows: within one rounding to the output dtype (fp32 logits: within TOL). Returns
    (loss, gradient)."""
    eps = torch.finfo(x.dtype).eps if x.dtype in LOW_PRECISION else TOL[x.dtype][0] / 2
    xi = x.detach().requires_grad_()  # not a clone: the view's row stride decides staged vs unstaged kernels
    loss = fastloss.cross_entropy(xi, t, reduction="none", **opts)
    (g,) = torch.autograd.grad(loss, xi, torch.ones_like(loss))
    x64 = x.double().requires_grad_()
    ref = reference.cross_entropy(x64, t, reduction="none", **opts)
    (g64,) = torch.autograd.grad(ref, x64, torch.ones_like(ref))
    assert loss.dtype == x.dtype
    torch.testing.assert_close(loss[rows].double(), ref[rows].detach(), rtol=2 * eps, atol=1e-6)
    torch.testing.assert_close(g[rows].double(), g64[rows], rtol=2 * eps,
                               atol=eps * g64[rows].abs().max().item() + 1e-7)
    return loss, g


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("opts", [{}, {"logit_scale": 0.37}, {"logit_scale": 3.0}, {"logit_scale": -0.5},
                                  {"target_margin": 0.8}, {"label_smoothing": 0.1}, {"softcap": 5.0}],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_low_precision_wide_rows(device, dtype, opts):
    """Wide fp16/bf16 rows through both CUDA forward loops (the light loop takes the plain call and positive
    scales; margin, smoothing, softcap and negative scales take the general loop): loss and gradient against
    float64 of the same values, within one rounding to the output dtype."""
    for x, t in _wide_low_precision_rows(device, dtype):
        rows = torch.arange(t.numel(), device=device)
        if opts.get("logit_scale", 1.0) < 0 and t.numel() > 3:
            rows = rows[rows != 3]  # -inf lanes scaled by a negative number are +inf (torch: NaN, ours: +inf)
        loss, g = _check_low_precision_vs_float64(x, t, opts, rows)
        if t.numel() > 3 and not opts and dtype == torch.bfloat16:
            # the confident row keeps its rest mass (fp32 maths, rounded once to bf16, which has fp32's range)
            assert loss[2] > 0 and g[2, t[2]] < 0


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("opts", [{}, {"logit_scale": 0.37}, {"target_margin": 0.8}],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_low_precision_rows_masked_with_finfo_min(device, dtype, opts):
    """Classes masked with finfo(dtype).min (the masked_fill idiom) next to -inf lanes and the padding of a
    thread's last group: for bf16 the fast exp's bias -M log2(e) overflows there and must not turn a -inf lane
    into NaN. A few masked classes (C = 40), half a wide row, and a row masked entirely (loss log C)."""
    low = torch.finfo(dtype).min
    rows = []
    x = torch.randn(3, 40, dtype=torch.float64)
    x[:, 24:32] = low
    rows.append((x, torch.tensor([0, 5, 39])))
    x = torch.randn(2, 70001, dtype=torch.float64)
    x[:, ::2] = low
    x[1, 1::7] = float("-inf")
    rows.append((x, torch.tensor([1, 3])))
    rows.append((torch.full((2, 32000), low, dtype=torch.float64), torch.tensor([0, 31999])))
    for x, t in rows:
        x, t = x.to(device=device, dtype=dtype), t.to(device)
        loss, g = _check_low_precision_vs_float64(x, t, opts, torch.arange(t.numel(), device=device))
        assert torch.isfinite(loss).all() and not g.isnan().any()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [*LOW_PRECISION, torch.float32])
@pytest.mark.parametrize("opts", [{}, {"logit_scale": 0.37, "weight": "rand"}, {"label_smoothing": 0.1},
                                  {"softcap": 5.0, "weight": "rand"}], ids=lambda o: "-".join(o) or "plain")
def test_cuda_many_rows_per_block(dtype, opts):
    """Thousands of aligned rows: the plain call and a positive scale with class weights take the staged forward
    (a persistent grid, several rows per block through its ring; fp32 too), smoothing and softcap the general
    loop; the backward is the staged one except for the 517-class rows (their gradient rows are misaligned).
    Loss and gradient against float64 of the same values; a bad target in row 7 gives NaN in that row only."""
    for name, x, t in streamed_rows("cuda", dtype):
        kw = materialise_options(opts, x.shape[-1], "cuda", torch.float32)
        good = t.clone()
        t = t.clone()
        rows = torch.arange(t.numel(), device="cuda") != 7
        if t.numel() > 7:
            t[7] = x.shape[-1]  # out of range: NaN row, no host sync
        xi = x.detach().requires_grad_()  # the view itself: the offset slice keeps its row stride
        loss = fastloss.cross_entropy(xi, t, reduction="none", **kw)
        (g,) = torch.autograd.grad(loss, xi, torch.ones_like(loss))
        if t.numel() > 7:
            assert loss[7].isnan() and g[7].isnan().all(), name
        assert not loss[rows].isnan().any() and not g[rows].isnan().any(), name
        good_loss, good_g = _check_low_precision_vs_float64(x, good, kw, rows)
        torch.testing.assert_close(loss[rows], good_loss[rows], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(g[rows], good_g[rows], rtol=0, atol=0, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_cuda_staged_forwards_bitwise_equal_unstaged(dtype, tmp_path):
    """The staged forwards (several rows per block through a cp.async ring) against their unstaged twins, run in a
    subprocess with FASTLOSS_ROW_STAGED=0 (read once per process): for 2-byte rows both walk each thread's packs
    in the same order and merge in the same order, so losses and gradients must agree bit for bit. Catches a
    single misplaced pack, which the float64 comparisons could miss."""
    if os.environ.get("FASTLOSS_ROW_STAGED") == "0":
        pytest.skip("FASTLOSS_ROW_STAGED=0 here: both sides would run unstaged")
    here = os.path.dirname(os.path.abspath(__file__))
    out = tmp_path / "unstaged.pt"
    code = (f"import sys, torch; sys.path.insert(0, {here!r}); from samples import streamed_losses; "
            f"torch.save(streamed_losses(torch.{str(dtype).split('.')[-1]}), {str(out)!r})")
    env = {**os.environ, "FASTLOSS_ROW_STAGED": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600)
    unstaged = torch.load(out)
    staged = streamed_losses(dtype)
    assert staged.keys() == unstaged.keys()
    for key, value in staged.items():  # bits, so that NaN rows compare too
        assert torch.equal(as_bytes(value), as_bytes(unstaged[key])), key


EXTRAS = [
    {"lse_square_scale": 1e-2},
    {"logit_scale": 0.37},
    {"softcap": 2.5},
    {"target_margin": 0.8},
    {"target_margin": "per_class"},
    {"logit_scale": 1.3, "softcap": 4.0, "target_margin": 0.5, "lse_square_scale": 1e-3, "label_smoothing": 0.1,
     "weight": "rand"},
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", EXTRAS, ids=lambda o: "-".join(o))
def test_extras_match_reference_float64(device, reduction, opts):
    for s in row_samples(device, torch.float64):
        C = s.logits.shape[-1]
        kw = materialise_options(opts, C, device, torch.float64)
        if kw.get("target_margin") == "per_class":
            kw["target_margin"] = torch.linspace(0, 1, C, dtype=torch.float64, device=device)
        loss, grad = loss_and_grad(fastloss.cross_entropy, s, reduction=reduction, **kw)
        ref_loss, ref_grad = loss_and_grad(reference.cross_entropy, s, reduction=reduction, **kw)
        assert_close(loss, ref_loss, torch.float64)
        assert_close(grad, ref_grad, torch.float64)


def test_extras_closed_forms(device):
    """The pre-maps and the penalty by their definitions, independently of the reference."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 11, generator=gen, dtype=torch.float64).to(device) * 3
    t = torch.randint(0, 11, (6,), generator=gen).to(device)
    z = 2.0 * torch.tanh(0.5 * x / 2.0)
    z = z - 0.3 * F.one_hot(t, 11).double()
    want = F.cross_entropy(z, t) + 0.1 * torch.logsumexp(z, -1).square().mean()
    got = fastloss.cross_entropy(x, t, logit_scale=0.5, softcap=2.0, target_margin=0.3, lse_square_scale=0.1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_return_lse_and_its_gradient(device):
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(2, 3, 50, generator=gen, dtype=torch.float64) * 4).to(device).requires_grad_()
    t = torch.randint(0, 50, (2, 3), generator=gen).to(device)
    loss, lse = fastloss.cross_entropy(x, t, return_lse=True, softcap=5.0)
    assert lse.shape == t.shape and lse.dtype == torch.float64
    torch.testing.assert_close(lse, torch.logsumexp(5.0 * torch.tanh(x / 5.0), -1))
    (g,) = torch.autograd.grad(loss + (lse**2).sum(), x)
    xr = x.detach().clone().requires_grad_()
    lr, lser = reference.cross_entropy(xr, t, return_lse=True, softcap=5.0)
    (gr,) = torch.autograd.grad(lr + (lser**2).sum(), xr)
    torch.testing.assert_close(g, gr)
    _, lse32 = fastloss.cross_entropy(x.detach().float(), t, return_lse=True)
    assert lse32.dtype == torch.float32
    lse16 = fastloss.cross_entropy(x.detach().bfloat16(), t, return_lse=True)[1]
    assert lse16.dtype == torch.float32


def test_softmax_collapse_fp32(device):
    """Target 40 above every other logit: fp32 softmax rounds to exactly one (torch's loss and target gradient
    are exactly 0); fastloss keeps the rest mass and matches the exact values."""
    x = torch.zeros(4, 1000, device=device)
    t = torch.tensor([3, 10, 999, 0], device=device)
    x[torch.arange(4), t] = 40.0
    x = x.requires_grad_()
    loss = fastloss.cross_entropy(x, t, reduction="none")
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert (torch_ce(x.detach(), t, reduction="none") == 0).all(), "torch itself collapses here"
    # exact: loss = log1p(r), r = sum_{k != y} exp(z_k - z_y);
    # dL/dz_y = -r / (1 + r), dL/dz_k = exp(z_k - z_y) / (1 + r)
    r = 999 * math.exp(-40.0)
    assert (loss > 0).all() and (g[torch.arange(4), t] < 0).all()
    torch.testing.assert_close(loss.double(), torch.full((4,), math.log1p(r), dtype=torch.float64, device=device),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(g[torch.arange(4), t].double(),
                               torch.full((4,), -r / (1 + r), dtype=torch.float64, device=device), rtol=1e-6, atol=0)
    torch.testing.assert_close(g[0, 0].double(), torch.tensor(math.exp(-40.0) / (1 + r), dtype=torch.float64,
                                                              device=device), rtol=1e-6, atol=0)


def test_extreme_logits(device):
    gen = torch.Generator().manual_seed(5)
    x = torch.where(torch.rand(6, 40, generator=gen) < 0.5, -1e30, 1e30).to(device)
    x[:, 0] = 1e30
    t = torch.randint(0, 40, (6,), generator=gen).to(device)
    loss = fastloss.cross_entropy(x, t, reduction="none")
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), torch_ce(x.double(), t, reduction="none"))
    big = torch.finfo(torch.bfloat16).max / 2  # differences of logits stay representable
    xb = (torch.rand(6, 40, generator=gen) * 2 - 1).to(device) * big
    xb = xb.to(torch.bfloat16).requires_grad_()
    lb = fastloss.cross_entropy(xb, t, reduction="none")
    (gb,) = torch.autograd.grad(lb.sum(), xb)
    assert torch.isfinite(lb.float()).all() and torch.isfinite(gb.float()).all()
    ref = torch_ce(xb.detach().double(), t, reduction="none")
    torch.testing.assert_close(lb.double(), ref, rtol=1e-2, atol=0)


def test_masked_classes(device):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(8, 30, generator=gen, dtype=torch.float64).to(device)
    mask = torch.rand(8, 30, generator=gen).to(device) < 0.5
    t = torch.randint(0, 30, (8,), generator=gen).to(device)
    mask[torch.arange(8), t] = False
    mask[1] = True  # a fully masked row ...
    t[1] = -100  # ... that is ignored: loss 0, gradient 0, no NaN
    x = x.masked_fill(mask, float("-inf"))
    for kw in ({}, {"lse_square_scale": 0.1}):
        s_loss, s_grad = loss_and_grad(fastloss.cross_entropy, _S(x, t), reduction="none", **kw)
        assert not s_grad.isnan().any()
        assert s_loss[1] == 0 and (s_grad[1] == 0).all()
    keep = torch.arange(8, device=device) != 1  # torch gives NaN gradients on the fully masked row
    loss, grad = loss_and_grad(fastloss.cross_entropy, _S(x[keep], t[keep]), reduction="sum")
    ref_loss, ref_grad = loss_and_grad(torch_ce, _S(x[keep], t[keep]), reduction="sum")
    assert_close(loss, ref_loss, torch.float64)
    assert_close(grad, ref_grad, torch.float64)


class _S:
    """Minimal sample wrapper for ad-hoc tensors."""

    def __init__(self, x, t):
        self.logits, self.target, self.kwargs, self.name = x, t, {}, "adhoc"

    def fresh(self, requires_grad=True):
        return self.logits.detach().clone().requires_grad_(requires_grad), self.target.clone()


def test_all_ignored_batch(device):
    x = torch.randn(5, 9, device=device, requires_grad=True)
    t = torch.full((5,), -100, device=device)
    assert math.isnan(fastloss.cross_entropy(x, t).item()) and math.isnan(torch_ce(x, t).item())
    loss = fastloss.cross_entropy(x, t, reduction="sum", lse_square_scale=0.1, label_smoothing=0.2)
    (g,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0 and (g == 0).all()


def test_int32_targets_and_module(device):
    x = torch.randn(7, 12, device=device)
    t = torch.randint(0, 12, (7,), device=device)
    torch.testing.assert_close(fastloss.cross_entropy(x, t.int()), F.cross_entropy(x, t))
    w = torch.rand(12, device=device)
    mod = fastloss.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1, reduction="sum")
    peer = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(mod(x, t), peer(x, t))
    assert "weight" in dict(mod.named_buffers())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic(device, dtype):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(64, 3001, generator=gen).to(device=device, dtype=dtype)
    t = torch.randint(0, 3001, (64,), generator=gen).to(device)
    runs = []
    for _ in range(2):
        xi = x.clone().requires_grad_()
        loss = fastloss.cross_entropy(xi, t, label_smoothing=0.1, lse_square_scale=1e-3)
        (g,) = torch.autograd.grad(loss, xi, grad_like(loss))
        runs.append((loss, g))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
