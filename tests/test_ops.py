"""Op-level contracts: torch.library.opcheck, float64 gradcheck, torch.compile(fullgraph=True)."""

import pytest
import torch

import fastloss
from samples import check_compile_fullgraph, row_samples

ops = torch.ops.fastloss


def _opcheck_row_ops(device, dtype):
    for s in row_samples(device, dtype):
        C = s.logits.shape[-1]
        x = s.logits.reshape(-1, C)
        x = x if x.stride(-1) == 1 else x.contiguous()
        t = s.target.reshape(-1)
        w = torch.rand(C, device=device, dtype=dtype) + 0.5
        margin = torch.rand(C, device=device, dtype=dtype)
        for args in [
            (x.detach().requires_grad_(), t, None, None, 0.0, 1.0, 0.0, -100, False),
            (x.detach().requires_grad_(), t, w, margin, 0.0, 0.7, 3.0, -100, True),
            (x.detach().requires_grad_(), torch.where(t == -100, 1, t), None, None, 0.25, 1.0, 0.0, 1, True),
        ]:
            torch.library.opcheck(ops.cross_entropy_fwd.default, args)
            parts, stats = ops.cross_entropy_fwd(*[a.detach() if torch.is_tensor(a) else a for a in args])
            bwd = (torch.rand_like(parts), x.detach(), args[1], args[2], stats, args[5], args[6], args[7], args[8])
            torch.library.opcheck(ops.cross_entropy_bwd.default, bwd)
        t2 = torch.stack([t, torch.where(t == -100, 0, t).flip(0)], -1)
        tw = torch.rand(t2.shape, device=device, dtype=dtype) + 0.1
        for kind in range(4):
            for tt, ww in [(t[:, None], None), (t2, tw)]:
                args = (tt, ww, kind, 1.3, 0.2, 1e-3, -100)
                torch.library.opcheck(ops.spherical_fwd.default, (x.detach().requires_grad_(), *args))
                loss, stats = ops.spherical_fwd(x.detach(), *args)
                torch.library.opcheck(ops.spherical_bwd.default, (torch.rand_like(loss), x.detach(), tt, ww, stats,
                                                                  *args[2:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(device, dtype):
    _opcheck_row_ops(device, dtype)


GRADCHECK_CASES = [
    ("ce", {}),
    ("ce", {"label_smoothing": 0.2, "weight": True, "reduction": "sum"}),
    ("ce", {"lse_square_scale": 0.3, "softcap": 1.5, "logit_scale": 1.7, "target_margin": 0.4, "reduction": "none"}),
    ("ce_lse", {"target_margin": "per_class"}),
    ("zloss", {"a": 1.5, "b": 0.3}),
    ("zloss", {"reduction": "none"}),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: c[0] + "-" + "-".join(c[1]))
def test_gradcheck_float64(device, case):
    kind, kw = case
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    t = torch.randint(0, 7, (2, 3), generator=gen).to(device)
    t[0, 1] = -100
    kw = dict(kw)
    if kw.get("weight"):
        kw["weight"] = torch.rand(7, generator=gen, dtype=torch.float64).to(device) + 0.5
    if kw.get("target_margin") == "per_class":
        kw["target_margin"] = torch.rand(7, generator=gen, dtype=torch.float64).to(device)
    if kind == "zloss":
        fn = lambda x: fastloss.zloss(x, t, **kw)
    elif kind == "ce":
        fn = lambda x: fastloss.cross_entropy(x, t, **kw)
    else:  # loss and lse together: gradients through both outputs
        fn = lambda x: fastloss.cross_entropy(x, t, return_lse=True, **kw)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-6)


COMPILE_LOSSES = {
    "cross_entropy": lambda z, t: fastloss.cross_entropy(z, t, label_smoothing=0.1, lse_square_scale=1e-3,
                                                         softcap=3.0),
    "cross_entropy_lse": lambda z, t: sum(x.sum() for x in fastloss.cross_entropy(z, t, return_lse=True,
                                                                                   reduction="none")),
    "zloss": lambda z, t: fastloss.zloss(z, t, a=1.5),
    "spherical_softmax_multi_target": lambda z, t: fastloss.spherical_softmax_loss(z, torch.stack([t, t.flip(-1)], -1)),
    "spherical_mse": lambda z, t: fastloss.spherical_mse_loss(z, t, reduction="sum"),
    "taylor_softmax_weighted": lambda z, t: fastloss.taylor_softmax_loss(z, t, target_weight=z.new_ones(t.shape)),
}


@pytest.mark.parametrize("name", list(COMPILE_LOSSES))
def test_compile_fullgraph(device, name):
    check_compile_fullgraph(COMPILE_LOSSES[name], device)


