"""Contrastive family: fused engine vs the materialised float64 reference, open_clip parity, op contracts."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastloss
from fastloss import reference
from samples import grad_like

ops = torch.ops.fastloss

# (name, N, M, d, kwargs): every option, odd sizes (N != M, N = 1, d = 3, d not a multiple of 8/16) and, through
# block_rows, rows on and around tile boundaries.
VARIANTS = [
    ("infonce", {}),
    ("infonce_queue", {"extra_keys": 5}),
    ("positive_index", {"positive": True}),
    ("decoupled", {"decoupled": True}),
    ("hcl", {"hard_negative_beta": 0.7}),
    ("hcl_dcl", {"hard_negative_beta": 0.4, "decoupled": True}),
    ("smoothing", {"label_smoothing": 0.15}),
    ("bias", {"logit_bias": True}),
    ("per_row_scale", {"per_row_scale": True}),
    ("symmetric", {"symmetric": True}),
    ("symmetric_all", {"symmetric": True, "hard_negative_beta": 0.3, "label_smoothing": 0.1, "decoupled": True,
                       "logit_bias": True}),
    ("symmetric_per_row", {"symmetric": True, "per_row_scale": True}),
    ("sigmoid", {"loss": "sigmoid", "logit_bias": True}),
    ("sigmoid_positive", {"loss": "sigmoid", "logit_bias": True, "positive": True, "extra_keys": 3}),
]
SHAPES = [(7, 3, None), (1, 5, None), (13, 19, 4), (33, 8, 16), (16, 64, 16), (17, 11, 1)]  # (N, d, block_rows)


def make_inputs(N, d, opts, device, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed + 31 * N + d)
    M = N + opts.get("extra_keys", 0)
    if opts.get("positive") and not opts.get("symmetric"):
        M = max(M, 2)
    q = F.normalize(torch.randn(N, d, generator=gen, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(M, d, generator=gen, dtype=torch.float64), dim=1)
    kw = {k_: v for k_, v in opts.items() if k_ in ("decoupled", "hard_negative_beta", "label_smoothing", "symmetric",
                                                 "loss")}
    if opts.get("per_row_scale"):
        scale = torch.rand(N, generator=gen, dtype=torch.float64) * 4 + 1
    else:
        scale = torch.tensor(3.7, dtype=torch.float64)
    if opts.get("logit_bias"):
        kw["logit_bias"] = torch.tensor(-1.3, dtype=torch.float64).to(device).requires_grad_()
    if opts.get("positive"):
        kw["positive"] = torch.randint(0, M, (N,), generator=gen).to(device)
    leaves = [q.to(device, dtype).requires_grad_(), k.to(device, dtype).requires_grad_(),
              scale.to(device).requires_grad_()]
    kw["logit_scale"] = leaves[2]
    if "logit_bias" in kw:
        leaves.append(kw["logit_bias"])
    return leaves, kw


def run(fn, leaves, kw, reduction="mean", **extra):
    out = fn(leaves[0], leaves[1], reduction=reduction, **kw, **extra)
    grads = torch.autograd.grad(out, leaves, grad_like(out))
    return out.detach(), grads


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v[0])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}_d{}_b{}".format(*s))
def test_matches_reference_float64(device, variant, shape):
    _, opts = variant
    N, d, block = shape
    leaves, kw = make_inputs(N, d, opts, device)
    for reduction in ("mean", "none"):
        got = run(fastloss.contrastive_loss, leaves, kw, reduction, block_rows=block)
        want = run(reference.contrastive_loss, leaves, kw, reduction)
        torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
        for g, w in zip(got[1], want[1], strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


@settings(max_examples=60, deadline=None)
@given(variant=st.sampled_from(VARIANTS), N=st.integers(1, 150), d=st.integers(1, 40), extra=st.integers(0, 40),
       block=st.one_of(st.none(), st.integers(1, 160)), bf16=st.booleans(), seed=st.integers(0, 10**6))
def test_random_sizes_match_reference(variant, N, d, extra, block, bf16, seed):
    """Hypothesis over the sizes: any N, key count (extra keys past N), width and row-block cut, for every
    variant, float64 (to the last bits) and bf16 (to its rounding) against the float64 reference; under
    FASTLOSS_CUEMU=1 the CUDA tile loop and epilogues."""
    _, opts = variant
    if not opts.get("symmetric"):
        opts = dict(opts, extra_keys=opts.get("extra_keys", 0) + extra)
    if bf16:
        # the CUDA backward rounds G = ∂L/∂logits to bf16 for its GEMMs; with d < 8 the unit features tie
        # (d = 1: all ±1) and dq is a cancellation that G's rounding (2^-9 of each term) cannot resolve
        d = max(d, 8)
    leaves, kw = make_inputs(N, d, opts, "cpu", dtype=torch.bfloat16 if bf16 else torch.float64, seed=seed)
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    kw64 = dict(kw, logit_scale=leaves64[2], **({"logit_bias": leaves64[3]} if "logit_bias" in kw else {}))
    for reduction in ("mean", "none"):
        got = run(fastloss.contrastive_loss, leaves, kw, reduction, block_rows=block)
        want = run(reference.contrastive_loss, leaves64, kw64, reduction)
        if not bf16:
            torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
            for g, w in zip(got[1], want[1], strict=True):
                torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)
            continue
        torch.testing.assert_close(got[0].double(), want[0], rtol=1e-2, atol=1e-2)
        # norm-wise: G is rounded to bf16 for the gradient GEMMs, and the scale's gradient, a sum that cancels
        # (E_p[s] - s_positive per row), takes that rounding relative to its terms (~1 % of a small total);
        # the bias gradient of a softmax is 0 up to fp32 sums
        for g, w in zip(got[1], want[1], strict=True):
            err = (g.double() - w).norm()
            assert err <= 2e-2 * w.norm() + 1e-4, (err, w.norm())


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v[0])
@pytest.mark.parametrize("N", [40, 300])
def test_float32_close_to_float64_reference(device, variant, N):
    """fp32 against the float64 reference; N = 300 (one tile) runs the CPU's explicit-vector paths (whole 16-lane
    row chunks and a whole 256-column chunk of the symmetric column pass, with the diagonal inside and a tail after
    it) and the CUDA epilogues' grouped folds with their lane-wise fallbacks."""
    _, opts = variant
    leaves, kw = make_inputs(N, 24, opts, device)
    want = run(reference.contrastive_loss, leaves, kw)
    leaves32 = [x.detach().float().requires_grad_() for x in leaves]
    kw32 = {k: (leaves32[[id(x) for x in leaves].index(id(v))] if isinstance(v, torch.Tensor) and v.requires_grad
                else v) for k, v in kw.items()}
    got = run(fastloss.contrastive_loss, leaves32, kw32, block_rows=16 if N == 40 else None)  # 300: one tile
    torch.testing.assert_close(got[0].double(), want[0], rtol=2e-5, atol=2e-6)
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[4], VARIANTS[9], VARIANTS[10], VARIANTS[12]],
                         ids=lambda v: v[0])
