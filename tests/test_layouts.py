"""Hypothesis: every row op on logits laid out as callers pass them, against the float64 reference on the same
(rounded) values. Class counts around the kernels' pack (8 two-byte or 4 fp32 logits), group and block
boundaries; rows that start off the 16-byte grid (a column slice: the kernels' unaligned head), padded row
strides, (B, T, C) batches and leading dimensions that do not merge; fp32, bf16 and fp16; up to 64 rows, enough
for the persistent grids to give a block several rows. Under FASTLOSS_CUEMU=1 the same draws run the CUDA
kernels (tests/cuemu), whose head / body / tail split and staged walk depend on exactly these layouts."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastloss
from fastloss import reference


def _multilabel(fn):
    return lambda x, t, **kw: fn(x, _positives(t, x.shape[-1]), **kw)


def _positives(t, C):
    """Two class lists per row from the single targets: (..., 2) with the second a neighbour (or padding)."""
    other = torch.where(t % 3 == 0, torch.full_like(t, -100), (t + 1) % C)
    return torch.stack([t, other], -1)


def _map(fn, dim=-1):
    """A probability map as a per-row loss: its dot with fixed weights, so the gradient is the map's backward.
    dim=0: the map taken over the first dimension of the rows' transpose (the same rows, another layout)."""
    def probs(x):
        return fn(x) if dim == -1 else fn(x.transpose(0, -1), dim=0).transpose(0, -1)

    def loss(x, t, reduction="none"):
        return (probs(x).double() * torch.linspace(-1, 1, x.shape[-1], dtype=torch.float64)).sum(-1)  # (not bf16)
    loss.probs = probs
    return loss


# name: (fastloss function, reference function, keyword arguments)
OPS = {
    "cross_entropy": (fastloss.cross_entropy, reference.cross_entropy, {}),
    "cross_entropy_scaled": (fastloss.cross_entropy, reference.cross_entropy,
                             {"logit_scale": 0.7, "lse_square_scale": 1e-3}),
    "cross_entropy_softcap_smooth": (fastloss.cross_entropy, reference.cross_entropy,
                                     {"softcap": 20.0, "label_smoothing": 0.1, "target_margin": 0.3}),
    "zloss": (fastloss.zloss, reference.zloss, {"a": 1.5, "b": 0.5}),
    "spherical_softmax": (fastloss.spherical_softmax_loss, reference.spherical_softmax_loss, {}),
    "spherical_mse": (fastloss.spherical_mse_loss, reference.spherical_mse_loss, {}),
    "taylor2": (fastloss.taylor_softmax_loss, reference.taylor_softmax_loss, {}),
    "taylor4": (fastloss.taylor_softmax_loss, reference.taylor_softmax_loss, {"order": 4}),
    "stablemax": (fastloss.stablemax_cross_entropy, reference.stablemax_cross_entropy, {}),
    "softplus": (fastloss.softplus_cross_entropy, reference.softplus_cross_entropy, {"scale": 2.0}),
    "comp_sum": (fastloss.comp_sum_loss, reference.comp_sum_loss, {"tau": 0.5}),
    "gce": (fastloss.generalized_cross_entropy, reference.generalized_cross_entropy, {"q": 0.7}),
    "zlpr": (_multilabel(fastloss.zlpr_loss), _multilabel(reference.zlpr_loss), {"margin": 0.2}),
    "decoupled": (_multilabel(fastloss.decoupled_softmax_loss), _multilabel(reference.decoupled_softmax_loss), {}),
    "sparsemax_loss": (fastloss.sparsemax_loss, reference.sparsemax_loss, {}),
    "entmax15_loss": (fastloss.entmax15_loss, reference.entmax15_loss, {}),
    "sparsemax": (_map(fastloss.sparsemax), _map(reference.sparsemax), {}),
    "entmax15": (_map(fastloss.entmax15), _map(reference.entmax15), {}),
    "sparsemax_dim0": (_map(fastloss.sparsemax, 0), _map(reference.sparsemax, 0), {}),
    "entmax15_dim0": (_map(fastloss.entmax15, 0), _map(reference.entmax15, 0), {}),
}

# ops whose target -100 leaves a row out (a multi-label op's -100 is a padded class list entry)
MAPS = ["sparsemax", "entmax15", "sparsemax_dim0", "entmax15_dim0"]
SINGLE_LABEL = [n for n in OPS if n not in ("zlpr", "decoupled", *MAPS)]

# pack (4 / 8 logits), warp (32 packs), block and group edges, and a few plain sizes
EDGES = [1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 127, 128, 129, 255, 256, 257, 1023, 1024, 1025, 2047, 2048, 2049,
         4095, 4096, 4097, 8191, 8193]
