"""sparsemax / entmax15 and their Fenchel-Young losses against the `entmax` package (the peer), the sort-based
float64 reference, gradcheck, opcheck and torch.compile."""

import math
import os

import pytest
import torch

import fastloss
from fastloss import reference
from samples import TOL, RowSample, check_compile_fullgraph, grad_like, loss_and_grad, row_samples

try:  # the peer (scripts/setup_env.sh installs it); only the tests that compare with it need it
    import entmax
except ImportError:
    entmax = None
needs_entmax = pytest.mark.skipif(entmax is None, reason="the peer package `entmax` (pip install --no-deps entmax)")
_peer = lambda name: getattr(entmax, name) if entmax is not None else None

ACTS = {"sparsemax": (fastloss.sparsemax, reference.sparsemax, _peer("sparsemax")),
        "entmax15": (fastloss.entmax15, reference.entmax15, _peer("entmax15"))}
LOSSES = {"sparsemax_loss": (fastloss.sparsemax_loss, reference.sparsemax_loss, _peer("sparsemax_loss")),
          "entmax15_loss": (fastloss.entmax15_loss, reference.entmax15_loss, _peer("entmax15_loss"))}
ops = torch.ops.fastloss


def _act_and_grad(fn, x, dim=-1, seed=0):
    x = x.detach().clone().requires_grad_()
    p = fn(x, dim=dim)
    if x.numel() == 0:
        return p.detach(), torch.zeros_like(x)
    (g,) = torch.autograd.grad(p, x, grad_like(p, seed))
    return p.detach(), g


def _rows_of(s: RowSample):
    """The sample as 2-D rows with every target counted (the peer has no ignore_index < 0)."""
    C = s.logits.shape[-1]
    return s.logits.reshape(-1, C), torch.where(s.target == -100, 0, s.target).reshape(-1)


# ------------------------------------------------------------------------------------------------ peer: entmax