@pytest.mark.parametrize("block_rows", [16, None])
def test_low_precision(device, dtype, variant, block_rows):
    """fp16/bf16 features are multiplied in fp32: the loss matches float64 maths on the same (rounded) inputs to
    fp32 accuracy, and the gradients to the rounding of their own dtype. N = 100 in one tile (block_rows None)
    takes the CUDA epilogues' grouped folds (hardware exp), rows and columns, and their lane-wise fallbacks."""
    _, opts = variant
    leaves, kw = make_inputs(100, 40, opts, device, dtype=dtype)
    got = run(fastloss.contrastive_loss, leaves, kw, block_rows=block_rows)
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    kw64 = dict(kw, logit_scale=leaves64[2])
    if "logit_bias" in kw:
        kw64["logit_bias"] = leaves64[3]
    want = run(reference.contrastive_loss, leaves64, kw64)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-2, atol=1e-2)
    assert got[1][0].dtype == dtype and got[1][1].dtype == dtype
    for g, w in zip(got[1], want[1], strict=True):
        err = (g.double() - w).abs().max()
        assert err <= 1e-2 * w.abs().max() + 1e-6, (err, w.abs().max())


def test_wrappers_match_reference(device):
    gen = torch.Generator().manual_seed(5)
    z1, z2 = (torch.randn(9, 6, generator=gen, dtype=torch.float64).to(device).requires_grad_() for _ in range(2))
    t = torch.tensor(0.5, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 0, 7, 1] * 2, device=device)
    b = torch.tensor(-2.0, dtype=torch.float64, device=device, requires_grad=True)
    cases = [
        ("clip", lambda m: m.clip_loss(z1, z2, 1 / t), (z1, z2, t)),
        ("clip_bias", lambda m: m.clip_loss(z1, z2, 1 / t, b), (z1, z2, t, b)),
        ("siglip", lambda m: m.siglip_loss(z1, z2, 1 / t, b), (z1, z2, t, b)),
        ("nt_xent", lambda m: m.nt_xent_loss(z1, z2, temperature=t, block_rows=5), (z1, z2, t)),
        ("nt_xent_float", lambda m: m.nt_xent_loss(z1, z2, temperature=0.3, reduction="none"), (z1, z2)),
        ("supcon", lambda m: m.supcon_loss(torch.cat([z1, z2]), labels, temperature=t, block_rows=7), (z1, z2, t)),
        ("supcon_none", lambda m: m.supcon_loss(torch.cat([z1, z2]), labels, temperature=0.2, reduction="none"),
         (z1, z2)),
    ]
    for name, f, leaves in cases:
        res = []
        for mod in (fastloss, reference):
            out = f(mod)
            res.append((out.detach(), torch.autograd.grad(out, leaves, grad_like(out))))
        torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-10, atol=1e-12, msg=name)
        for g, w in zip(res[0][1], res[1][1], strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=name)


def test_closed_forms(device):
    """Independent formulas: CLIP = mean of two torch cross-entropies, NT-Xent with a -inf self mask, SupCon
    anchors without positives left out of the mean, SigLIP = logsigmoid sum / N."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64).to(device)
    y = torch.randn(6, 5, generator=gen, dtype=torch.float64).to(device)
    L = 2.5 * x @ y.T
    lab = torch.arange(6, device=device)
    clip = (F.cross_entropy(L, lab) + F.cross_entropy(L.T, lab)) / 2
    torch.testing.assert_close(fastloss.clip_loss(x, y, 2.5), clip)
    sig = -F.logsigmoid((2 * torch.eye(6, device=device, dtype=L.dtype) - 1) * (L - 1.0)).sum() / 6
    torch.testing.assert_close(fastloss.siglip_loss(x, y, 2.5, -1.0), sig)
    z = torch.cat([x, y])
    S = (z @ z.T) / 0.4
    S.fill_diagonal_(float("-inf"))
    ntx = F.cross_entropy(S, torch.arange(12, device=device).add(6).remainder(12))
    torch.testing.assert_close(fastloss.nt_xent_loss(x, y, temperature=0.4), ntx)
    labels = torch.tensor([0, 0, 1, 2, 2, 2], device=device)
    S = (x @ x.T) / 0.4
    S.fill_diagonal_(float("-inf"))
    logp = S.log_softmax(1)
    P = (labels[:, None] == labels[None, :]) & ~torch.eye(6, dtype=torch.bool, device=device)
    per = -(logp.masked_fill(~P, 0).sum(1)) / P.sum(1).clamp(min=1)
    has = P.any(1)
    torch.testing.assert_close(fastloss.supcon_loss(x, labels, temperature=0.4), per[has].mean())
    # CE smoothing over the M keys
    q = torch.randn(4, 5, generator=gen, dtype=torch.float64).to(device)
    k = torch.randn(9, 5, generator=gen, dtype=torch.float64).to(device)
    pos = torch.tensor([8, 0, 3, 3], device=device)
    want = F.cross_entropy(1.5 * q @ k.T, pos, label_smoothing=0.2)
    torch.testing.assert_close(fastloss.contrastive_loss(q, k, positive=pos, logit_scale=1.5, label_smoothing=0.2),
                               want)


def test_return_stats(device):
    leaves, kw = make_inputs(20, 6, {"symmetric": True}, device)
    kw["logit_scale"] = torch.tensor(9.0, dtype=torch.float64, device=device)
    q, k = leaves[0].detach().clone(), leaves[0].detach() + 0.3 * leaves[1].detach()  # mostly right
    loss, st = fastloss.contrastive_loss(q, k, return_stats=True, block_rows=7, **kw)
    ref_loss, ref = reference.contrastive_loss(q, k, return_stats=True, **kw)
    torch.testing.assert_close(loss, ref_loss)
    S = 9.0 * q @ k.T
    torch.testing.assert_close(st.lse, S.logsumexp(1))
    torch.testing.assert_close(st.col_lse, S.logsumexp(0))
    assert torch.equal(st.correct, S.argmax(1) == torch.arange(20, device=device))
    assert torch.equal(st.col_correct, S.argmax(0) == torch.arange(20, device=device))
    assert torch.equal(st.correct, ref.correct) and 0 < int(st.correct.sum()) <= 20
    assert not st.lse.requires_grad


def test_no_softmax_collapse_fp32(device):
    """A dominant positive keeps a positive loss and gradient in fp32 (the positive is outside the negatives'
    sum, so the loss is softplus(n - s_p) rather than lse - s_p)."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=device)
    k = q.clone().requires_grad_()
    loss = fastloss.contrastive_loss(q, k, logit_scale=40.0, reduction="none")
    want = F.softplus(torch.tensor(-40.0, dtype=torch.float64)).item()
    assert torch.allclose(loss.double(), torch.full((2,), want, dtype=torch.float64, device=device), rtol=1e-6)
    (g,) = torch.autograd.grad(loss.sum(), k)
    assert (g.abs().sum(1) > 0).all()


def test_extreme_scales_finite(device):
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(30, 8, generator=gen).to(device).requires_grad_()
    k = torch.randn(30, 8, generator=gen).to(device).requires_grad_()
    for scale in (1e-6, 100.0, 1e4):
        loss = fastloss.contrastive_loss(q, k, logit_scale=scale, symmetric=True, hard_negative_beta=0.5,
                                         block_rows=8)
        gq, gk = torch.autograd.grad(loss, (q, k))
        assert torch.isfinite(loss) and torch.isfinite(gq).all() and torch.isfinite(gk).all()
        want = reference.contrastive_loss(q.double(), k.double(), logit_scale=scale, symmetric=True,
                                          hard_negative_beta=0.5)
        torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-4 * max(1.0, scale / 100))


