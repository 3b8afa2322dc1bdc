"""fastloss.linear_spherical_loss (the Gram form) against the materialised float64 reference."""

import os
import sys

import pytest
import torch

import fastloss
from fastloss import reference

LOSSES = ["zloss", "spherical_softmax", "taylor_softmax", "mse"]
OPTS = {"zloss": {"a": 1.3, "b": 0.2}, "spherical_softmax": {"eps": 1e-3}, "taylor_softmax": {}, "mse": {}}


def _problem(device, dtype, N=40, d=12, V=97, mean_shift=0.0, cond=None, seed=0, lead=None):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(V, d, generator=gen, dtype=torch.float64) / d**0.5
    if cond is not None:  # ill-conditioned: singular values spread over `cond`
        U, _, Vh = torch.linalg.svd(W, full_matrices=False)
        W = U @ torch.diag(torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), d, dtype=torch.float64)) @ Vh
    W = W + mean_shift * torch.randn(d, generator=gen, dtype=torch.float64) / d**0.5  # shared mean direction
    h = torch.randn(N, d, generator=gen, dtype=torch.float64)
    bias = torch.randn(V, generator=gen, dtype=torch.float64) * 0.3
    t = torch.randint(0, V, (N,), generator=gen)
    t[::7] = -100
    if lead is not None:
        h, t = h.reshape(*lead, d), t.reshape(lead)
    cast = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    return cast(h), cast(W), cast(bias), t.to(device)


def _run(fn, h, W, t, bias, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (h, W) + ((bias,) if bias is not None else ())]
    out = fn(leaves[0], leaves[1], t, bias=leaves[2] if bias is not None else None, **kw)
    up = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    grads = torch.autograd.grad(out, leaves, up)
    return out.detach(), grads


def _close(got, want, rtol):
    """Relative error against the size of the reference tensor (elementwise near-zeros are not meaningful)."""
    got, want = got.double(), want.double()
    scale = want.abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1e-30))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float64_matches_materialised(device, loss, with_bias, reduction):
    h, W, bias, t = _problem(device, torch.float64, lead=(5, 8))
    bias = bias if with_bias else None
    got, gg = _run(fastloss.linear_spherical_loss, h, W, t, bias, loss=loss, reduction=reduction, **OPTS[loss])
    want, gw = _run(reference.linear_spherical_loss, h, W, t, bias, loss=loss, reduction=reduction, **OPTS[loss])
    assert got.shape == want.shape
    _close(got, want, 1e-10)
    for x, y in zip(gg, gw, strict=False):
        _close(x, y, 1e-10)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case", ["plain", "mean_3", "large_mean", "huge_mean", "orthogonal_mean", "bias_mean",
                                  "ill_conditioned"])
def test_float32_precision(device, loss, case):
    """fp32 inputs: loss and gradients within 1e-5 relative of the float64 materialised reference, also when W
    has a large shared mean direction or is ill-conditioned. The large means need: the centred Gram; the target
    outputs o_c not taken as mu + (o_c - mu) (the spherical softmax's 1/(o_c² + ε) got the mean's rounding:
    1.3e-5 at mean_3); and, at huge_mean (the logits' mean ~200 times their spread), the fp32 mean's last bit
    (h·δ in mu and o_c - mu, B·δ in the hidden gradient) and the targets' share of dL/dh taken about the mean
    with its coefficient in closed form (before: hidden gradients 2e-5 to 6e-5 off). orthogonal_mean: hidden rows
    nearly orthogonal to a weight mean ~300 times the rows' spread, so μ = h·m is small beside its terms |h||m|
    (accumulated in double; in fp32 the spherical and Taylor hidden gradients were 2e-5 off). bias_mean: a bias
    mean 1e4 times its spread (its last bit restored too; the weight and bias gradients were 3e-5 off)."""
    kw = {"plain": {}, "mean_3": {"mean_shift": 3.0}, "large_mean": {"mean_shift": 30.0},
          "huge_mean": {"mean_shift": 100.0}, "orthogonal_mean": {"mean_shift": 300.0},
          "ill_conditioned": {"cond": 1e4}}.get(case, {})
    h, W, bias, t = _problem(device, torch.float64, N=64, d=16, V=301, **kw)
    if case == "orthogonal_mean":
        m = W.mean(0) / W.mean(0).norm()
        h = h - (h @ m)[:, None] * m + 0.01 * m  # h·m ~ 0.01 |m|: the logits' mean near the bias mean
    if case == "bias_mean":
        bias = bias + 3000.0
    h, W, bias = h.float(), W.float(), bias.float()
    t = torch.stack([t, t.flip(0)], 1)  # two targets per row (several targets feed B_m)
    got, gg = _run(fastloss.linear_spherical_loss, h, W, t, bias, loss=loss, reduction="none", **OPTS[loss])
    want, gw = _run(reference.linear_spherical_loss, h.double(), W.double(), t, bias.double(), loss=loss,
                    reduction="none", **OPTS[loss])
    _close(got, want, 1e-5)
    for x, y in zip(gg, gw, strict=False):
        _close(x, y, 1e-5)
    if case in ("orthogonal_mean", "bias_mean"):  # and no worse than fp32 logits formed by F.linear
        mat, gm = _run(lambda x, w, tt, bias: _MATERIALISED[loss](torch.nn.functional.linear(x, w, bias), tt,
                                                                  reduction="none", **OPTS[loss]), h, W, t, bias)
        rel = lambda a, b: ((a.double() - b).abs().max() / b.abs().max()).item()  # noqa: E731
        for x, y, z in zip((got, *gg), (want, *gw), (mat, *gm), strict=True):
            assert rel(x, y) <= 2 * rel(z, y) + 1e-6


