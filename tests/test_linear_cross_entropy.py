"""fastloss.linear_cross_entropy (chunked LM head + fused cross-entropy) against torch's
F.linear_cross_entropy (the peer, options torch has) and fastloss.reference (materialised logits, the rest);
both schedules: gradients formed in the forward (mean / sum) and recomputed in the backward."""

import pytest
import torch
import torch.nn.functional as F

import fastloss
from fastloss import reference
from fastloss._reduce import combine_cross_entropy, cross_entropy_part_grads
from fastloss.linear_cross_entropy import default_chunk_rows

# torch's F.linear_cross_entropy (2.12+; the GPU machine has 2.11), else the two ops it is defined as
torch_linear_ce = getattr(F, "linear_cross_entropy", None) or (
    lambda x, w, t, *, linear_bias=None, **kw: F.cross_entropy(F.linear(x, w, linear_bias), t, **kw))

REDUCTIONS = ["mean", "sum", "none"]
TORCH_OPTIONS = [{}, {"label_smoothing": 0.2}, {"weight": True}, {"weight": True, "label_smoothing": 0.4},
                 {"ignore_index": 3}]
EXTRAS = [{"lse_square_scale": 0.05}, {"softcap": 2.0, "logit_scale": 1.5},
          {"target_margin": 0.4, "label_smoothing": 0.1, "weight": True},
          {"target_margin": "per_class", "lse_square_scale": 0.1, "softcap": 3.0}]


def problem(device, dtype, lead=(23,), d=12, C=37, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, d, generator=gen, dtype=torch.float64)
    W = torch.randn(C, d, generator=gen, dtype=torch.float64) / d**0.5 * 2
    b = torch.randn(C, generator=gen, dtype=torch.float64) if bias else None
    t = torch.randint(0, C, lead, generator=gen)
    t.view(-1)[1::5] = -100
    to = lambda x: None if x is None else x.to(device, dtype)  # noqa: E731
    return to(h), to(W), to(b), t.to(device)


def options(opts, C, device, dtype):
    kw = dict(opts)
    gen = torch.Generator().manual_seed(5)
    if kw.get("weight"):
        kw["weight"] = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.2).to(device, dtype)
    if kw.get("target_margin") == "per_class":
        kw["target_margin"] = torch.rand(C, generator=gen, dtype=torch.float64).to(device, dtype)
    return kw