LAYOUTS = ["contiguous", "column_slice", "padded_rows", "batched", "unmerged_batch"]


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    C = draw(st.one_of(st.sampled_from(EDGES), st.integers(1, 3000)))
    n = draw(st.one_of(st.integers(1, 8), st.integers(9, 64)))
    layout = draw(st.sampled_from(LAYOUTS))
    offset = draw(st.integers(1, 9))  # column_slice: elements before the row; padded_rows: elements after it
    scale = draw(st.sampled_from([0.3, 1.0, 4.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if layout in ("batched", "unmerged_batch"):
        n = max(2, n - n % 2)
    values = (torch.randn(n, C, generator=gen, dtype=torch.float64) * scale).to(dtype)
    t = torch.randint(0, C, (n,), generator=gen)
    if n > 3:
        t[n // 3] = -100  # an ignored row
    if layout == "contiguous":
        x = values
    elif layout == "column_slice":  # every row starts `offset` elements past the 16-byte grid (or on it)
        buf = torch.zeros(n, offset + C + 3, dtype=dtype)
        buf[:, offset:offset + C] = values
        x = buf[:, offset:offset + C]
    elif layout == "padded_rows":
        buf = torch.zeros(n, C + offset, dtype=dtype)
        buf[:, :C] = values
        x = buf[:, :C]
    elif layout == "batched":
        x, t = values.view(2, n // 2, C), t.view(2, n // 2)
    else:  # (B, T, C) from a (T, B, C) buffer: leading dimensions that do not merge into rows
        buf = values.view(2, n // 2, C).transpose(0, 1).contiguous()
        x, t = buf.transpose(0, 1), t.view(2, n // 2)
    return x, t, layout


def _loss_grad(fn, x, t, kw):
    x = x.detach().requires_grad_()
    loss = fn(x, t, reduction="none", **kw)
    up = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).view(loss.shape).to(loss.dtype)
    (g,) = torch.autograd.grad(loss, x, up)
    return loss.detach(), g


@pytest.mark.parametrize("name", list(OPS))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(problem=problems())
def test_row_ops_on_every_layout(name, problem):
    fn, ref, kw = OPS[name]
    x, t, layout = problem
    loss, g = _loss_grad(fn, x, t, kw)
    want, want_g = _loss_grad(ref, x.double(), t, kw)  # the same rounded values, float64 maths, contiguous
    assert loss.shape == want.shape and g.shape == x.shape, layout
    ignored = t == -100 if name in SINGLE_LABEL else torch.zeros_like(t, dtype=torch.bool)
    keep = ~ignored
    # a loss or gradient past the dtype's range (comp-sum's p^-τ of a far-off target in fp16) comes back as inf,
    # as the rounding of the float64 value would: such rows are left out of the comparisons
    big = torch.finfo(x.dtype).max / 2
    beyond = (want.abs() > big) | (want_g.abs() > big).flatten(want.dim()).any(-1)
    overflow = want.abs() > torch.finfo(x.dtype).max * 1.001
    assert loss[overflow & keep].isinf().all(), f"{name} {tuple(x.shape)} {x.dtype}"
    keep = keep & ~beyond
    # fp32: a few roundings; fp16 / bf16 outputs: their own rounding (half an ulp) and fp32 maths, so one ulp
    # relative, and an absolute floor far below an ulp of the largest value
    rtol, atol = (4e-6, 4e-6) if x.dtype == torch.float32 else (torch.finfo(x.dtype).eps, 1e-5)
    if name in MAPS and x.dtype != torch.float32:
        # the map comes back rounded to fp16 / bf16 (half an ulp of each p_k) and the weights w (|w| <= 1)
        # cancel in Σ w p: an absolute error up to half an ulp of Σ p = 1
        atol = torch.finfo(x.dtype).eps
    scale = want[keep].abs().max().item() if keep.any() else 1.0
    what = f"{name} {layout} {tuple(x.shape)} {x.dtype}"
    msg = lambda m: f"{what}: {m}"  # noqa: E731
    torch.testing.assert_close(loss.double()[keep], want[keep], rtol=rtol, atol=atol * (scale + 1), equal_nan=True,
                               msg=msg)
    if name in MAPS:
        # a lane exactly at the threshold (likely with 2-byte values on their coarse grid) is a kink of the map:
        # its support, and with it the Jacobian, may differ by that lane between fp32 and float64 thresholds.
        # Such rows keep the loss check only.
        with torch.no_grad():
            tie = ((fn.probs(x) > 0) != (ref.probs(x.double()) > 0)).flatten(want.dim()).any(-1)
        beyond = beyond | tie
    # (at least 1: the Z-loss of two classes has an exactly zero gradient, a cancellation of O(1) terms)
    gscale = max(want_g[~beyond].abs().max().item() if (~beyond).any() else 0.0, 1.0)
    torch.testing.assert_close(g.double()[~beyond], want_g[~beyond], rtol=rtol, atol=atol * gscale, msg=msg)
    assert (g[ignored] == 0).all(), what  # ignored rows get no gradient