_MATERIALISED = {"zloss": fastloss.zloss, "spherical_softmax": fastloss.spherical_softmax_loss,
                 "taylor_softmax": fastloss.taylor_softmax_loss, "mse": fastloss.spherical_mse_loss}


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(device, loss, dtype):
    """bf16/fp16 inputs: products and statistics in fp32, so the result is the fp64 one on the rounded inputs."""
    h, W, bias, t = _problem(device, dtype, N=32, d=16, V=200)
    got, gg = _run(fastloss.linear_spherical_loss, h, W, t, bias, loss=loss, reduction="none", **OPTS[loss])
    want, gw = _run(reference.linear_spherical_loss, h.double(), W.double(), t, bias.double(), loss=loss,
                    reduction="none", **OPTS[loss])
    assert got.dtype == dtype and all(g.dtype == dtype for g in gg)
    eps = torch.finfo(dtype).eps
    _close(got, want, 2 * eps)
    for x, y in zip(gg, gw, strict=False):
        _close(x, y, 2 * eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_split_bf16_op(device, dtype):
    """spherical_split_bf16 gives exactly torch's round-to-nearest-even bf16 of v = (x - shift) * scale and of the
    residual, for every x dtype, with and without shift / scale, including ties, NaN, ±inf and subnormals."""
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(37, 19, generator=gen) * 3).to(dtype)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, 1.00390625, 1.01171875])
    x[0, :8] = special.to(dtype)
    shift = torch.randn(19, generator=gen)
    scale = torch.rand(37, generator=gen) + 0.5
    x, shift, scale = x.to(device), shift.to(device), scale.to(device)
    for sh, sc in ((None, None), (shift, None), (None, scale), (shift, scale)):
        v = x.float()
        v = v - sh if sh is not None else v
        v = v * sc[:, None] if sc is not None else v
        hi, lo = torch.ops.fastloss.spherical_split_bf16(x, sh, sc)
        assert hi.dtype == lo.dtype == torch.bfloat16 and hi.shape == x.shape
        want_hi = v.to(torch.bfloat16)
        want_lo = (v - want_hi.float()).to(torch.bfloat16)
        torch.testing.assert_close(hi, want_hi, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(lo, want_lo, rtol=0, atol=0, equal_nan=True)
        finite = torch.isfinite(v)
        err = (hi.double() + lo.double() - v.double())[finite].abs()
        assert (err <= 2.0**-16 * v.double()[finite].abs() + 1e-39).all()  # + the bf16 subnormal step
    torch.library.opcheck(torch.ops.fastloss.spherical_split_bf16.default, (x[1:], shift, scale[1:]))  # no NaN
    with pytest.raises(RuntimeError, match="col_shift must have shape"):
        torch.ops.fastloss.spherical_split_bf16(x, shift[:3], None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
def test_weight_grad_op(device, dtype, acc):
    """spherical_weight_grad: gw + row on every row + 2 bias vᵀ, computed in the accumulation dtype and rounded
    once into `dtype` (the rank-one terms of the Gram form's weight gradient, fused into its final cast)."""
    gen = torch.Generator().manual_seed(12)
    R, d = 53, 37
    gw, row, v = (torch.randn(*shape, generator=gen, dtype=acc).to(device) for shape in ((R, d), (d,), (d,)))
    bias = torch.randn(R, generator=gen).to(device, dtype)
    for b in (None, bias):
        out = torch.ops.fastloss.spherical_weight_grad(gw, row, b, v, dtype)
        rank_one = 2 * b.double()[:, None] * v.double() if b is not None else torch.zeros(())
        want = gw.double() + row.double() + rank_one
        assert out.dtype == dtype and out.shape == (R, d)
        # the sum's two roundings in `acc` (one may be fused into an FMA, as nvcc does: their error is relative
        # to the terms, not to a sum that cancels), then one rounding into `dtype`
        terms = gw.double().abs() + row.double().abs() + rank_one.abs()
        subnormal_step = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
        bound = torch.finfo(dtype).eps * want.abs() + 2 * torch.finfo(acc).eps * terms + subnormal_step
        assert ((out.double() - want).abs() <= bound).all()
    torch.library.opcheck(torch.ops.fastloss.spherical_weight_grad.default, (gw, row, bias, v, dtype))
    with pytest.raises(RuntimeError, match="bias must have shape"):
        torch.ops.fastloss.spherical_weight_grad(gw, row, bias[:3], v, dtype)
    with pytest.raises(RuntimeError, match="gw must be float32 or float64"):
        torch.ops.fastloss.spherical_weight_grad(gw.to(dtype) if dtype != torch.float32 else gw.half(), row, None,
                                                 v, dtype)


def test_centred_gram_residual_mean(device):
    """The fp32 centred Gram also returns (x - shift)ᵀ [1, cols] from the exactly centred rows: the residual sum
    Σ (x - shift), what the fp32 mean misses (its last bit and the column sums' rounding), and the products with
    given columns (the centred bias; Wᵀb_c - m Σ b_c would cancel), each to fp32 accuracy of its own size; the
    split and raw Grams return None (their precision is set elsewhere)."""
    from fastloss.linear_spherical import _Products

    gen = torch.Generator().manual_seed(3)
    x64 = torch.randn(5000, 8, generator=gen, dtype=torch.float64) * 1e-2 + 1000.0 * torch.randn(8, generator=gen,
                                                                                                  dtype=torch.float64)
    x = x64.float().to(device)
    shift = x.mean(0)
    cols = torch.randn(5000, 1, generator=gen).to(device)
    gram, side = _Products(False, torch.float32).centred_gram(x, shift, cols)
    want = x.double().mean(0) - shift.double()  # up to ~1e-4 (the last bits of ~1000)
    assert want.abs().max() > 0 and side.shape == (8, 2)
    torch.testing.assert_close(side[:, 0].double() / 5000, want, rtol=0, atol=1e-4 * want.abs().max().item())
    u = (x.double() - shift.double()).t() @ cols.double()[:, 0]  # ~|x - shift|·√n ≈ 0.7, beside terms ~1000
    torch.testing.assert_close(side[:, 1].double(), u, rtol=0, atol=1e-5 * u.abs().max().item())
    assert _Products(True, torch.float32).centred_gram(x.bfloat16(), shift)[1] is None
    assert _Products(False, torch.float32, centred=False).centred_gram(x, shift)[1] is None


def test_bf16_split_products(device):
    """The hi/lo split products (bf16 operands, fp32 accumulation) are fp32-accurate: ~2^-16 relative, where one
    bf16 rounding of the fp32 operand alone would cost ~2^-9."""
    from fastloss.linear_spherical import _Products

    gen = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(device)  # noqa: E731
    x = r(300, 24).to(torch.bfloat16)  # an input operand: exact in bf16
    y = r(24, 24).float()
    prod = _Products(True, torch.float32)
    _close(prod.times(x, y), x.double() @ y.double(), 2e-5)
    add = r(300, 24).float()  # a full fp32 matrix (the split path accumulates into its output)
    _close(prod.times(x, y, add), x.double() @ y.double() + add.double(), 2e-5)
    out = torch.empty(300, 24, device=device)
    assert prod.times(x, y, add, out=out).data_ptr() == out.data_ptr()
    _close(out, x.double() @ y.double() + add.double(), 2e-5)
    _close(prod.col_sums(x), x.double().sum(0), 1e-6)
    big = (r(300, 24) + 30.0).to(torch.bfloat16)  # a large shared offset, centred on its fp32 mean
    m = big.float().mean(0)
    _close(prod.centred_gram(big, m)[0], (big.double() - m.double()).t() @ (big.double() - m.double()), 2e-5)
    w = r(300).float()  # mixed-sign row weights
    _close(prod.weighted_gram(x, w), (x.double() * w.double()[:, None]).t() @ x.double(), 2e-5)
    rounded = x.double() @ y.to(torch.bfloat16).double()  # what a hi-only product would give
    assert (rounded - x.double() @ y.double()).abs().max() > 1e-4 * rounded.abs().max()


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case", ["plain", "large_mean", "ill_conditioned"])
def test_bf16_split_rows_fp32_accurate(device, loss, case):
    """bf16 inputs through the split products: the per-row losses (fp32, before the output cast) are within 1e-5
    of the float64 reference on the same bf16 inputs, also for a large shared mean or an ill-conditioned W."""
    from fastloss.linear_spherical import _LinearSpherical
    from fastloss.spherical import KINDS

    kw = {"plain": {}, "large_mean": {"mean_shift": 30.0}, "ill_conditioned": {"cond": 1e4}}[case]
    h, W, bias, t = _problem(device, torch.bfloat16, N=64, d=16, V=301, **kw)
    o = {"a": 1.0, "b": 0.0, "eps": 1e-4} | OPTS[loss]
    rows, _ = _LinearSpherical.apply(h, W, bias, t[:, None], None, KINDS[loss], o["a"], o["b"], o["eps"], -100,
                                     None, False, True)
    want = reference.linear_spherical_loss(h.double(), W.double(), t, bias=bias.double(), loss=loss,
                                           reduction="none", **OPTS[loss])
    assert rows.dtype == torch.float32
    _close(rows, want, 1e-5)


def _logit_mean_ratio(h, W, bias):
    """max over rows of (μ² + σ²) / σ² of the float64 logits: what the uncentred Gram's subtraction amplifies."""
    o = h.double() @ W.double().t() + bias.double()
    return (o.square().mean(-1) / o.var(-1, correction=0)).max().item()


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain", "mean_3", "mean_30", "ill_conditioned"])
def test_uncentred_gram(device, loss, dtype, case):
    """centred_gram=False (raw Gram minus V·m mᵀ; with the bf16 split one GEMM over W instead of two): fp32
    losses and gradients within 1e-5 of the float64 reference when the logits' mean is small against their
    spread, and within ~1e-6 times (μ² + σ²) / σ² (the cancellation of the subtraction, as documented) when not.
    bf16 goes through the split products and is judged on the fp32 per-row losses before the output cast."""
    from fastloss.linear_spherical import _LinearSpherical
    from fastloss.spherical import KINDS

    kw = {"plain": {}, "mean_3": {"mean_shift": 3.0}, "mean_30": {"mean_shift": 30.0},
          "ill_conditioned": {"cond": 1e4}}[case]
    h, W, bias, t = _problem(device, dtype, N=64, d=16, V=301, **kw)
    tol = max(1e-5, 1e-6 * _logit_mean_ratio(h, W, bias))
    want, gw = _run(reference.linear_spherical_loss, h.double(), W.double(), t, bias.double(), loss=loss,
                    reduction="none", **OPTS[loss])
    if dtype == torch.float32:
        got, gg = _run(fastloss.linear_spherical_loss, h, W, t, bias, loss=loss, reduction="none",
                       centred_gram=False, **OPTS[loss])
        for x, y in zip(gg, gw, strict=True):
            _close(x, y, tol)
    else:
        o = {"a": 1.0, "b": 0.0, "eps": 1e-4} | OPTS[loss]
        got, _ = _LinearSpherical.apply(h, W, bias, t[:, None], None, KINDS[loss], o["a"], o["b"], o["eps"], -100,
                                        None, False, True, False)
    _close(got, want, tol)


@pytest.mark.parametrize("dtype,split", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_centred_gram_default(device, dtype, split):
    """centred_gram=None (default) is the raw Gram on the bf16 split path (bf16 outputs; its cancellation stays
    below their rounding, bench/gram_accuracy.py) and the centred Gram otherwise: bit for bit the explicit
    choice, losses and gradients."""
    h, W, bias, t = _problem(device, dtype, N=24, d=16, V=200, mean_shift=3.0)
    got, gg = _run(fastloss.linear_spherical_loss, h, W, t, bias, bf16_split=split)
    want, gw = _run(fastloss.linear_spherical_loss, h, W, t, bias, bf16_split=split, centred_gram=not split)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for x, y in zip(gg, gw, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,split,centred", [(torch.float64, False, True), (torch.float64, False, False),
                                                  (torch.float32, False, True), (torch.float32, False, False),
                                                  (torch.bfloat16, True, True), (torch.bfloat16, True, False)])
@pytest.mark.parametrize("chunked", ["small", "forced"])
def test_row_chunks(device, monkeypatch, dtype, split, centred, chunked):
    """The products over W's rows (column sums, Gram, Wᵀb_c, the weight gradient) give the same losses and
    gradients whether W is taken whole (a product reading it in place) or in chunks of _CHUNK_ROWS rows,
    including a ragged last chunk; "forced" chunks even where the product would read W whole."""
    from fastloss import linear_spherical as ls

    h, W, bias, t = _problem(device, dtype, N=24, d=16, V=200, mean_shift=3.0)
    kw = {"bf16_split": split, "centred_gram": centred}
    want, gw = _run(fastloss.linear_spherical_loss, h, W, t, bias, **kw)
    monkeypatch.setattr(ls, "_CHUNK_ROWS", 7)  # 200 = 28 * 7 + 4
    if chunked == "forced":
        monkeypatch.setattr(ls._Products, "row_step", lambda self, x, copies=False: ls._CHUNK_ROWS)
    got, gg = _run(fastloss.linear_spherical_loss, h, W, t, bias, **kw)
    tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    _close(got, want, tol)
    for x, y in zip(gg, gw, strict=True):
        _close(x, y, tol)
    if dtype == torch.float64:  # and the float64 reference itself
        ref, gr = _run(reference.linear_spherical_loss, h, W, t, bias)
        _close(got, ref, 1e-10)
        for x, y in zip(gg, gr, strict=True):
            _close(x, y, 1e-10)


@pytest.mark.parametrize("loss", LOSSES)
def test_gram_accuracy_bench(device, loss):
    """bench/gram_accuracy.py (run on the GPU machine too) and the claims it measures: with a large shared logit
    mean, the raw Gram's fp32 per-row losses (bf16 inputs) stay within 4e-7 × (μ² + σ²) / σ² of float64, a few
    fp32 roundings of the cancelling subtraction (measured 2e-8 × to 1.1e-7 ×: the GEMM's fp32 summation order
    is the BLAS's, and differs between CPUs), and ten times closer than the losses of bf16-materialised
    logits, the centred Gram's
    within 1e-5 regardless; fp32 inputs keep loss and gradients within 1e-5 with the mean ~200 times the
    spread."""
    import importlib.util as iu
    from pathlib import Path

    spec = iu.spec_from_file_location("gram_accuracy", Path(__file__).parents[1] / "bench" / "gram_accuracy.py")
    bench = iu.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.measure(loss, 30.0, 32, 16, 2000, device)
    assert r["ratio"] > 1000
    assert r["centred"] < 1e-5
    assert r["raw"] < 1e-5 + 4e-7 * r["ratio"]
    assert r["raw"] < r["materialised_bf16"] / 10
    f = bench.measure_fp32(loss, 100.0, 64, 16, 301, device)  # fp32, the logits' mean ~200 times their spread
    assert f["ratio"] > 1e4
    assert max(f["gram_loss"], f["gram_grad_hidden"], f["gram_grad_weight"]) < 1e-5
    g = bench.measure_weight_grad(loss, 30.0, 64, 32, 1024, device)  # bf16 weight gradient, a large shared mean
    eps = torch.finfo(torch.bfloat16).eps
    assert g["fp32_untargeted"] < 0.25 * eps and g["bf16_untargeted"] < 0.4 * eps
    if loss == "zloss":  # the materialised bf16 logits lose the spread to the mean
        assert g["materialised_bf16_untargeted"] > 5 * g["bf16_untargeted"]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("split", [True, None])
def test_bf16_split_end_to_end(device, loss, split):
    """The public API with bf16 inputs (split forced, or the default: the split on CUDA, fp32 products on CPU):
    loss and gradients equal the float64 reference on the rounded inputs up to the bf16 output rounding, and the
    two product precisions agree."""
    h, W, bias, t = _problem(device, torch.bfloat16, N=32, d=16, V=200)
    got, gg = _run(fastloss.linear_spherical_loss, h, W, t, bias, loss=loss, bf16_split=split, **OPTS[loss])
    want, gw = _run(reference.linear_spherical_loss, h.double(), W.double(), t, bias.double(), loss=loss,
                    **OPTS[loss])
    plain, gp = _run(fastloss.linear_spherical_loss, h, W, t, bias, loss=loss, bf16_split=False, **OPTS[loss])
    eps = torch.finfo(torch.bfloat16).eps
    _close(got, want, 2 * eps)
    _close(got, plain, 2 * eps)
    for x, y, z in zip(gg, gw, gp, strict=True):
        assert x.dtype == torch.bfloat16
        _close(x, y, 2 * eps)
        _close(x, z, 2 * eps)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("shift", [0.0, 30.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_weight_grad_precision_bf16(device, loss, shift, with_bias):
    """weight_grad_precision="bf16" (split path): the loss, hidden and bias gradients are bit for bit the
    default's; the weight gradient stays within about one extra bf16 rounding of the float64 reference, also where
    a shared weight mean 30 times the rows' spread would make an uncorrected row term cancel (norm-wise on the
    rows no target names, measured 0.21 to 0.34 bf16 eps here, against 0.21 eps for the default: its output
    rounding); the module passes it on. Where the products are fp32 it changes nothing."""
    h, W, bias, t = _problem(device, torch.bfloat16, N=64, d=32, V=1024, mean_shift=shift)
    bias = bias if with_bias else None
    kw = {"loss": loss, "bf16_split": True, **OPTS[loss]}
    want, gw = _run(fastloss.linear_spherical_loss, h, W, t, bias, **kw)
    got, gg = _run(fastloss.linear_spherical_loss, h, W, t, bias, weight_grad_precision="bf16", **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for i in (0, 2) if with_bias else (0,):
        torch.testing.assert_close(gg[i], gw[i], rtol=0, atol=0)
    _, gr = _run(reference.linear_spherical_loss, h.double(), W.double(), t, None if bias is None else bias.double(),
                 loss=loss, **OPTS[loss])
    free = torch.ones(W.shape[0], dtype=torch.bool, device=device)
    free[t[t >= 0]] = False
    err = lambda x: ((x[free].double() - gr[1][free]).norm() / gr[1][free].norm()).item()  # noqa: E731
    eps = torch.finfo(torch.bfloat16).eps
    assert err(gw[1]) < 0.25 * eps  # the default: the output rounding alone (measured 0.21 eps)
    assert err(gg[1]) < 0.4 * eps  # measured 0.21 to 0.34 eps
    mod = fastloss.nn.LinearSphericalLoss(bf16_split=True, weight_grad_precision="bf16", **OPTS[loss] | {"loss": loss})
    _, gm = _run(lambda *a, **k: mod(a[0], a[1], a[2], k["bias"]), h, W, t, bias)
    torch.testing.assert_close(gm[1], gg[1], rtol=0, atol=0)
    h32, W32 = h.float(), W.float()
    _, g32 = _run(fastloss.linear_spherical_loss, h32, W32, t, None, loss=loss, **OPTS[loss])
    _, g32b = _run(fastloss.linear_spherical_loss, h32, W32, t, None, loss=loss, weight_grad_precision="bf16",
                   **OPTS[loss])
    torch.testing.assert_close(g32b[1], g32[1], rtol=0, atol=0)


@pytest.mark.parametrize("prec,formula", [("fp32", (6, 8)), ("bf16", (4, 6))])
def test_split_path_flops(device, monkeypatch, prec, formula):
    """The bf16 split path's GEMM flops for one forward and backward, counted at _mm32: 6·V·d² + 8·N·d² by
    default (raw Gram, split d×d factors) and 4·V·d² + 6·N·d² with weight_grad_precision="bf16", up to the
    matrix-vector products (O((V + N)·d))."""
    from fastloss import linear_spherical as ls

    flops = []
    mm32 = ls._mm32

    def counted(a, b, *args, **kw):
        flops.append(2 * a.shape[0] * a.shape[1] * b.shape[1])
        return mm32(a, b, *args, **kw)

    monkeypatch.setattr(ls, "_mm32", counted)
    N, d, V = 64, 32, 1024
    h, W, bias, t = _problem(device, torch.bfloat16, N=N, d=d, V=V)
    _run(fastloss.linear_spherical_loss, h, W, t, bias, bf16_split=True, weight_grad_precision=prec)
    want = formula[0] * V * d * d + formula[1] * N * d * d
    assert want <= sum(flops) <= want + 16 * (V + N) * d, (sum(flops) - want) / ((V + N) * d)


@pytest.mark.parametrize("kw", [{"loss": "zloss", "a": 1.3, "b": 0.2, "reduction": "sum"},
                                {"loss": "spherical_softmax", "eps": 1e-3, "centred_gram": False},
                                {"loss": "mse", "ignore_index": 3, "reduction": "none"}])
def test_module_equals_functional(device, kw):
    """fastloss.nn.LinearSphericalLoss(**options)(hidden, weight, target, bias, target_weight) is the functional
    call with the same options, bit for bit, and passes gradients to all three operands."""
    h, W, bias, t = _problem(device, torch.float32, lead=(5, 8))
    t = t.clamp(min=0)
    mod = fastloss.nn.LinearSphericalLoss(**kw)
    got, gg = _run(lambda *a, **k: mod(a[0], a[1], a[2], k["bias"]), h, W, t, bias)
    want, gw = _run(fastloss.linear_spherical_loss, h, W, t, bias, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for x, y in zip(gg, gw, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    tw = torch.rand(*t.shape, 2, device=device)
    t2 = torch.stack([t, (t + 1) % W.shape[0]], -1)
    torch.testing.assert_close(mod(h, W, t2, bias, target_weight=tw),
                               fastloss.linear_spherical_loss(h, W, t2, bias=bias, target_weight=tw, **kw))


@pytest.mark.parametrize("loss", LOSSES)
def test_multi_target(device, loss):
    h, W, bias, t = _problem(device, torch.float64)
    gen = torch.Generator().manual_seed(3)
    t2 = torch.stack([t, torch.randint(0, W.shape[0], t.shape, generator=gen).to(device), t.flip(0)], -1)
    t2[1, 1] = -100
    w = (torch.rand(t2.shape, generator=gen, dtype=torch.float64) + 0.1).to(device)
    got, gg = _run(fastloss.linear_spherical_loss, h, W, t2, bias, loss=loss, target_weight=w, **OPTS[loss])
    want, gw = _run(reference.linear_spherical_loss, h, W, t2, bias, loss=loss, target_weight=w, **OPTS[loss])
    _close(got, want, 1e-10)
    for x, y in zip(gg, gw, strict=False):
        _close(x, y, 1e-10)


@pytest.mark.parametrize("loss", LOSSES)
def test_gradcheck(device, loss):
    h, W, bias, t = _problem(device, torch.float64, N=6, d=4, V=9)
    h, W, bias = (x.requires_grad_() for x in (h, W, bias))
    f = lambda h, W, bias: fastloss.linear_spherical_loss(h, W, t, bias=bias, loss=loss, reduction="none",  # noqa: E731
                                                          **OPTS[loss])
    assert torch.autograd.gradcheck(f, (h, W, bias), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_opcheck_row_terms(device):
    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.float64):
        mu = torch.randn(7, generator=gen).to(device=device, dtype=dtype)
        m2 = (torch.rand(7, generator=gen) + 0.5).to(device=device, dtype=dtype)
        t = torch.randint(0, 11, (7, 2), generator=gen).to(device)
        t[0, 1] = -100
        dev = torch.randn(7, 2, generator=gen).to(device=device, dtype=dtype)
        for kind in range(4):
            for w in (None, torch.rand(7, 2, generator=gen).to(device=device, dtype=dtype)):
                args = (mu, m2, mu[:, None] + dev, dev, t, w, kind, 1.2, 0.1, 1e-3, 11, -100)
                torch.library.opcheck(torch.ops.fastloss.spherical_row_terms.default, args)


def test_row_terms_m2_below_zero_is_a_constant_row(device):
    """The Gram's m2 = hᵀQ_c h + 2uᵀh + β can round below 0 (a rank-deficient W, or the raw Gram's cancellation):
    spherical_row_terms reads it as 0, the constant row (Z-loss z = 0: softplus(a·b)/a, zero gradient), as the
    materialised rows clamp it, instead of a NaN from its square root; a NaN m2 stays NaN."""
    import math

    from fastloss.spherical import KINDS

    f = lambda x: torch.tensor(x, device=device)  # noqa: E731
    m2 = f([-1e-6, 0.0, float("nan")])
    one = torch.ones(3, 1, device=device)
    rows, coef = torch.ops.fastloss.spherical_row_terms(f([2.0, 2.0, 2.0]), m2, one * 2.5, one * 0.5,
                                                        torch.zeros(3, 1, dtype=torch.long, device=device), None,
                                                        KINDS["zloss"], 1.5, 0.2, 0.0, 7, -100)
    want = math.log1p(math.exp(1.5 * 0.2)) / 1.5
    assert rows[0].item() == pytest.approx(want) and rows[1].item() == rows[0].item() and rows[2].isnan()
    assert (coef[:2] == 0).all() and coef[2].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_row_kernels(device, dtype):
    gen = torch.Generator().manual_seed(5)
    N, d, Vs, K = 9, 37, 13, 2
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    r = lambda *s, t=dtype: torch.randn(*s, generator=gen).to(device=device, dtype=t)  # noqa: E731
    h, w, b = r(N, d), r(Vs, d), r(Vs)
    t = torch.randint(0, 30, (N, K), generator=gen).to(device)  # classes 5..17 are local to the shard at offset 5
    t[0, 0] = -100
    ops = torch.ops.fastloss
    torch.library.opcheck(ops.spherical_gather_dot.default, (h, w, b, t, r(d + 1, t=acc), 5, -100))
    torch.library.opcheck(ops.spherical_gather_dot.default, (h, w, None, t, r(d + 1, t=acc), 0, -100))
    torch.library.opcheck(ops.spherical_row_stats.default, (h, r(N, d, t=acc), r(2 * d + 2, t=acc)))
    for with_dense in (True, False):
        args = (r(N, d, t=acc), r(N, 2, t=acc), r(N, K, t=acc), w, t, r(2 * d + 2, t=acc), 5, -100, with_dense)
        torch.library.opcheck(ops.spherical_grad_hidden.default, args)
    # the gather against a direct float64 computation: only local targets contribute, [centred on `center`, raw],
    # each exact to its one rounding into fp32 (float64 inputs: double sums in another order)
    center = r(d + 1, t=acc)
    got = ops.spherical_gather_dot(h, w, b, t, center, 5, -100)
    local = (t >= 5) & (t < 5 + Vs)
    rows, brow = w.double()[(t - 5).clamp(0, Vs - 1)], b.double()[(t - 5).clamp(0, Vs - 1)]
    raw = (rows * h.double()[:, None]).sum(-1) + brow
    dev = ((rows - center[:d].double()) * h.double()[:, None]).sum(-1) + brow - center[d].double()
    want = torch.where(local[..., None], torch.stack([dev, raw], -1), 0.0).to(acc)
    assert got.shape == (N, K, 2)
    torch.testing.assert_close(got, want, rtol=torch.finfo(torch.float32).eps if acc == torch.float32 else 1e-13,
                               atol=1e-30)


def test_compile_fullgraph(device):
    torch._dynamo.reset()
    h, W, bias, t = _problem(device, torch.float32)
    def f(h, W, t, bias=None):
        return fastloss.linear_spherical_loss(h, W, t, bias=bias, loss="zloss")

    eager, ge = _run(f, h, W, t, bias)
    compiled, gc = _run(torch.compile(f, fullgraph=True), h, W, t, bias)
    torch.testing.assert_close(compiled, eager)
    for x, y in zip(gc, ge, strict=False):
        torch.testing.assert_close(x, y)


def test_bad_inputs(device):
    h, W, bias, t = _problem(device, torch.float32)
    f = fastloss.linear_spherical_loss
    with pytest.raises(ValueError, match="width"):
        f(h[:, :5], W, t)
    with pytest.raises(TypeError, match="dtype"):
        f(h, W.double(), t)
    with pytest.raises(ValueError, match="loss must be one of"):
        f(h, W, t, loss="softmax")
    with pytest.raises(ValueError, match="target must have shape"):
        f(h, W, t[:3])
    with pytest.raises(ValueError, match="bias"):
        f(h, W, t, bias=bias[:3])
    with pytest.raises(ValueError, match="bf16_split=True needs bfloat16"):
        f(h, W, t, bf16_split=True)
    with pytest.raises(TypeError, match="bf16_split must be"):
        f(h, W, t, bf16_split="yes")
    with pytest.raises(TypeError, match="centred_gram must be"):
        f(h, W, t, centred_gram="yes")
    with pytest.raises(ValueError, match="weight_grad_precision must be"):
        f(h, W, t, weight_grad_precision="fp16")
    t_bad = t.clone()
    t_bad[2] = W.shape[0]
    if device == "cpu":
        with pytest.raises(IndexError, match="out of bounds"):
            f(h, W, t_bad)
    else:
        assert torch.isnan(f(h, W, t_bad, reduction="none")[2])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="weight is on"):
            f(h, W.to("cuda" if device == "cpu" else "cpu"), t)


@pytest.mark.parametrize("loss", LOSSES)
def test_out_of_range_target_poisons_its_row_only(device, loss):
    """Without the host-side range check (CUDA skips it unless validation is on: it would sync), a target >= V or
    < 0 other than ignore_index gives that row a NaN loss, for every loss, and no other row changes."""
    from fastloss.linear_spherical import _LinearSpherical
    from fastloss.spherical import KINDS

    h, W, bias, t = _problem(device, torch.float32, N=12, d=8, V=30)
    t = t.clamp(min=0)
    bad = t.clone()
    bad[2], bad[5] = W.shape[0] + 3, -7
    o = {"a": 1.0, "b": 0.0, "eps": 1e-4} | OPTS[loss]
    rows = [_LinearSpherical.apply(h, W, bias, x[:, None], None, KINDS[loss], o["a"], o["b"], o["eps"], -100, None,
                                   False, False)[0] for x in (t, bad)]
    assert torch.isnan(rows[1][[2, 5]]).all(), rows[1]
    keep = torch.ones(12, dtype=torch.bool, device=device)
    keep[[2, 5]] = False
    torch.testing.assert_close(rows[1][keep], rows[0][keep], rtol=0, atol=0)


def test_autocast_casts_like_a_matmul(device):
    """Inside torch.autocast the fp32 operands (fp32 master weights, bias, hidden) take the autocast dtype, as
    F.linear's would, and their gradients come back in fp32; outside autocast mixed dtypes stay an error."""
    h, W, bias, t = _problem(device, torch.float32)
    leaves = [x.detach().requires_grad_() for x in (h, W, bias)]
    with torch.autocast(device, dtype=torch.bfloat16):
        got = fastloss.linear_spherical_loss(leaves[0], leaves[1], t, bias=leaves[2])
    assert got.dtype == torch.bfloat16
    grads = torch.autograd.grad(got, leaves)
    assert all(g.dtype == torch.float32 for g in grads)
    low = [x.detach().bfloat16().requires_grad_() for x in (h, W, bias)]
    want = fastloss.linear_spherical_loss(low[0], low[1], t, bias=low[2])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, w in zip(grads, torch.autograd.grad(want, low), strict=True):
        torch.testing.assert_close(g, w.float(), rtol=0, atol=0)
    with pytest.raises(TypeError, match="dtype"):  # no autocast: no silent cast
        fastloss.linear_spherical_loss(h.bfloat16(), W, t)


def test_training_smoke():
    """A small MLP on a synthetic 10k-class problem follows the same loss curve with the Gram form as with the
    materialised zloss (same initialisation, same data, Adam)."""
    V, d, N = 10_000, 32, 256
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(V, d, generator=gen)
    curves = []
    for use_gram in (True, False):
        torch.manual_seed(1)
        body = torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.Tanh(), torch.nn.Linear(64, 48))
        head = torch.nn.Linear(48, V)
        opt = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=3e-3)
        data = torch.Generator().manual_seed(2)
        curve = []
        for _ in range(25):
            y = torch.randint(0, V, (N,), generator=data)
            x = centers[y] + 0.3 * torch.randn(N, d, generator=data)
            hid = body(x)
            if use_gram:
                loss = fastloss.linear_spherical_loss(hid, head.weight, y, bias=head.bias, loss="zloss")
            else:
                loss = fastloss.zloss(head(hid), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves.append(torch.tensor(curve))
    torch.testing.assert_close(curves[0], curves[1], rtol=1e-4, atol=1e-5)
    assert curves[0][-5:].mean() < curves[0][:5].mean() - 0.05  # it trains


_DIST_WORKER = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, os.environ["FL_PYTHONPATH"]) if os.environ.get("FL_PYTHONPATH") else None
import fastloss
from fastloss import reference
rank, world = int(sys.argv[1]), int(sys.argv[2])
dist.init_process_group("gloo", init_method="file://" + sys.argv[3], rank=rank, world_size=world)
gen = torch.Generator().manual_seed(0)
N, d, V = 33, 10, 101
W = torch.randn(V, d, generator=gen, dtype=torch.float64) + 2.0
b = torch.randn(V, generator=gen, dtype=torch.float64)
h = torch.randn(N, d, generator=gen, dtype=torch.float64)
t = torch.randint(0, V, (N, 2), generator=gen); t[0, 1] = -100; t[5] = -100
sizes = [V // world + (1 if r < V % world else 0) for r in range(world)]
lo = sum(sizes[:rank]); hi = lo + sizes[rank]
for loss, centred in [(k, True) for k in ["zloss", "spherical_softmax", "taylor_softmax", "mse"]] + [("zloss", False)]:
    hl, Wl, bl = h.clone().requires_grad_(), W[lo:hi].clone().requires_grad_(), b[lo:hi].clone().requires_grad_()
    out = fastloss.linear_spherical_loss(hl, Wl, t, bias=bl, loss=loss, process_group=dist.group.WORLD,
                                         centred_gram=centred)
    out.backward()
    hr, Wr, br = h.clone().requires_grad_(), W.clone().requires_grad_(), b.clone().requires_grad_()
    ref = reference.linear_spherical_loss(hr, Wr, t, bias=br, loss=loss)
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hl.grad, hr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(Wl.grad, Wr.grad[lo:hi], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bl.grad, br.grad[lo:hi], rtol=1e-10, atol=1e-12)
# bf16 through the hi/lo split products (emulated on CPU): sharded == unsharded, to the bf16 output rounding
hb, Wb, bb = (x.to(torch.bfloat16) for x in (h, W - 2.0, b))
for loss in ["zloss", "mse"]:
    hl, Wl, bl = hb.clone().requires_grad_(), Wb[lo:hi].clone().requires_grad_(), bb[lo:hi].clone().requires_grad_()
    out = fastloss.linear_spherical_loss(hl, Wl, t, bias=bl, loss=loss, process_group=dist.group.WORLD,
                                         bf16_split=True)
    out.backward()
    hr, Wr, br = hb.clone().requires_grad_(), Wb.clone().requires_grad_(), bb.clone().requires_grad_()
    ref = fastloss.linear_spherical_loss(hr, Wr, t, bias=br, loss=loss, bf16_split=True)
    ref.backward()
    for got, want in ((out, ref), (hl.grad, hr.grad), (Wl.grad, Wr.grad[lo:hi]), (bl.grad, br.grad[lo:hi])):
        scale = want.double().abs().max().item()  # error relative to the tensor's size (bf16: 2 eps)
        torch.testing.assert_close(got.double(), want.double(), rtol=2 * 2.0**-8, atol=2 * 2.0**-8 * scale)
# fp32 with a shared weight mean ~300 times the rows' spread and a bias mean 1e4 times its spread: within 1e-5 of
# the float64 reference, loss and gradients. The shards' residual sums about their rounded means give the exact
# means' last bits (and the pooled statistics' cross terms) as in one process; without them the hidden gradient
# was 3e-5 off. Also without a bias.
W32 = (torch.randn(V, d, generator=gen, dtype=torch.float64) + 300.0 * torch.randn(d, generator=gen,
                                                                                   dtype=torch.float64)) / d**0.5
h32, W32, b32 = h.float(), W32.float(), (0.3 * b + 3000.0).float()
for loss, with_bias in [(k, True) for k in ["zloss", "spherical_softmax", "taylor_softmax", "mse"]] + [
        ("zloss", False), ("spherical_softmax", False)]:
    hl, Wl, bl = h32.clone().requires_grad_(), W32[lo:hi].clone().requires_grad_(), b32[lo:hi].clone().requires_grad_()
    out = fastloss.linear_spherical_loss(hl, Wl, t, bias=bl if with_bias else None, loss=loss,
                                         process_group=dist.group.WORLD, reduction="none")
    out.backward(torch.linspace(0.5, 1.5, N))
    hr, Wr, br = (x.double().requires_grad_() for x in (h32, W32, b32))
    ref = reference.linear_spherical_loss(hr, Wr, t, bias=br if with_bias else None, loss=loss, reduction="none")
    ref.backward(torch.linspace(0.5, 1.5, N, dtype=torch.float64))
    pairs = [(out, ref), (hl.grad, hr.grad), (Wl.grad, Wr.grad[lo:hi])] + ([(bl.grad, br.grad[lo:hi])] if with_bias
                                                                          else [])
    for got, want in pairs:
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5 * scale)
# Both ranks past every collective before either tears gloo down, and no interpreter teardown after (a rank
# leaving while gloo's threads still ran aborted once in CI: "terminate called without an active exception")
dist.barrier()
dist.destroy_process_group()
print("ok", rank, flush=True)
os._exit(0)
"""


def test_vocab_parallel_gloo(tmp_path):
    """Two processes (gloo, CPU), weight rows sharded: the loss equals the unsharded call on every rank, hidden
    gets the full gradient and each rank its shard's weight and bias gradients (float64 exactly; bf16 through the
    split products to the output rounding; fp32 with a large shared mean within 1e-5 of float64)."""
    import subprocess

    script = tmp_path / "worker.py"
    script.write_text(_DIST_WORKER)
    env = dict(os.environ, FL_PYTHONPATH=os.path.dirname(os.path.dirname(fastloss.__file__)), OMP_NUM_THREADS="1")
    init = str(tmp_path / "rendezvous")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", init], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=False):
        assert p.returncode == 0, f"stdout: {out[-500:]!r}\nstderr: {err[-3000:]}"
        assert out.startswith("ok")


@pytest.mark.parametrize("split", [False, True])
def test_mean_over_no_counted_rows(device, split):
    """reduction="mean" with every target ignored: a NaN loss, as torch gives, and zero gradients (a padding-only
    micro-batch must not put NaN into the weights), like the materialised reference."""
    h, W, bias, t = _problem(device, torch.bfloat16 if split else torch.float32, N=6, d=8, V=20)
    t = torch.full_like(t, -100)
    for fn, kw in ((fastloss.linear_spherical_loss, {"bf16_split": split}), (reference.linear_spherical_loss, {})):
        out, grads = _run(fn, h, W, t, bias, **kw)
        assert torch.isnan(out)
        for g in grads:
            assert (g == 0).all()