def run(fn, h, W, b, t, upstream_seed=0, **kw):
    """Loss (or (loss, lse)) and the gradients of input, weight and bias for an upstream gradient != 1."""
    leaves = [x.detach().clone().requires_grad_() for x in (h, W) + ((b,) if b is not None else ())]
    out = fn(leaves[0], leaves[1], t, linear_bias=leaves[2] if b is not None else None, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    gen = torch.Generator().manual_seed(upstream_seed)
    up = (torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5).to(loss)
    total = (loss * up).sum()
    if isinstance(out, tuple):  # a gradient through the returned lse too
        total = total + (out[1] * torch.linspace(-1, 1, out[1].numel(), dtype=out[1].dtype,
                                                 device=out[1].device).view(out[1].shape)).sum()
    grads = torch.autograd.grad(total, leaves)
    return out, grads


def assert_all_close(a, b, **tol):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", TORCH_OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 1000])
def test_matches_torch(device, dtype, reduction, opts, chunk_size):
    h, W, b, t = problem(device, dtype)
    kw = options(opts, W.shape[0], device, dtype)
    if "ignore_index" in kw:  # an ignore_index naming a real class: its rows drop out, the class stays
        t = torch.where(t == -100, torch.full_like(t, kw["ignore_index"]), t)
    (loss, grads) = run(fastloss.linear_cross_entropy, h, W, b, t, reduction=reduction, chunk_size=chunk_size, **kw)
    (ref, ref_grads) = run(torch_linear_ce, h, W, b, t, reduction=reduction, **kw)
    assert loss.dtype == ref.dtype and loss.shape == ref.shape
    tol = {} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(loss, ref, **tol)
    assert_all_close(grads, ref_grads, **({"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else tol))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", EXTRAS, ids=lambda o: "-".join(o))
@pytest.mark.parametrize("return_lse", [False, True])
def test_extras_match_reference(device, reduction, opts, return_lse):
    """The options torch lacks, against the materialised logits in float64 (a (B, T, d) input)."""
    h, W, b, t = problem(device, torch.float64, lead=(3, 7))
    kw = options(opts, W.shape[0], device, torch.float64)
    kw.update(reduction=reduction, return_lse=return_lse)
    out, grads = run(fastloss.linear_cross_entropy, h, W, b, t, chunk_size=4, **kw)
    ref, ref_grads = run(reference.linear_cross_entropy, h, W, b, t, **kw)
    tol = {"rtol": 1e-11, "atol": 1e-12}
    assert_all_close(out if return_lse else (out,), ref if return_lse else (ref,), **tol)
    assert_all_close(grads, ref_grads, **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision(device, dtype, reduction):
    """2-byte inputs: the logits formed in that dtype (as F.linear forms them), the loss from them in fp32, the
    weight and bias gradients accumulated over chunks in fp32. Against float64 maths on the same rounded
    values: no worse than torch's own F.linear_cross_entropy in that dtype, up to a rounding."""
    h, W, b, t = problem(device, dtype, lead=(64,), d=32, C=300)
    kw = {"reduction": reduction, "label_smoothing": 0.1}
    out, grads = run(fastloss.linear_cross_entropy, h, W, b, t, chunk_size=8, **kw)
    peer, peer_grads = run(torch_linear_ce, h, W, b, t, **kw)
    # the exact value for these inputs: float64 throughout (logits rounded to the dtype first, as both do)
    exact, exact_grads = run(reference.linear_cross_entropy, h.double(), W.double(), b.double(), t, **kw)
    eps = torch.finfo(dtype).eps
    for got, theirs, want in zip((out, *grads), (peer, *peer_grads), (exact, *exact_grads), strict=True):
        err = (got.double() - want).abs().max().item()
        peer_err = (theirs.double() - want).abs().max().item()
        assert err <= peer_err + 2 * eps * want.abs().max().item() + 1e-6, (err, peer_err)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.2, "weight": True}], ids=["plain", "smooth-weight"])
@pytest.mark.parametrize("target_grad", [False, True])
def test_probability_targets_match_torch(device, dtype, reduction, opts, target_grad):
    """Soft targets (N, C): the cross_entropy_prob kernels per chunk; the target's gradient when it wants one
    (then the recomputing schedule also for mean / sum)."""
    h, W, b, t = problem(device, dtype, lead=(19,))
    C = W.shape[0]
    gen = torch.Generator().manual_seed(9)
    probs = torch.softmax(torch.randn(19, C, generator=gen, dtype=torch.float64) * 2, -1).to(device, dtype)
    kw = options(opts, C, device, dtype)
    outs = []
    for fn in (fastloss.linear_cross_entropy, torch_linear_ce):
        leaves = [x.clone().requires_grad_() for x in (h, W, b)]
        tt = probs.clone().requires_grad_(target_grad)
        extra = {"chunk_size": 5} if fn is fastloss.linear_cross_entropy else {}
        loss = fn(leaves[0], leaves[1], tt, linear_bias=leaves[2], reduction=reduction, **kw, **extra)
        up = (torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5).to(loss)
        outs.append((loss, torch.autograd.grad((loss * up).sum(), leaves + ([tt] if target_grad else []))))
    (loss, grads), (ref, ref_grads) = outs
    assert loss.dtype == ref.dtype
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-11, "atol": 1e-12}
    torch.testing.assert_close(loss, ref, **tol)
    assert_all_close(grads, ref_grads, **tol)


@pytest.mark.parametrize("opts", [{"lse_square_scale": 0.1, "return_lse": True},
                                  {"softcap": 2.0, "logit_scale": 0.7, "reduction": "sum"}], ids=["lse", "premaps"])