@needs_entmax
@pytest.mark.parametrize("name", list(ACTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_activation_matches_entmax_package(device, name, dtype):
    ours, _, peer = ACTS[name]
    rtol, atol = TOL[dtype]
    for s in row_samples(device, dtype, big=True):
        x = s.logits.reshape(-1, s.logits.shape[-1])
        p, g = _act_and_grad(ours, x)
        pp, gp = _act_and_grad(lambda z, dim: peer(z, dim=dim), x)
        assert p.dtype == dtype and p.shape == x.shape
        torch.testing.assert_close(p, pp, rtol=rtol, atol=atol, msg=lambda m, s=s: f"{s.name}: {m}")
        torch.testing.assert_close(g, gp, rtol=rtol, atol=atol * 10, msg=lambda m, s=s: f"{s.name}: {m}")


@needs_entmax
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_matches_entmax_package(device, name, dtype):
    ours, _, peer = LOSSES[name]
    rtol, atol = TOL[dtype]
    for s in row_samples(device, dtype, big=True):
        x, t = _rows_of(s)
        x = x.detach().clone().requires_grad_()
        xp = x.detach().clone().requires_grad_()
        loss = ours(x, t, reduction="none")
        lp = peer(xp, t)
        torch.testing.assert_close(loss, lp, rtol=rtol, atol=atol * 10, msg=lambda m, s=s: f"{s.name}: {m}")
        if x.numel():
            up = grad_like(loss)
            (g,) = torch.autograd.grad(loss, x, up)
            (gp,) = torch.autograd.grad(lp, xp, up)
            torch.testing.assert_close(g, gp, rtol=rtol, atol=atol, msg=lambda m, s=s: f"{s.name}: {m}")


@needs_entmax
@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_module_matches_entmax_module(device, name):
    """ignore_index >= 0 and the mean reduction, the only ones the peer's modules have."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 37, generator=gen).to(device) * 2
    t = torch.randint(0, 37, (16,), generator=gen).to(device)
    t[::3] = 4
    peer = {"sparsemax_loss": entmax.SparsemaxLoss, "entmax15_loss": entmax.Entmax15Loss}[name](ignore_index=4)
    ours = {"sparsemax_loss": fastloss.nn.SparsemaxLoss, "entmax15_loss": fastloss.nn.Entmax15Loss}[name](
        ignore_index=4, reduction="elementwise_mean")
    torch.testing.assert_close(ours(x, t), peer(x, t))


# ----------------------------------------------------------------------------------------- float64 reference


@pytest.mark.parametrize("name", list(ACTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_activation_matches_reference(device, name, dtype, dim):
    ours, ref, _ = ACTS[name]
    rtol, atol = TOL[dtype]
    for s in row_samples(device, dtype):
        if s.logits.dim() <= dim or s.logits.shape[dim] == 0:
            continue
        p, g = _act_and_grad(ours, s.logits, dim)
        pr, gr = _act_and_grad(ref, s.logits, dim)
        torch.testing.assert_close(p, pr, rtol=rtol, atol=atol, msg=lambda m, s=s: f"{s.name}: {m}")
        torch.testing.assert_close(g, gr, rtol=rtol, atol=atol * 10, msg=lambda m, s=s: f"{s.name}: {m}")
        if p.numel():
            torch.testing.assert_close(p.sum(dim).double(), torch.ones_like(p.sum(dim)).double(), rtol=0,
                                       atol=1e-5 if dtype == torch.float32 else 1e-12)
            assert (p >= 0).all()


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_matches_reference(device, name, dtype, reduction):
    ours, ref, _ = LOSSES[name]
    rtol, atol = TOL[dtype]
    for s in row_samples(device, dtype):
        loss, grad = loss_and_grad(ours, s, reduction=reduction)
        ref_loss, ref_grad = loss_and_grad(ref, s, reduction=reduction)
        assert loss.dtype == dtype and loss.shape == ref_loss.shape
        torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol * 10, equal_nan=True)
        torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=atol * 10, equal_nan=True)


def _hard_rows(C=4099):
    i = torch.arange(C, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    return {
        "equal": torch.zeros(C, dtype=torch.float64),
        "tiny_spread": torch.randn(C, generator=gen, dtype=torch.float64) * 1e-3,
        "linspace": i / C,
        "geometric": 0.5 ** i,
        "slow_geometric": -(0.999 ** i),
        "pow4": (i / C) ** 4,
        "huge_offset": 1e4 + torch.randn(C, generator=gen, dtype=torch.float64),
        "wide": torch.randn(C, generator=gen, dtype=torch.float64) * 1e3,
        "ties_at_top": torch.cat([torch.full((7,), 2.0, dtype=torch.float64), torch.zeros(C - 7, dtype=torch.float64)]),
    }


@pytest.mark.parametrize("name", list(ACTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hard_rows(device, name, dtype):
    """Rows that need many Newton passes or stress rounding, against the float64 sort-based reference."""
    ours, ref, _ = ACTS[name]
    for key, row in _hard_rows().items():
        x = row[None].to(device=device, dtype=dtype)
        p = ours(x)
        pr = ref(x.double())
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(p.double(), pr, rtol=0, atol=tol, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("name", list(ACTS) + list(LOSSES))
def test_sorted_fallback(device, name, monkeypatch):
    """When the Newton passes run out (forced to one here) the CPU finishes exactly with a sort of the
    candidates; values must not change."""
    if device != "cpu":
        pytest.skip("the sort fallback is CPU-only")
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(12, 301, generator=gen, dtype=torch.float64) * torch.tensor([0.01, 1.0, 30.0]).repeat(4)[:, None]
    t = torch.randint(0, 301, (12,), generator=gen)
    fn = {**ACTS, **LOSSES}[name][0]
    call = (lambda: fn(x, t, reduction="none")) if name in LOSSES else (lambda: fn(x))
    want = call()
    monkeypatch.setenv("FASTLOSS_SPARSEMAX_MAX_ITER", "1")
    got = call()
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)


# ------------------------------------------------------------------------------------------------ masking


def _masked(device, dtype):
    x = torch.randn(4, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device, dtype)
    x[0, ::2] = float("-inf")  # masked lanes next to finite ones
    x[1, :] = float("-inf")  # a fully masked row
    x[2, 1:] = float("-inf")  # one finite lane left
    return x


@pytest.mark.parametrize("name", list(ACTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_activation_masked_lanes(device, name, dtype):
    ours, ref, peer = ACTS[name]
    x = _masked(device, dtype)
    p, g = _act_and_grad(ours, x)
    assert not p.isnan().any() and not g.isnan().any()
    assert (p[0, ::2] == 0).all() and (p[1] == 0).all() and p[2, 0] == 1 and (g[1] == 0).all()
    pr, gr = _act_and_grad(ref, x)
    torch.testing.assert_close(p, pr)
    torch.testing.assert_close(g, gr)
    if peer is None:
        return
    # The peer agrees where some lane is finite and fails on the fully masked row (entmax issue #19).
    torch.testing.assert_close(p[[0, 2, 3]].cpu(), peer(x[[0, 2, 3]].cpu()))
    try:
        assert peer(x[1:2].cpu()).isnan().all()
    except RuntimeError as exc:
        assert "out of bounds" in str(exc)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_masked_lanes(device, name, dtype):
    """-inf lanes: finite loss when the target is finite, +inf when it is masked, never NaN (the peer gives
    NaN as soon as a row has a -inf lane: 0 * -inf in <p, z>)."""
    ours, ref, peer = LOSSES[name]
    x = _masked(device, dtype)
    t = torch.tensor([1, 3, 0, 5], device=device)  # row 0: target finite; row 1: all masked
    x = x.detach().requires_grad_()
    loss = ours(x, t, reduction="none")
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert torch.isfinite(loss[[0, 2, 3]]).all() and loss[1] == float("inf")
    assert not g.isnan().any()
    xr = x.detach().clone().requires_grad_()
    lr = ref(xr, t, reduction="none")
    (gr,) = torch.autograd.grad(lr.sum(), xr)
    torch.testing.assert_close(loss, lr)
    torch.testing.assert_close(g, gr)
    t2 = torch.tensor([2, 3, 0, 5], device=device)  # row 0: target masked
    l2 = ours(x.detach(), t2, reduction="none")
    assert l2[0] == float("inf") and not l2.isnan().any()
    if peer is not None:
        assert peer(x.detach()[[0]].cpu(), t[[0]].cpu()).isnan().all()  # 0 * -inf in the peer's <p, z>
    # An ignored fully masked row contributes nothing.
    t3 = torch.tensor([1, -100, 0, 5], device=device)
    assert torch.isfinite(ours(x.detach(), t3))


@pytest.mark.parametrize("name", list(ACTS))
def test_nan_row_stays_nan(device, name):
    x = torch.randn(3, 11, device=device)
    x[1, 4] = float("nan")
    p = ACTS[name][0](x)
    assert p[1].isnan().all() and not p[[0, 2]].isnan().any()


# ----------------------------------------------------------------------------------------- ignore / targets


@pytest.mark.parametrize("name", list(LOSSES))
def test_ignore_index_and_empty_mean(device, name):
    ours = LOSSES[name][0]
    x = torch.randn(5, 13, device=device, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([3, -1, 12, -1, 0], device=device)
    loss = ours(x, t, ignore_index=-1, reduction="none")
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert (loss[[1, 3]] == 0).all() and (g[[1, 3]] == 0).all() and (loss[[0, 2, 4]] > 0).all()
    mean = ours(x, t, ignore_index=-1)
    torch.testing.assert_close(mean, loss.sum() / 3)
    assert math.isnan(ours(x, torch.full((5,), 7, device=device), ignore_index=7).item())


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradient_is_p_minus_onehot(device, name):
    ours = LOSSES[name][0]
    act = ACTS[name.removesuffix("_loss")][0]
    x = torch.randn(6, 50, device=device, dtype=torch.float64, requires_grad=True) * 2
    t = torch.randint(0, 50, (6,), device=device)
    (g,) = torch.autograd.grad(ours(x, t, reduction="sum"), x)
    torch.testing.assert_close(g, act(x.detach()) - torch.nn.functional.one_hot(t, 50).double())


@pytest.mark.host_kernels
def test_target_out_of_range_cpu():
    x = torch.randn(3, 5)
    for fn in (fastloss.sparsemax_loss, fastloss.entmax15_loss):
        with pytest.raises(IndexError, match="out of bounds"):
            fn(x, torch.tensor([0, 5, 1]))
        with pytest.raises(IndexError, match="out of bounds"):
            ops.sparsemax_loss_fwd(x, torch.tensor([0, -3, 1]), -100, False)


# -------------------------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("name", list(ACTS) + list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(device, name, dtype):
    """Low-precision logits are read exactly and computed in fp32: compare with float64 on the same values."""
    ours, ref, _ = {**ACTS, **LOSSES}[name]
    eps = torch.finfo(dtype).eps
    for s in row_samples(device, dtype)[:4]:
        s64 = RowSample(s.name, s.logits.double(), s.target)
        if name in LOSSES:
            out, g = loss_and_grad(ours, s, reduction="none")
            want, gw = loss_and_grad(ref, s64, reduction="none")
        else:
            out, g = _act_and_grad(ours, s.logits)
            want, gw = _act_and_grad(ref, s64.logits)
        assert out.dtype == dtype and g.dtype == dtype
        torch.testing.assert_close(out.double(), want, rtol=2 * eps, atol=2e-3)
        torch.testing.assert_close(g.double(), gw, rtol=2 * eps, atol=4e-3)


# ------------------------------------------------------------------------------------- op-level contracts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(device, dtype):
    for i, s in enumerate(row_samples(device, dtype)):
        C = s.logits.shape[-1]
        x = s.logits.reshape(-1, C)
        x = x if x.stride(-1) == 1 else x.contiguous()
        t = s.target.reshape(-1)
        for e15 in (False, True) if i < 2 else (bool(i % 2),):  # both kinds on the small samples, then alternate
            torch.library.opcheck(ops.sparsemax_fwd.default, (x.detach().requires_grad_(), e15))
            p = ops.sparsemax_fwd(x.detach(), e15)
            torch.library.opcheck(ops.sparsemax_bwd.default, (torch.randn_like(p), p, e15))
            torch.library.opcheck(ops.sparsemax_loss_fwd.default, (x.detach().requires_grad_(), t, -100, e15))
            loss, stats = ops.sparsemax_loss_fwd(x.detach(), t, -100, e15)
            torch.library.opcheck(ops.sparsemax_loss_bwd.default, (torch.rand_like(loss), x.detach(), t, stats,
                                                                   -100, e15))


GRADCHECK = {
    "sparsemax": lambda x, t: fastloss.sparsemax(x),
    "entmax15": lambda x, t: fastloss.entmax15(x),
    "sparsemax_dim1": lambda x, t: fastloss.sparsemax(x, dim=1),
    "entmax15_dim0": lambda x, t: fastloss.entmax15(x, dim=0),
    "sparsemax_loss": lambda x, t: fastloss.sparsemax_loss(x, t),
    "entmax15_loss_none": lambda x, t: fastloss.entmax15_loss(x, t, reduction="none"),
    "entmax15_loss_sum": lambda x, t: fastloss.entmax15_loss(x, t, reduction="sum"),
}


@pytest.mark.parametrize("name", list(GRADCHECK))
def test_gradcheck_float64(device, name):
    gen = torch.Generator().manual_seed(21)
    # Spread, jittered logits keep every lane away from the support boundary (where the maps have a kink).
    x = torch.randperm(42, generator=gen).double() / 7 + 0.05 * torch.rand(42, generator=gen, dtype=torch.float64)
    x = x.reshape(2, 3, 7).to(device).requires_grad_()
    t = torch.randint(0, 7, (2, 3), generator=gen).to(device)
    t[0, 1] = -100
    fn = GRADCHECK[name]
    assert torch.autograd.gradcheck(lambda z: fn(z, t), (x,), eps=1e-6, atol=1e-7, rtol=1e-6)


COMPILE = {
    "sparsemax_loss": lambda z, t: fastloss.sparsemax_loss(z, t),
    "entmax15_loss": lambda z, t: fastloss.entmax15_loss(z, t, reduction="sum"),
    "sparsemax_attention": lambda z, t: (fastloss.sparsemax(z, dim=1) * z.detach().cos()).sum(),
    "entmax15_attention": lambda z, t: (fastloss.entmax15(z) * z.detach().sin()).sum(),
}


@pytest.mark.parametrize("name", list(COMPILE))
def test_compile_fullgraph(device, name):
    check_compile_fullgraph(COMPILE[name], device)


# -------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fn", [fastloss.sparsemax, fastloss.entmax15, reference.sparsemax, reference.entmax15])
@pytest.mark.parametrize(
    "make,kw,exc,msg",
    [
        (lambda x: x.tolist(), {}, TypeError, "logits must be a torch.Tensor"),
        (lambda x: x.long(), {}, TypeError, "logits must be float"),
        (lambda x: x, {"dim": 2}, IndexError, "dim 2 is out of range"),
        (lambda x: x, {"dim": -3}, IndexError, "dim -3 is out of range"),
        (lambda x: x, {"dim": 1.0}, TypeError, "dim must be an int"),
        (lambda x: x[:, :0], {}, ValueError, "at least one class"),
        (lambda x: x[0, 0], {}, ValueError, "at least one dimension"),
    ],
)
def test_activation_bad_inputs(fn, make, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        fn(make(torch.randn(4, 5)), **kw)


@pytest.mark.parametrize("fn", [fastloss.sparsemax_loss, fastloss.entmax15_loss, reference.sparsemax_loss,
                                reference.entmax15_loss])
@pytest.mark.parametrize(
    "make,kw,exc,msg",
    [
        (lambda x, t: (x[0], t[0]), {}, ValueError, "logits must have shape"),
        (lambda x, t: (x, t[:3]), {}, ValueError, "target must have shape"),
        (lambda x, t: (x, t.float()), {}, TypeError, "target must hold integer"),
        (lambda x, t: (x.long(), t), {}, TypeError, "logits must be float"),
        (lambda x, t: (x[:, :0], t), {}, ValueError, "at least one class"),
        (lambda x, t: (x, t), {"reduction": "elementwise_mean"}, ValueError, "reduction must be"),
        (lambda x, t: (x, t), {"ignore_index": None}, TypeError, "ignore_index"),
    ],
)
def test_loss_bad_inputs(fn, make, kw, exc, msg):
    x, t = make(torch.randn(4, 5), torch.randint(0, 5, (4,)))
    with pytest.raises(exc, match=msg):
        fn(x, t, **kw)


def test_op_level_checks():
    x = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        ops.sparsemax_fwd(x[0], False)
    with pytest.raises(RuntimeError, match="float32, float64"):
        ops.sparsemax_fwd(x.long(), True)
    with pytest.raises(RuntimeError, match="grad has shape"):
        ops.sparsemax_bwd(x[:2], x, True)
    with pytest.raises(RuntimeError, match="stats has shape"):
        ops.sparsemax_loss_bwd(torch.ones(4), x, torch.zeros(4, dtype=torch.long), torch.zeros(4, 3), -100, False)


# -------------------------------------------------------------------------------------------------- modules


def test_modules_and_determinism(device):
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(32, 2049, generator=gen).to(device)
    t = torch.randint(0, 2049, (32,), generator=gen).to(device)
    torch.testing.assert_close(fastloss.nn.Sparsemax(dim=0)(x), fastloss.sparsemax(x, dim=0))
    torch.testing.assert_close(fastloss.nn.Entmax15()(x), fastloss.entmax15(x))
    torch.testing.assert_close(fastloss.nn.Entmax15Loss(reduction="sum")(x, t), fastloss.entmax15_loss(
        x, t, reduction="sum"))
    runs = []
    for _ in range(2):
        xi = x.clone().requires_grad_()
        loss = fastloss.entmax15_loss(xi, t, reduction="none")
        (g,) = torch.autograd.grad(loss, xi, grad_like(loss))
        runs.append((loss, g, fastloss.sparsemax(x)))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_env_knob_is_not_left_set():
    assert "FASTLOSS_SPARSEMAX_MAX_ITER" not in os.environ


# ------------------------------------------------------------------------------------------ Hypothesis properties

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @st.composite
    def _rows(draw):
        n, C = draw(st.integers(1, 5)), draw(st.integers(1, 600))
        scale = draw(st.sampled_from([1e-4, 1e-2, 1.0, 30.0, 1e4]))
        offset = draw(st.sampled_from([0.0, -50.0, 1e3]))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        x = torch.randn(n, C, generator=gen) * scale + offset
        t = torch.randint(0, C, (n,), generator=gen)
        mask = torch.rand(n, C, generator=gen) < draw(st.floats(0.0, 0.9))
        mask[torch.arange(n), t] = False  # -inf anywhere but on the target
        return x.masked_fill(mask, float("-inf")), t

    @settings(max_examples=40, deadline=None)
    @given(_rows(), st.sampled_from(list(LOSSES)))
    def test_properties(xt, name):
        """Random shapes, scales up to 1e4, offsets, -inf lanes: float32 kernels against the float64 reference
        on the same values; p is a distribution; masked lanes get no gradient; nothing is NaN."""
        x, t = xt
        ours, ref, _ = LOSSES[name]
        act = ACTS[name.removesuffix("_loss")][0]
        up = torch.linspace(0.5, 1.5, x.shape[0])
        xl = x.clone().requires_grad_()
        loss = ours(xl, t, reduction="none")
        (g,) = torch.autograd.grad(loss, xl, up)
        xr = x.double().requires_grad_()
        ref_loss = ref(xr, t, reduction="none")
        (ref_g,) = torch.autograd.grad(ref_loss, xr, up.double())
        assert torch.isfinite(loss).all() and torch.isfinite(g).all() and (loss >= -1e-6 * x.abs().max()).all()
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g.double(), ref_g, rtol=1e-5, atol=1e-5)
        p = act(x)
        assert (p >= 0).all() and (p.double().sum(-1) - 1).abs().max() < 1e-5
        assert (g[torch.isinf(x)] == 0).all() and (p[torch.isinf(x)] == 0).all()
