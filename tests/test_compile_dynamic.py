"""torch.compile(fullgraph=True, dynamic=True): one entry point per family traces without a graph break, keeps its
values and gradients over two batch sizes (one compiled graph with symbolic sizes, where Python floats of the
options may be traced as SymFloats), and a bad positive index still raises under compile (from the kernel)."""

import pytest
import torch

import fastloss

W = torch.randn(12, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
POS = torch.tensor([3, 0, 5, 1, 2, 4, 0, 1, 2])

CASES = {
    "cross_entropy": lambda x, t: fastloss.cross_entropy(x, t, label_smoothing=0.1, softcap=30.0,
                                                         lse_square_scale=1e-4),
    "zloss": lambda x, t: fastloss.zloss(x, t, a=2.0, b=0.5),
    "taylor": lambda x, t: fastloss.taylor_softmax_loss(x, t, order=4),
    "zlpr": lambda x, t: fastloss.zlpr_loss(x, t[:, None]),
    "entmax15_loss": lambda x, t: fastloss.entmax15_loss(x, t),
    "linear_spherical": lambda x, t: fastloss.linear_spherical_loss(x[:, :6], W, t),
    "clip": lambda x, t: fastloss.clip_loss(x, x.flip(0), 3.0),
    "siglip": lambda x, t: fastloss.siglip_loss(x, x.flip(0), 3.0, -1.0),
    "infonce_positive": lambda x, t: fastloss.contrastive_loss(x, x.flip(0), positive=POS[: x.shape[0]] % x.shape[0],
                                                               logit_scale=2.0, hard_negative_beta=0.5),
    "nt_xent": lambda x, t: fastloss.nt_xent_loss(x, x.flip(0), temperature=0.5),
}


@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
@pytest.mark.parametrize("name", list(CASES))
def test_compile_dynamic_fullgraph(name):
    torch._dynamo.reset()
    fn = CASES[name]
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    gen = torch.Generator().manual_seed(0)
    with torch._inductor.config.patch(force_disable_caches=True):
        for n in (6, 9):
            x = torch.randn(n, 12, generator=gen, requires_grad=True)
            t = torch.randint(0, 12, (n,), generator=gen)
            out = compiled(x, t)
            (g,) = torch.autograd.grad(out, x)
            want = fn(x, t)
            (gw,) = torch.autograd.grad(want, x)
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(g, gw, rtol=1e-5, atol=1e-6)


@pytest.mark.host_kernels
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_compiled_bad_positive_still_raises():
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, p: fastloss.contrastive_loss(q, k, positive=p, logit_scale=2.0),
                             fullgraph=True)
    q, k = torch.randn(4, 3), torch.randn(6, 3)
    with pytest.raises(IndexError, match="positive 9 of row 2"):
        compiled(q, k, torch.tensor([0, 1, 9, 2]))