def test_probability_targets_extras(device, opts):
    h, W, b, t = problem(device, torch.float64, lead=(2, 5))
    gen = torch.Generator().manual_seed(10)
    probs = torch.softmax(torch.randn(2, 5, W.shape[0], generator=gen, dtype=torch.float64), -1).to(device)
    out, grads = run(fastloss.linear_cross_entropy, h, W, b, probs, chunk_size=3, **opts)
    ref, ref_grads = run(reference.linear_cross_entropy, h, W, b, probs, **opts)
    assert_all_close(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,),
                     rtol=1e-11, atol=1e-12)
    assert_all_close(grads, ref_grads, rtol=1e-11, atol=1e-12)
    # bf16 input beside fp32 targets: the loss in torch's promoted dtype
    lo = fastloss.linear_cross_entropy(h.bfloat16(), W.bfloat16(), probs.float(), linear_bias=b.bfloat16())
    assert lo.dtype == torch.float32


def test_part_grads_match_autograd():
    """cross_entropy_part_grads is d combine_cross_entropy / d parts, for every reduction option."""
    gen = torch.Generator().manual_seed(2)
    n, C = 9, 13
    counted = torch.rand(n, generator=gen) > 0.3
    for w_y in (None, torch.where(counted, torch.rand(n, generator=gen, dtype=torch.float64) + 0.5, 0.0)):
        for reduction in ("mean", "sum"):
            for eps, lam in ((0.0, 0.0), (0.3, 0.0), (0.0, 0.2), (1.0, 0.5)):
                parts = torch.randn(n, 3, generator=gen, dtype=torch.float64).requires_grad_()
                kw = dict(num_classes=C, reduction=reduction, label_smoothing=eps, lse_square_scale=lam)
                loss = combine_cross_entropy(*parts.unbind(1), counted, w_y, **kw)
                (want,) = torch.autograd.grad(loss, parts)
                coef = cross_entropy_part_grads(counted, w_y, dtype=torch.float64, **kw)
                got = coef * torch.stack([torch.ones(n), torch.ones(n), parts[:, 2].detach()], 1)
                torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-15)


def test_schedules_agree(device):
    """The loss and gradients formed in the forward (mean / sum) equal the recomputing schedule's (taken here
    through return_lse=True, whose lse gets no gradient), also when backward runs twice (retain_graph)."""
    h, W, b, t = problem(device, torch.float64, lead=(40,))
    for reduction in ("mean", "sum"):
        kw = dict(reduction=reduction, label_smoothing=0.1, lse_square_scale=0.02, chunk_size=6)
        leaves = [x.clone().requires_grad_() for x in (h, W, b)]
        loss = fastloss.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2], **kw)
        g1 = torch.autograd.grad(2.5 * loss, leaves, retain_graph=True)
        g2 = torch.autograd.grad(2.5 * loss, leaves)
        leaves_r = [x.clone().requires_grad_() for x in (h, W, b)]
        loss_r, _ = fastloss.linear_cross_entropy(leaves_r[0], leaves_r[1], t, linear_bias=leaves_r[2],
                                                  return_lse=True, **kw)
        g_r = torch.autograd.grad(2.5 * loss_r, leaves_r)
        torch.testing.assert_close(loss, loss_r, rtol=1e-13, atol=1e-14)
        assert_all_close(g1, g_r, rtol=1e-12, atol=1e-13)
        assert_all_close(g2, g_r, rtol=1e-12, atol=1e-13)
        # only some inputs wanting a gradient
        hh = h.clone().requires_grad_()
        (gh,) = torch.autograd.grad(fastloss.linear_cross_entropy(hh, W, t, linear_bias=b, **kw), hh)
        torch.testing.assert_close(gh, g_r[0] / 2.5, rtol=1e-12, atol=1e-13)