def test_single_key(device):
    """M = 1: the only key is the positive; no negatives, finite zero loss and gradient."""
    q = torch.randn(1, 3, dtype=torch.float64, device=device, requires_grad=True)
    k = torch.randn(1, 3, dtype=torch.float64, device=device, requires_grad=True)
    loss = fastloss.contrastive_loss(q, k, logit_scale=2.0, symmetric=True)
    assert loss.item() == 0.0
    gq, gk = torch.autograd.grad(loss, (q, k))
    assert torch.equal(gq, torch.zeros_like(gq)) and torch.equal(gk, torch.zeros_like(gk))
    sig = fastloss.siglip_loss(q, k, 2.0, 0.5)
    torch.testing.assert_close(sig, reference.siglip_loss(q, k, 2.0, 0.5))


def test_never_saves_the_matrix(device):
    """Autograd keeps O((N + M) d) for the fused op: no saved tensor has N x M elements."""
    N, M = 64, 96
    q = torch.randn(N, 4, device=device, requires_grad=True)
    k = torch.randn(M, 4, device=device, requires_grad=True)
    scale = torch.tensor(5.0, device=device, requires_grad=True)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (sizes.append(t.numel()), t)[1], lambda t: t):
        loss = fastloss.contrastive_loss(q, k, logit_scale=scale, hard_negative_beta=0.2, block_rows=16)
    assert sizes and max(sizes) < N * M / 8, sizes
    loss.backward()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (sizes.append(t.numel()), t)[1], lambda t: t):
        reference.contrastive_loss(q, k, logit_scale=scale)
    assert max(sizes) >= N * M  # the hook does see a materialised matrix


@pytest.mark.parametrize("opts", [{"symmetric": True, "hard_negative_beta": 0.3},  # forward + recomputing backward
                                  {"hard_negative_beta": 0.3}, {"loss": "sigmoid", "logit_bias": True}],  # one pass
                         ids=["clip_hcl", "infonce_hcl", "sigmoid"])
def test_deterministic(device, opts):
    leaves, kw = make_inputs(70, 12, opts, device, dtype=torch.float32)
    a = run(fastloss.contrastive_loss, leaves, kw, block_rows=16)
    b = run(fastloss.contrastive_loss, leaves, kw, block_rows=16)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1], strict=True))


def test_block_rows_do_not_change_the_result(device):
    leaves, kw = make_inputs(45, 10, {"symmetric": True, "label_smoothing": 0.1}, device)
    base = run(fastloss.contrastive_loss, leaves, kw, block_rows=45)
    for block in (1, 2, 7, 44, 100):
        got = run(fastloss.contrastive_loss, leaves, kw, block_rows=block)
        torch.testing.assert_close(got[0], base[0], rtol=1e-12, atol=1e-13)
        for g, w in zip(got[1], base[1], strict=True):
            torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-12)


def test_nn_modules(device):
    x = torch.randn(10, 6, device=device, requires_grad=True)
    y = torch.randn(10, 6, device=device)
    s, b = torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)
    torch.testing.assert_close(fastloss.nn.ClipLoss()(x, y, s), fastloss.clip_loss(x, y, s))
    assert set(fastloss.nn.ClipLoss(output_dict=True)(x, y, s)) == {"contrastive_loss"}
    torch.testing.assert_close(fastloss.nn.SigLipLoss()(x, y, s, b), fastloss.siglip_loss(x, y, s, b))


# ------------------------------------------------------------------------------------------- open_clip parity
def _open_clip_loss_module():
    """open_clip.loss, also when the package itself does not import (its __init__ needs torchvision): the loss
    module depends on torch only, so it is loaded from its file."""
    try:
        import open_clip.loss as mod

        return mod
    except Exception:
        pass
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "loss.py"
    if not path.exists():
        return None
    s = importlib.util.spec_from_file_location("_open_clip_loss", path)
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    return mod


OPEN_CLIP = _open_clip_loss_module()
needs_open_clip = pytest.mark.skipif(OPEN_CLIP is None, reason="open_clip (open_clip_torch) is not installed")