def test_no_grad_and_shapes(device):
    h, W, b, t = problem(device, torch.float32, lead=(2, 3, 5))
    with torch.no_grad():
        got = fastloss.linear_cross_entropy(h, W, t, linear_bias=b, reduction="none")
    assert got.shape == t.shape  # (torch's takes 1-D or 2-D input only)
    want = torch_linear_ce(h.reshape(-1, h.shape[-1]), W, t.reshape(-1), linear_bias=b, reduction="none")
    torch.testing.assert_close(got, want.view(t.shape))
    # N = 0, and an all-ignored batch (mean: NaN, as torch)
    h0, t0 = h[:0].reshape(0, h.shape[-1]), t[:0].reshape(0)
    for red in REDUCTIONS:
        torch.testing.assert_close(fastloss.linear_cross_entropy(h0, W, t0, reduction=red),
                                   torch_linear_ce(h0, W, t0, reduction=red), equal_nan=True)
    h, t = h.reshape(-1, h.shape[-1]), t.reshape(-1)
    t_ign = torch.full_like(t, -100)
    hg = h.clone().requires_grad_()
    loss = fastloss.linear_cross_entropy(hg, W, t_ign)
    assert loss.isnan()
    (g,) = torch.autograd.grad(loss, hg)
    hr = h.clone().requires_grad_()
    (gr,) = torch.autograd.grad(torch_linear_ce(hr, W, t_ign), hr)
    torch.testing.assert_close(g, gr, equal_nan=True)


def test_gradcheck_float64(device):
    h, W, b, t = problem(device, torch.float64, lead=(5,), d=3, C=6)
    for kw in ({"reduction": "mean", "label_smoothing": 0.2, "lse_square_scale": 0.1},
               {"reduction": "none", "softcap": 2.0}, {"reduction": "sum", "return_lse": True}):
        def f(a, w, c, kw=kw):
            out = fastloss.linear_cross_entropy(a, w, t, linear_bias=c, chunk_size=2, **kw)
            return out if not isinstance(out, tuple) else out[0].sum() + out[1].square().sum()
        assert torch.autograd.gradcheck(f, tuple(x.clone().requires_grad_() for x in (h, W, b)))


def test_double_backward_raises(device):
    h, W, b, t = problem(device, torch.float64)
    hh = h.clone().requires_grad_()
    (g,) = torch.autograd.grad(fastloss.linear_cross_entropy(hh, W, t), hh, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives are not supported"):
        torch.autograd.grad(g.sum(), hh)


def test_module_matches_torch(device):
    torch.manual_seed(0)
    ours = fastloss.nn.LinearCrossEntropyLoss(12, 37, bias=True, label_smoothing=0.1, device=device)
    if hasattr(torch.nn, "LinearCrossEntropyLoss"):  # torch 2.12+
        theirs = torch.nn.LinearCrossEntropyLoss(12, 37, bias=True, label_smoothing=0.1, device=device)
        linear = theirs.linear
    else:
        linear = torch.nn.Linear(12, 37, device=device)
        theirs = lambda x, y: F.cross_entropy(linear(x), y, label_smoothing=0.1)  # noqa: E731
    linear.load_state_dict(ours.linear.state_dict())
    h, _, _, t = problem(device, torch.float32)
    a, b = ours(h, t), theirs(h, t)
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    torch.testing.assert_close(ours.linear.weight.grad, linear.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.linear.bias.grad, linear.bias.grad, rtol=1e-4, atol=1e-6)


def test_autocast_casts_fp32_operands():
    h, W, b, t = problem("cpu", torch.float32)
    Wp = W.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fastloss.linear_cross_entropy(h, Wp, t, linear_bias=b)
    want = fastloss.linear_cross_entropy(h.bfloat16(), W.bfloat16(), t, linear_bias=b.bfloat16())
    assert loss.dtype == torch.bfloat16
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert Wp.grad.dtype == torch.float32


@pytest.mark.parametrize("schedule", ["grads_in_forward", "recompute_prob"])
def test_compile_fullgraph(device, schedule):
    torch._dynamo.reset()
    h, W, b, t = problem(device, torch.float32, lead=(4, 6))
    lin = torch.nn.Linear(12, 37).to(device)
    if schedule == "recompute_prob":  # soft targets, reduction="none" and a gradient through the returned lse
        gen = torch.Generator().manual_seed(3)
        t = torch.softmax(torch.randn(4, 6, 37, generator=gen), -1).to(device)

    def step(x, y):
        if schedule == "grads_in_forward":
            return fastloss.linear_cross_entropy(torch.tanh(x), lin.weight, y, linear_bias=lin.bias,
                                                 label_smoothing=0.1, chunk_size=8)
        loss, lse = fastloss.linear_cross_entropy(torch.tanh(x), lin.weight, y, linear_bias=lin.bias,
                                                  reduction="none", return_lse=True, chunk_size=8)
        return loss.sum() + 0.1 * lse.square().sum()

    eager = step(h, t)
    eager.backward()
    g_eager = [p.grad.clone() for p in lin.parameters()]
    lin.zero_grad()
    out = torch.compile(step, fullgraph=True)(h, t)
    out.backward()
    torch.testing.assert_close(out, eager)
    assert_all_close([p.grad for p in lin.parameters()], g_eager)


def test_deterministic(device):
    h, W, b, t = problem(device, torch.bfloat16, lead=(64,), d=32, C=500)
    outs = [run(fastloss.linear_cross_entropy, h, W, b, t, chunk_size=16) for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip((outs[0][0], *outs[0][1]), (outs[1][0], *outs[1][1]), strict=True))


def test_default_chunk_rows():
    assert default_chunk_rows(16384, 128256, 4096) == 512  # Liger's rule: 16384 / ceil(128256 / 4096)
    assert default_chunk_rows(8192, 50000, 256) == 512  # at least 2^24 logits: 2^24 / 50000 = 335.5 -> 512
    assert default_chunk_rows(2048, 1 << 25, 512) == 1


@pytest.mark.parametrize("fn", [fastloss.linear_cross_entropy, reference.linear_cross_entropy])
@pytest.mark.parametrize(
    "make,kw,exc,msg",
    [
        (lambda h, W, t: (h[:, :5], W, t), {}, ValueError, "input has width 5 but linear_weight rows have width 6"),
        (lambda h, W, t: (h, W[0], t), {}, ValueError, r"linear_weight \(classes, d\)"),
        (lambda h, W, t: (h, W.double(), t), {}, TypeError, "linear_weight has dtype"),
        (lambda h, W, t: (h, W, t[:3]), {}, ValueError, "target"),
        (lambda h, W, t: (h, W, t.float()), {}, ValueError, "probability target .* must have the shape of logits"),
        (lambda h, W, t: (h, W, torch.rand(4, 9)), {"ignore_index": 2}, ValueError, "ignore_index=2"),
        (lambda h, W, t: (h, W, torch.rand(4, 9)), {"target_margin": 0.5}, ValueError, "target_margin needs"),
        (lambda h, W, t: (h, W, t), {"linear_bias": torch.zeros(3)}, ValueError, r"linear_bias must be .* \(9,\)"),
        (lambda h, W, t: (h, W, t), {"weight": torch.ones(4)}, ValueError, r"weight must have shape \(9,\)"),
        (lambda h, W, t: (h, W, t), {"softcap": -1.0}, ValueError, "softcap must be > 0"),
        (lambda h, W, t: (h, W, t), {"reduction": "avg"}, ValueError, "reduction"),
        (lambda h, W, t: (h, W, t.to("meta")), {}, ValueError, "target is on meta"),
    ],
)
def test_bad_inputs(fn, make, kw, exc, msg):
    h, W, t = torch.randn(4, 6), torch.randn(9, 6), torch.randint(0, 9, (4,))
    with pytest.raises(exc, match=msg):
        fn(*make(h, W, t), **kw)


def test_bad_chunk_size():
    h, W, t = torch.randn(4, 6), torch.randn(9, 6), torch.randint(0, 9, (4,))
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            fastloss.linear_cross_entropy(h, W, t, chunk_size=bad)


@pytest.mark.host_kernels
def test_target_out_of_range_raises():
    h, W, t = torch.randn(4, 6), torch.randn(9, 6), torch.randint(0, 9, (4,))
    t[2] = 9
    for reduction in REDUCTIONS:
        with pytest.raises(IndexError, match="9"):
            fastloss.linear_cross_entropy(h.requires_grad_(), W, t, reduction=reduction)