@needs_open_clip
@pytest.mark.parametrize("with_bias", [False, True])
def test_open_clip_clip_loss(device, with_bias):
    gen = torch.Generator().manual_seed(11)
    img = F.normalize(torch.randn(33, 16, generator=gen, dtype=torch.float64), dim=1).to(device)
    txt = F.normalize(torch.randn(33, 16, generator=gen, dtype=torch.float64), dim=1).to(device)
    res = []
    for mod in ("open_clip", "fastloss"):
        i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
        s = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, device=device, requires_grad=True)
        b = torch.tensor(-0.5, dtype=torch.float64, device=device, requires_grad=True)
        extra = (b,) if with_bias else ()
        if mod == "open_clip":
            loss = OPEN_CLIP.ClipLoss()(i, t, s.exp(), *extra)
        else:
            loss = fastloss.nn.ClipLoss(block_rows=8)(i, t, s.exp(), *extra)
        leaves = (i, t, s) + extra
        res.append((loss.detach(), torch.autograd.grad(loss, leaves)))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-10, atol=1e-12)
    for g, w in zip(res[1][1], res[0][1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


@needs_open_clip
def test_open_clip_siglip_loss(device):
    gen = torch.Generator().manual_seed(12)
    img = F.normalize(torch.randn(29, 16, generator=gen, dtype=torch.float64), dim=1).to(device)
    txt = F.normalize(torch.randn(29, 16, generator=gen, dtype=torch.float64), dim=1).to(device)
    res = []
    for mod in ("open_clip", "fastloss"):
        i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
        s = torch.tensor(math.log(10.0), dtype=torch.float64, device=device, requires_grad=True)
        b = torch.tensor(-10.0, dtype=torch.float64, device=device, requires_grad=True)
        loss_mod = OPEN_CLIP.SigLipLoss() if mod == "open_clip" else fastloss.nn.SigLipLoss(block_rows=8)
        loss = loss_mod(i, t, s.exp(), b)
        res.append((loss.detach(), torch.autograd.grad(loss, (i, t, s, b))))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-10, atol=1e-12)
    for g, w in zip(res[1][1], res[0][1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------------------------- op contracts
def _op_args(device, dtype, kind, symmetric=False, exclude_self=False, beta=0.0, eps=0.0, decoupled=False):
    gen = torch.Generator().manual_seed(2)
    N = 6
    M = N if (symmetric or exclude_self) else 9
    q = torch.randn(N, 5, generator=gen).to(device, dtype)
    k = q if exclude_self else torch.randn(M, 5, generator=gen).to(device, dtype)
    scale = (torch.rand(N, generator=gen) + 1).to(device, torch.float64 if dtype == torch.float64 else torch.float32)
    bias = torch.tensor(-0.5, dtype=scale.dtype, device=device)
    positive = None if kind == 2 else ((torch.arange(N) + 3) % N if exclude_self else torch.arange(N)).to(device)
    labels = torch.tensor([0, 1, 0, 1, 2, 3], device=device) if kind == 2 else None
    return (q, k if not exclude_self else q.clone(), scale, bias, positive, labels, labels, kind, symmetric,
            exclude_self, decoupled, beta, eps, 4)


OP_CASES = [
    {"kind": 0}, {"kind": 0, "symmetric": True, "beta": 0.5, "eps": 0.1}, {"kind": 0, "decoupled": True},
    {"kind": 1}, {"kind": 2, "exclude_self": True}, {"kind": 0, "exclude_self": True},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", OP_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_opcheck(device, dtype, case):
    args = _op_args(device, dtype, **case)
    grad_args = tuple(a.detach().requires_grad_() if i in (0, 1, 2, 3) else a for i, a in enumerate(args))
    torch.library.opcheck(ops.contrastive_fwd.default, grad_args)
    row_loss, col_loss, rs, cs = ops.contrastive_fwd(*args)
    bwd = (torch.rand_like(row_loss), torch.rand_like(col_loss)) + args[:7] + (rs, cs) + args[7:]
    torch.library.opcheck(ops.contrastive_bwd.default, bwd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", [c for c in OP_CASES if not c.get("symmetric")],
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_opcheck_fwd_grad(device, dtype, case):
    args = _op_args(device, dtype, **case)
    fg = args[:8] + args[9:]  # no `symmetric` argument
    grad_args = tuple(a.detach().requires_grad_() if i in (0, 1, 2, 3) else a for i, a in enumerate(fg))
    torch.library.opcheck(ops.contrastive_fwd_grad.default, grad_args)
    # its forward outputs are contrastive_fwd's, its gradients contrastive_bwd's for a unit upstream gradient
    total, row_loss, rs, dq, dk, dscale, dbias = ops.contrastive_fwd_grad(*fg)
    row_loss2, _, rs2, cs2 = ops.contrastive_fwd(*args)
    grads = ops.contrastive_bwd(torch.ones_like(row_loss2), row_loss2.new_zeros(0), *args[:7], rs2, cs2, *args[7:])
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype != torch.float64 else {}
    torch.testing.assert_close(row_loss, row_loss2, **tol)
    torch.testing.assert_close(rs, rs2, **tol)
    torch.testing.assert_close(total, row_loss2.sum(), **tol)
    for got, want in zip((dq, dk, dscale, dbias), grads, strict=True):
        torch.testing.assert_close(got.to(want.dtype), want, **(tol if dtype != torch.bfloat16 else
                                                                {"rtol": 2e-2, "atol": 2e-2}))


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Names of the fastloss ops that reach the kernels while active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastloss":
            self.names.append(func._schema.name.split("::")[1])
        return func(*args, **(kwargs or {}))


ONE_PASS = [v for v in VARIANTS if not v[1].get("symmetric")]


@pytest.mark.parametrize("variant", ONE_PASS, ids=lambda v: v[0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_pass_gradient_matches_recompute(device, variant, reduction):
    """A scalar reduction with gradients wanted takes the gradient in the forward pass (contrastive_fwd_grad,
    no backward op); reduction='none' takes the recomputing backward. Both agree, and match the reference."""
    _, opts = variant
    leaves, kw = make_inputs(13, 5, opts, device)
    with _OpLog() as log:
        out = fastloss.contrastive_loss(leaves[0], leaves[1], reduction=reduction, block_rows=4, **kw)
        grads = torch.autograd.grad(out, leaves, grad_like(out))
    assert log.names == ["contrastive_fwd_grad"], log.names
    with _OpLog() as log:
        rows = fastloss.contrastive_loss(leaves[0], leaves[1], reduction="none", block_rows=4, **kw)
        want = rows.sum() if reduction == "sum" else rows.mean()
        want_grads = torch.autograd.grad(want, leaves, grad_like(want))
    assert log.names == ["contrastive_fwd", "contrastive_bwd"], log.names
    torch.testing.assert_close(out, want, rtol=1e-13, atol=1e-14)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-13)
    ref = reference.contrastive_loss(leaves[0], leaves[1], reduction=reduction, **kw)
    for g, w in zip(grads, torch.autograd.grad(ref, leaves, grad_like(ref)), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_one_pass_only_when_a_gradient_is_wanted(device):
    """No gradient work without requires_grad or under no_grad; CLIP (symmetric) always recomputes."""
    leaves, kw = make_inputs(9, 4, {"loss": "sigmoid", "logit_bias": True}, device)
    plain = [t.detach() for t in leaves]
    with _OpLog() as log:
        fastloss.contrastive_loss(plain[0], plain[1], logit_scale=plain[2], logit_bias=plain[3], loss="sigmoid")
        with torch.no_grad():
            fastloss.contrastive_loss(leaves[0], leaves[1], **kw)
    assert log.names == ["contrastive_fwd", "contrastive_fwd"], log.names
    with _OpLog() as log:
        fastloss.clip_loss(leaves[0], leaves[1], leaves[2]).backward()
    assert log.names == ["contrastive_fwd", "contrastive_bwd"], log.names


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("frozen", ["key", "query", "both"])
def test_frozen_side_skips_its_gradient(device, reduction, frozen):
    """A side that needs no gradient (a queue of keys, a frozen tower) is skipped: its gradient comes back empty
    from the op (its GEMM never runs), and everything else is unchanged (one pass and recompute alike)."""
    leaves, kw = make_inputs(9, 5, {"extra_keys": 20, "positive": True, "logit_bias": True}, device)
    q, k = leaves[0], leaves[1]
    if frozen in ("key", "both"):
        k = k.detach()
    if frozen in ("query", "both"):
        q = q.detach()
    live = [t for t in (q, k, *leaves[2:]) if t.requires_grad]

    def loss(fn):
        out = fn(q, k, reduction=reduction, block_rows=4, **kw)
        return out.sum() if reduction == "none" else out

    got = torch.autograd.grad(loss(fastloss.contrastive_loss), live)
    want = torch.autograd.grad(loss(reference.contrastive_loss), live)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    args = (q, k, kw["logit_scale"].expand(9), kw["logit_bias"], kw["positive"], None, None, 0, False, False,
            0.0, 0.0, 4)
    flags = (frozen not in ("query", "both"), frozen not in ("key", "both"))
    with torch.no_grad():  # the ops themselves (contrastive_bwd has no autograd)
        out = ops.contrastive_fwd_grad(*args, *flags)
        fwd = ops.contrastive_fwd(*args[:8], False, *args[8:])
        bwd = ops.contrastive_bwd(torch.ones_like(fwd[0]), fwd[1], *args[:7], fwd[2], fwd[3], args[7], False,
                                  *args[8:], *flags)
    for dq, dk in ((out[3], out[4]), bwd[:2]):
        assert dq.shape[0] == (9 if flags[0] else 0) and dk.shape[0] == (29 if flags[1] else 0)
    torch.library.opcheck(ops.contrastive_fwd_grad.default, (*args, *flags))


@pytest.mark.parametrize("name", ["nt_xent", "supcon", "siglip"])
def test_one_pass_wrappers(device, name):
    """The wrappers whose loss is row-wise (query and key may be the same tensor) through the one-pass gradient,
    against the reference."""
    gen = torch.Generator().manual_seed(8)
    z = torch.randn(12, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    t = torch.tensor(0.3, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.tensor(-2.0, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 5, 0, 1, 1, 3, 4], device=device)
    calls = {
        "nt_xent": lambda m: m.nt_xent_loss(z[:6], z[6:], temperature=t),
        "supcon": lambda m: m.supcon_loss(z, labels, temperature=t, base_temperature=0.07),
        "siglip": lambda m: m.siglip_loss(z[:6], z[6:], 1 / t, b),
    }
    with _OpLog() as log:
        out = calls[name](fastloss)
    assert log.names == ["contrastive_fwd_grad"]
    leaves = (z, t, b) if name == "siglip" else (z, t)
    want = calls[name](reference)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-13)
    for g, w in zip(torch.autograd.grad(out * 1.7, leaves), torch.autograd.grad(want * 1.7, leaves), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


GRADCHECK = [
    ("infonce", {}), ("symmetric_hcl_smooth", {"symmetric": True, "hard_negative_beta": 0.5, "label_smoothing": 0.1}),
    ("dcl_per_row", {"decoupled": True, "per_row_scale": True}), ("sigmoid", {"loss": "sigmoid", "logit_bias": True}),
    ("hcl_smooth_per_row", {"hard_negative_beta": 0.5, "label_smoothing": 0.1, "per_row_scale": True}),
]


@pytest.mark.parametrize("case", GRADCHECK, ids=lambda c: c[0])
@pytest.mark.parametrize("reduction", ["none", "sum"])  # sum: row-wise losses take the one-pass gradient
def test_gradcheck_float64(device, case, reduction):
    _, opts = case
    leaves, kw = make_inputs(5, 3, opts, device)

    def f(*xs):
        kw2 = dict(kw, logit_scale=xs[2])
        if len(xs) > 3:
            kw2["logit_bias"] = xs[3]
        return fastloss.contrastive_loss(xs[0], xs[1], block_rows=2, reduction=reduction, **kw2)

    assert torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_gradcheck_wrappers(device):
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(8, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    t = torch.tensor(0.7, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 5, 0], device=device)
    assert torch.autograd.gradcheck(lambda z, t: fastloss.supcon_loss(z, labels, temperature=t), (z, t))
    assert torch.autograd.gradcheck(lambda z, t: fastloss.nt_xent_loss(z[:4], z[4:], temperature=t), (z, t))


class TwoTower(torch.nn.Module):
    def __init__(self, loss):
        super().__init__()
        self.img = torch.nn.Linear(12, 8)
        self.txt = torch.nn.Linear(10, 8)
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = torch.nn.Parameter(torch.tensor(-5.0))
        self.loss = loss

    def forward(self, a, b):
        x, y = F.normalize(self.img(a), dim=-1), F.normalize(self.txt(b), dim=-1)
        return self.loss(x, y, self.log_scale.exp(), self.bias)


COMPILE_LOSSES = {
    "clip": lambda x, y, s, b: fastloss.clip_loss(x, y, s, b),
    "siglip": lambda x, y, s, b: fastloss.siglip_loss(x, y, s, b),
    "hcl_stats": lambda x, y, s, b: sum(
        t.float().sum() for t in fastloss.contrastive_loss(x, y, logit_scale=s, hard_negative_beta=0.5,
                                                           return_stats=True, block_rows=3)[1][:2]
    ) * 0 + fastloss.contrastive_loss(x, y, logit_scale=s, logit_bias=b, hard_negative_beta=0.5, block_rows=3),
}


@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
@pytest.mark.parametrize("name", list(COMPILE_LOSSES))
def test_compile_fullgraph(device, name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TwoTower(COMPILE_LOSSES[name]).to(device)
    a, b = torch.randn(9, 12, device=device), torch.randn(9, 10, device=device)
    eager = model(a, b)
    eager.backward()
    g_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # Inductor's on-disk caches key the graph, not the custom ops' fake kernels: a cached graph from an older
    # build (other record shape) would be replayed, so this test compiles afresh.
    with torch._inductor.config.patch(force_disable_caches=True):
        out = torch.compile(model, fullgraph=True)(a, b)
        out.backward()
    torch.testing.assert_close(out, eager)
    for g, ge in zip([p.grad for p in model.parameters()], g_eager, strict=True):
        torch.testing.assert_close(g, ge)


# ------------------------------------------------------------------------------------------- bad inputs
FUNCS = [fastloss.contrastive_loss, reference.contrastive_loss]


def _good(device="cpu"):
    return torch.randn(4, 3, device=device), torch.randn(6, 3, device=device)


@pytest.mark.parametrize("fn", FUNCS, ids=["fused", "reference"])
@pytest.mark.parametrize(
    "case",
    [
        ("width mismatch", lambda q, k: (q, k[:, :2]), {}, ValueError, "same width"),
        ("1-D query", lambda q, k: (q[0], k), {}, ValueError, "query must have shape"),
        ("1-D key", lambda q, k: (q, k[0]), {}, ValueError, "key must have shape"),
        ("int features", lambda q, k: (q.long(), k), {}, TypeError, "query must be float"),
        ("dtype mismatch", lambda q, k: (q, k.double()), {}, TypeError, "same dtype"),
        ("empty", lambda q, k: (q[:0], k), {}, ValueError, "at least one row"),
        ("not a tensor", lambda q, k: (q.tolist(), k), {}, TypeError, "query must be a torch.Tensor"),
        ("positive out of range", lambda q, k: (q, k), {"positive": torch.tensor([0, 1, 6, 2])}, IndexError,
         "positive 6 of row 2"),
        ("negative positive", lambda q, k: (q, k), {"positive": torch.tensor([0, -1, 2, 2])}, IndexError,
         "positive -1"),
        ("positive shape", lambda q, k: (q, k), {"positive": torch.tensor([0, 1])}, ValueError,
         r"positive must have shape \(4,\)"),
        ("float positive", lambda q, k: (q, k), {"positive": torch.zeros(4)}, TypeError, "integer indices"),
        ("symmetric N != M", lambda q, k: (q, k), {"symmetric": True}, ValueError, "symmetric=True needs"),
        ("diag needs N <= M", lambda q, k: (k, q), {}, ValueError, "N <= M"),
        ("scale shape", lambda q, k: (q, k), {"logit_scale": torch.ones(3)}, ValueError,
         r"logit_scale must be a scalar tensor or have shape \(4,\)"),
        ("scale nan", lambda q, k: (q, k), {"logit_scale": float("nan")}, ValueError, "logit_scale must be finite"),
        ("bias shape", lambda q, k: (q, k), {"logit_bias": torch.ones(2)}, ValueError, "logit_bias must be a scalar"),
        ("bad loss", lambda q, k: (q, k), {"loss": "hinge"}, ValueError, "loss must be"),
        ("sigmoid + dcl", lambda q, k: (q, k), {"loss": "sigmoid", "decoupled": True}, ValueError, "softmax loss"),
        ("sigmoid symmetric", lambda q, k: (q, q), {"loss": "sigmoid", "symmetric": True}, ValueError,
         "symmetric applies"),
        ("negative beta", lambda q, k: (q, k), {"hard_negative_beta": -1.0}, ValueError, "hard_negative_beta"),
        ("smoothing > 1", lambda q, k: (q, k), {"label_smoothing": 2.0}, ValueError, "label_smoothing"),
        ("reduction", lambda q, k: (q, k), {"reduction": "avg"}, ValueError, "reduction must be"),
        ("block_rows", lambda q, k: (q, k), {"block_rows": 0}, ValueError, "block_rows"),
    ],
    ids=lambda c: c[0] if isinstance(c, tuple) else c,
)
def test_bad_inputs(fn, case):
    _, make, kw, exc, msg = case
    q, k = make(*_good())
    kw = dict({"logit_scale": 2.0}, **kw)
    with pytest.raises(exc, match=msg):
        fn(q, k, **kw)


def test_bad_wrapper_inputs():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="same shape"):
        fastloss.nt_xent_loss(x, x[:3], temperature=0.1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fastloss.nt_xent_loss(x, x, temperature=0.0)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        fastloss.supcon_loss(x, torch.zeros(3, dtype=torch.long), temperature=0.1)
    with pytest.raises(ValueError, match="same width"):
        fastloss.clip_loss(x, torch.randn(4, 2), 1.0)


@pytest.mark.parametrize("case", ["no columns", "sigmoid beta", "negative beta", "smoothing > 1", "bias device"])
def test_direct_op_bad_options_raise(device, case):
    """The C++ ops check what the Python API checks, so a direct torch.ops call cannot reach a kernel with
    arguments it does not handle (d = 0 would hang the fused GEMM's pipeline; a host tensor in a CUDA kernel is an
    illegal address)."""
    kind = 1 if case == "sigmoid beta" else 0
    args = list(_op_args(device, torch.float32, kind))
    if case == "no columns":
        args[0], args[1] = args[0][:, :0], args[1][:, :0]
    elif case == "sigmoid beta" or case == "negative beta":
        args[11] = 0.5 if case == "sigmoid beta" else -1.0
    elif case == "smoothing > 1":
        args[12] = 1.5
    elif device == "cpu":
        pytest.skip("needs a second device")
    else:
        args[3] = args[3].cpu()
    msg = {"no columns": "one column", "sigmoid beta": "softmax kind only", "negative beta": "beta must be",
           "smoothing > 1": "eps in", "bias device": "features' device"}[case]
    with pytest.raises(RuntimeError, match=msg):
        ops.contrastive_fwd(*args)


def test_backward_is_exactly_linear_in_a_power_of_two_upstream(device):
    """The recomputing backward divides the upstream gradient by a power of two near its largest magnitude and
    multiplies the results back (so that fp16 copies of G do not underflow at large N): an upstream scaled by
    2^-60 must give exactly the gradients scaled by 2^-60 (fp32: the scaled results stay normal numbers)."""
    gen = torch.Generator().manual_seed(5)
    q = F.normalize(torch.randn(70, 24, generator=gen), dim=1).to(device).requires_grad_()
    k = F.normalize(torch.randn(70, 24, generator=gen), dim=1).to(device).requires_grad_()
    scale = torch.tensor(14.0, device=device, requires_grad=True)
    loss = fastloss.clip_loss(q, k, scale)
    g1 = torch.autograd.grad(loss, (q, k, scale), torch.ones_like(loss), retain_graph=True)
    g2 = torch.autograd.grad(loss, (q, k, scale), torch.full_like(loss, 2.0**-60))
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(b * 2.0**60, a)


@pytest.mark.host_kernels
def test_direct_op_bad_positive_raises_index_error():
    q, k = _good()
    args = list(_op_args("cpu", torch.float32, 0))
    args[4] = torch.tensor([0, 1, 2, 3, 4, 99])
    with pytest.raises(IndexError, match="positive 99"):
        ops.contrastive_fwd(*args)


def test_random_configurations(device):
    """Seeded random mixes of every option, shape and tile height against the float64 reference."""
    rng = torch.Generator().manual_seed(2024)
    pick = lambda *xs: xs[int(torch.randint(len(xs), (1,), generator=rng))]
    for _ in range(30):
        N = int(torch.randint(1, 40, (1,), generator=rng))
        d = int(torch.randint(1, 20, (1,), generator=rng))
        loss = pick("softmax", "softmax", "sigmoid")
        symmetric = loss == "softmax" and pick(True, False)
        M = N if symmetric else N + int(torch.randint(0, 9, (1,), generator=rng))
        kw = {"loss": loss, "symmetric": symmetric, "logit_bias": pick(None, -0.7)}
        if loss == "softmax":
            kw.update(decoupled=pick(False, True), hard_negative_beta=pick(0.0, 0.0, 0.8),
                      label_smoothing=pick(0.0, 0.2))
        if not symmetric and pick(True, False):
            kw["positive"] = torch.randint(0, M, (N,), generator=rng).to(device)
        scale = pick(torch.tensor(pick(0.5, 8.0), dtype=torch.float64),
                     torch.rand(N, generator=rng, dtype=torch.float64) * 10)
        q = torch.randn(N, d, generator=rng, dtype=torch.float64).to(device).requires_grad_()
        k = torch.randn(M, d, generator=rng, dtype=torch.float64).to(device).requires_grad_()
        s = scale.to(device).requires_grad_()
        block = pick(None, 1, 3, 16)
        res = []
        for fn in (fastloss.contrastive_loss, reference.contrastive_loss):
            out = fn(q, k, logit_scale=s, reduction="sum", block_rows=block,
                     **kw)
            res.append((out.detach(), torch.autograd.grad(out, (q, k, s))))
        msg = f"N={N} M={M} d={d} block={block} {kw}"
        # sums of up to ~1e4 in magnitude: absolute tolerance relative to the largest entry (summation order)
        for g, w in zip((res[0][0], *res[0][1]), (res[1][0], *res[1][1]), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11 * (1 + float(w.abs().max())), msg=msg)


# ------------------------------------------------------------------------------------------- one-pass records
@pytest.mark.parametrize("shape", [(1, 1, 3, None), (7, 12, 5, 3), (40, 61, 9, 16), (33, 33, 4, None)],
                         ids=lambda s: "N{}_M{}_d{}_b{}".format(*s))
@pytest.mark.parametrize("with_positive", [False, True])
def test_sigmoid_return_stats(device, shape, with_positive):
    """SigLIP return_stats: LSE over every candidate and top-1 (positive above every negative) from the same
    single pass, vs the float64 reference and the closed forms on the materialised logits."""
    N, M, d, block = shape
    gen = torch.Generator().manual_seed(N * M + d)
    q = torch.randn(N, d, generator=gen, dtype=torch.float64).to(device)
    k = torch.randn(M, d, generator=gen, dtype=torch.float64).to(device)
    k[: min(N, M)] += 1.5 * q[: min(N, M)]  # mostly correct diagonal, so both outcomes of top-1 occur
    pos = (torch.randint(0, M, (N,), generator=gen) if with_positive else torch.arange(N)).to(device)
    kw = {"positive": pos, "logit_scale": 4.0, "logit_bias": -2.0, "loss": "sigmoid", "reduction": "none"}
    loss, st = fastloss.contrastive_loss(q, k, return_stats=True, block_rows=block, **kw)
    ref_loss, ref = reference.contrastive_loss(q, k, return_stats=True, **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    S = 4.0 * q @ k.T - 2.0
    torch.testing.assert_close(st.lse, S.logsumexp(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref.lse, S.logsumexp(1), rtol=1e-12, atol=1e-12)
    s_p = S.gather(1, pos[:, None]).squeeze(1)
    neg = S.masked_fill(F.one_hot(pos, M).bool(), float("-inf")).amax(1)
    assert torch.equal(st.correct, s_p > neg) and torch.equal(ref.correct, st.correct)
    assert st.col_lse is None and not st.lse.requires_grad
    if N > 2:
        assert 0 < int(st.correct.sum()) < N or with_positive


def test_sigmoid_return_stats_float32(device):
    gen = torch.Generator().manual_seed(8)
    q = F.normalize(torch.randn(70, 24, generator=gen), dim=1).to(device)
    k = F.normalize(torch.randn(70, 24, generator=gen), dim=1).to(device)
    _, st = fastloss.contrastive_loss(
        q, k, logit_scale=10.0, logit_bias=-10.0, loss="sigmoid", return_stats=True, block_rows=16)
    _, ref = reference.contrastive_loss(q.double(), k.double(), logit_scale=10.0, logit_bias=-10.0, loss="sigmoid",
                                        return_stats=True)
    torch.testing.assert_close(st.lse.double(), ref.lse, rtol=1e-5, atol=1e-5)


def test_supcon_base_temperature(device):
    """base_temperature scales the loss by temperature / base_temperature (Khosla et al.'s reference code):
    fused vs reference (loss and gradients, tensor temperature included) and vs the closed form."""
    gen = torch.Generator().manual_seed(21)
    f = F.normalize(torch.randn(12, 6, generator=gen, dtype=torch.float64), dim=1).to(device).requires_grad_()
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 0, 2, 1, 4, 4, 0], device=device)
    t = torch.tensor(0.1, dtype=torch.float64, device=device, requires_grad=True)
    res = []
    for mod in (fastloss, reference):
        out = mod.supcon_loss(f, labels, temperature=t, base_temperature=0.07, block_rows=5)
        res.append((out.detach(), torch.autograd.grad(out, (f, t))))
    torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-10, atol=1e-12)
    for g, w in zip(res[0][1], res[1][1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)
    # closed form: -(T / T_b) * mean over anchors with positives of the mean log-probability of the positives
    with torch.no_grad():
        S = f @ f.T / 0.1
        S.fill_diagonal_(float("-inf"))
        logp = S.log_softmax(1)
        P = (labels[:, None] == labels[None, :]) & ~torch.eye(12, dtype=torch.bool, device=device)
        per = -(0.1 / 0.07) * logp.masked_fill(~P, 0).sum(1) / P.sum(1).clamp(min=1)
        want = per[P.any(1)].mean()
    torch.testing.assert_close(res[0][0], want)
    plain = fastloss.supcon_loss(f, labels, temperature=0.1, reduction="none")
    torch.testing.assert_close(fastloss.supcon_loss(f, labels, temperature=0.1, base_temperature=0.1,
                                                    reduction="none"), plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="base_temperature must be > 0"):
        fastloss.supcon_loss(f, labels, temperature=0.1, base_temperature=0.0)


@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[4], VARIANTS[6], VARIANTS[10], VARIANTS[13]],
                         ids=lambda v: v[0])
@pytest.mark.parametrize("shape", [(257, 5, None), (130, 33, 64), (61, 8, 7)], ids=lambda s: "N{}_d{}_b{}".format(*s))
def test_larger_rows_match_reference(device, variant, shape):
    """Rows long enough for every thread to hold several 16-byte packs (CUDA), unaligned row starts (M odd),
    column passes over more rows than one slice sweep: float64 vs the reference."""
    _, opts = variant
    N, d, block = shape
    leaves, kw = make_inputs(N, d, dict(opts, extra_keys=0 if opts.get("symmetric") else 3), device, seed=1)
    got = run(fastloss.contrastive_loss, leaves, kw, block_rows=block)
    want = run(reference.contrastive_loss, leaves, kw)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


def test_nan_feature_propagates(device):
    """A NaN in a key reaches the loss (the one-pass max/sum state keeps NaN instead of dropping it)."""
    q = torch.randn(5, 4, device=device)
    k = torch.randn(5, 4, device=device)
    k[2, 1] = float("nan")
    for kw in ({}, {"symmetric": True}, {"hard_negative_beta": 0.5}, {"loss": "sigmoid"}):
        loss = fastloss.contrastive_loss(q, k, logit_scale=2.0, reduction="none", **kw)
        assert loss.isnan().all(), kw
    assert fastloss.supcon_loss(torch.cat([q, k]), torch.arange(10, device=device) % 3, temperature=0.5).isnan()


HAS_CUDA_KERNELS = torch.cuda.is_available() and fastloss._ops.has_kernel("contrastive_fwd", "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_cuda_bad_positive_poisons_only_its_row(dtype, loss):
    """CUDA checks no index on the host (no sync): an out-of-range positive gives its row a NaN loss, NaN dq row
    and NaN dscale, while dk and every other row stay finite and equal to the result without that row."""
    gen = torch.Generator().manual_seed(13)
    N, M, d = 9, 14, 6
    q = torch.randn(N, d, generator=gen).to("cuda", dtype).requires_grad_()
    k = torch.randn(M, d, generator=gen).to("cuda", dtype).requires_grad_()
    s = (torch.rand(N, generator=gen) + 1).cuda().requires_grad_()
    pos = torch.randint(0, M, (N,), generator=gen).cuda()
    pos[4] = M + 3
    kw = {"loss": loss, "logit_bias": -1.0 if loss == "sigmoid" else None}
    out = fastloss.contrastive_loss(q, k, positive=pos, logit_scale=s, reduction="none", block_rows=4, **kw)
    gq, gk, gs = torch.autograd.grad(out.sum(), (q, k, s))
    keep = torch.arange(N, device="cuda") != 4
    assert out[4].isnan() and not out[keep].isnan().any()
    assert gq[4].isnan().all() and gs[4].isnan()
    assert torch.isfinite(gq[keep]).all() and torch.isfinite(gk).all() and torch.isfinite(gs[keep]).all()
    # the other rows' gradients are those of the problem without row 4
    q2, s2 = q.detach()[keep].requires_grad_(), s.detach()[keep].requires_grad_()
    k2 = k.detach().clone().requires_grad_()
    out2 = fastloss.contrastive_loss(q2, k2, positive=pos[keep], logit_scale=s2, reduction="none", block_rows=4,
                                     **kw)
    g2 = torch.autograd.grad(out2.sum(), (q2, k2, s2))
    torch.testing.assert_close(out[keep], out2)
    torch.testing.assert_close(gq[keep], g2[0])
    torch.testing.assert_close(gk, g2[1])
    torch.testing.assert_close(gs[keep], g2[2])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_mixed_backward_matches_upcast(dtype):
    """The fp16/bf16 backward (G written once in the operand dtype, dk accumulated in place in fp32 over many
    row blocks) against the same maths on fp32 copies of the rounded features."""
    gen = torch.Generator().manual_seed(14)
    N, d = 300, 40
    q = F.normalize(torch.randn(N, d, generator=gen), dim=1).to("cuda", dtype).requires_grad_()
    k = F.normalize(torch.randn(N, d, generator=gen), dim=1).to("cuda", dtype).requires_grad_()
    out = fastloss.clip_loss(q, k, 20.0, block_rows=37)
    gq, gk = torch.autograd.grad(out, (q, k))
    q32, k32 = (x.detach().float().requires_grad_() for x in (q, k))
    want = reference.clip_loss(q32.double(), k32.double(), 20.0)
    wq, wk = torch.autograd.grad(want, (q32, k32))
    torch.testing.assert_close(out.double(), want, rtol=1e-2, atol=1e-2)  # the loss comes back in `dtype`
    for g, w in ((gq, wq), (gk, wk)):
        err = (g.double() - w.double()).abs().max()
        assert err <= 2e-2 * w.abs().max(), (err, w.abs().max())


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a GPU and the CUDA kernels")
def test_cuda_fp16_backward_at_large_n_keeps_the_negatives():
    """CLIP with fp16 features at N = 8192: with the mean's 1/N in the upstream gradient, t_i G_ij of a negative
    lane is ~1e-7, fp16 subnormal (and below its smallest subnormal at N = 65536). The backward normalises the
    upstream gradient first, so dq matches the float64 gradient of the same rounded features."""
    gen = torch.Generator().manual_seed(21)
    N, d = 8192, 32
    q = F.normalize(torch.randn(N, d, generator=gen), dim=1).to("cuda", torch.float16).requires_grad_()
    k = F.normalize(torch.randn(N, d, generator=gen), dim=1).to("cuda", torch.float16).requires_grad_()
    (gq,) = torch.autograd.grad(fastloss.clip_loss(q, k, 14.0), (q,))
    q64 = q.detach().double().requires_grad_()
    (wq,) = torch.autograd.grad(reference.clip_loss(q64, k.detach().double(), 14.0), (q64,))
    err = (gq.double() - wq).norm() / wq.norm()
    assert err < 1e-2, err


FUSED_SM90 = (HAS_CUDA_KERNELS and fastloss.build_info()["contrastive_fused_sm90"]
              and torch.cuda.get_device_capability() == (9, 0))


@pytest.mark.host_kernels  # on CPU it tests the fused GEMMs' twin, which the emulated CUDA build does not have
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [
    {"N": 300, "M": 300, "d": 64, "symmetric": True},                          # CLIP, tiles cut at 300
    {"N": 300, "M": 300, "d": 16, "symmetric": True, "block_rows": 100},       # 3 blocks, each under one row tile
    {"N": 300, "M": 333, "d": 24, "positive": True, "block_rows": 129},        # blocks of 1 row tile + 1 row
    {"N": 4096, "M": 4096, "d": 96, "symmetric": True, "bias": True},          # several key tiles, 2 row tiles
    {"N": 200, "M": 457, "d": 40, "positive": True},                           # InfoNCE, extra keys, d % 16 != 0
    {"N": 129, "M": 1000, "d": 8, "positive": True, "label_smoothing": 0.1},
    {"N": 64, "M": 64, "d": 32, "symmetric": True, "decoupled": True},
    {"N": 1, "M": 5, "d": 16, "positive": True},
    {"N": 260, "M": 390, "d": 24, "positive": True, "hard_negative_beta": 0.5},  # HCL: backward fused only
    {"N": 300, "M": 300, "d": 32, "exclude_self": True},                        # NT-Xent style: backward fused only
    {"N": 2048, "M": 2048, "d": 48, "loss": "sigmoid", "bias": True},            # SigLIP: one fused GEMM
    {"N": 150, "M": 700, "d": 16, "loss": "sigmoid", "bias": True, "positive": True},
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_fused_matches_tile_loop(monkeypatch, device, dtype, case):
    """FASTLOSS_CONTRASTIVE_FUSED=1 against the tile loop: the same losses, records and gradients up to summation
    order, through the forward op, the recomputing backward and the one-pass gradient. CUDA (sm_90, fp16 / bf16):
    CUTLASS GEMMs whose epilogues consume each 128 x 128 tile on chip (the forward's partial records, the
    backward's t_i G_ij, SigLIP's one-pass gradient), without the (rows x M) fp32 tile. CPU: their twin (the same
    tiles, partials and merges), in float64 to the last bits and through fp32 for 2-byte features."""
    if device == "cuda" and not (FUSED_SM90 and dtype != torch.float64):
        pytest.skip("the fused GEMMs need an sm_90 GPU, a build with CUTLASS and fp16 / bf16 features")
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("on CPU fp16 takes the same fp32 path as bf16")
    gen = torch.Generator().manual_seed(21)
    N, M, d = case["N"], case["M"], case["d"]
    if device == "cpu" and N * M > 10**6:
        N = M = 640  # the CPU twin is scalar: a smaller problem, still several row and key tiles
    q = F.normalize(torch.randn(N, d, generator=gen), dim=1).to(device, dtype)
    k = F.normalize(torch.randn(M, d, generator=gen), dim=1).to(device, dtype)
    s = (torch.rand(N, generator=gen) * 20 + 5).to(device, torch.float64 if dtype == torch.float64 else torch.float32)
    kw = {key: case[key] for key in ("symmetric", "label_smoothing", "decoupled", "hard_negative_beta", "loss",
                                     "block_rows") if key in case}
    if case.get("positive"):
        pos = torch.randint(0, M, (N,), generator=gen).to(device)
        if device == "cuda":
            pos[N // 2] = M + 7  # out of range: a NaN row, as in the tile loop (the CPU raises instead)
        kw["positive"] = pos
    if case.get("bias"):
        kw["logit_bias"] = torch.tensor(-0.5 if case.get("loss") != "sigmoid" else -8.0, device=device,
                                        dtype=s.dtype)

    def loss_fn(qq, kk, ss, **extra):
        if case.get("exclude_self"):  # NT-Xent: 2N views, self excluded
            return fastloss.nt_xent_loss(qq[: N // 2], qq[N // 2:], temperature=0.1, **extra)
        return fastloss.contrastive_loss(qq, kk, logit_scale=ss, **kw, **extra)

    cuda = device == "cuda"

    def everything(fused):
        monkeypatch.setenv("FASTLOSS_CONTRASTIVE_FUSED", "1" if fused else "0")
        out = {}
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        if not case.get("exclude_self"):
            with torch.no_grad():
                out["fwd"] = fastloss.contrastive_loss(q, k, logit_scale=s, reduction="none", return_stats=True,
                                                       **kw)
        for reduction in ("none", "mean"):
            qq, kk, ss = (x.detach().clone().requires_grad_() for x in (q, k, s))
            loss = loss_fn(qq, kk, ss, reduction=reduction)
            total = loss.nan_to_num().sum() if reduction == "none" else loss
            out[reduction] = (loss.detach(), torch.autograd.grad(total, (qq, kk, ss), allow_unused=True))
        if not cuda:
            return out, 0
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base

    def same(a, b, tol):
        if isinstance(a, tuple):
            assert len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                same(x, y, tol)
        elif a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True)

    got, peak1 = everything(True)
    want, peak0 = everything(False)
    assert got.keys() == want.keys()
    # 2-byte features: G rounds to fp16 / bf16 and the gradients come back in it (one ulp: 2^-8 relative)
    tol, gtol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-4, 1.6e-2)
    same(got.get("fwd"), want.get("fwd"), tol)  # (loss, ContrastiveStats)
    for key in ("none", "mean"):
        same(got[key][0], want[key][0], tol)
        same(got[key][1], want[key][1], gtol)
    if cuda and N * M * 4 >= 1 << 20:
        # the unfused passes hold a (rows x M) fp32 tile (N * M * 4 bytes) beside the fp16 / bf16 G (N * M * 2)
        assert peak1 < peak0 - N * M * 3, (peak1, peak0)
    folds = case.get("loss", "softmax") == "softmax" and not case.get("hard_negative_beta") and "fwd" in got
    if not cuda and dtype == torch.float64 and folds and N * M >= 10**4:
        # the twin really ran: its fold order (8-lane groups per 128-key tile) leaves other last bits in the sums
        assert not torch.equal(got["fwd"][1].lse, want["fwd"][1].lse)


def test_supcon_mean_without_positives(device):
    """No anchor has a positive: the mean over anchors is NaN (like torch's mean over nothing) and the gradients
    are zero, not NaN, in both the fused path and the reference."""
    f = torch.randn(5, 4, device=device, dtype=torch.float64)
    t = torch.tensor(0.3, device=device, dtype=torch.float64)
    for mod in (fastloss, reference):
        leaves = [f.clone().requires_grad_(), t.clone().requires_grad_()]
        out = mod.supcon_loss(leaves[0], torch.arange(5, device=device), temperature=leaves[1])
        grads = torch.autograd.grad(out, leaves)
        assert torch.isnan(out)
        assert all((g == 0).all() for g in grads)
