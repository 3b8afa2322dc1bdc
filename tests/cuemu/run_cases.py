"""Losses and gradients of a fixed set of cases covering every op with a CUDA kernel, for tests/test_cuemu.py.

    python tests/cuemu/run_cases.py OUT.pt [--emulate]

--emulate runs them on the emulated CUDA kernels (FASTLOSS_EMU_SMS=1 unless set: one SM, so that the
persistent grids give each block several rows); without it on the CPU kernels. The variables that switch
kernel paths (FASTLOSS_ROW_STAGED, FASTLOSS_EMU_ORDER) are read once per process: each variant is a process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

TESTS = Path(__file__).resolve().parents[1]


def _grads(out: dict, key: str, loss: torch.Tensor, inputs: tuple) -> None:
    inputs = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    total = loss.nan_to_num().sum() if loss.dim() else loss
    grads = torch.autograd.grad(total, inputs, allow_unused=True)
    out[f"{key}/loss"] = loss.detach()
    for i, g in enumerate(grads):
        if g is not None:
            out[f"{key}/grad{i}"] = g


def _row_cases(out: dict, dtype: torch.dtype, gen: torch.Generator) -> None:
    """Stable softmax and multi-label families, sparsemax / entmax (row kernels of their own)."""
    import fastloss

    x = (torch.randn(37, 1003, generator=gen) * 3).to(dtype).requires_grad_()
    t = torch.randint(0, 1003, (37,), generator=gen)
    t[3] = -100
    mask = torch.rand(37, 1003, generator=gen) < 0.01
    calls = {
        "stablemax": lambda: fastloss.stablemax_cross_entropy(x, t, reduction="none"),
        "taylor4": lambda: fastloss.taylor_softmax_loss(x, t, order=4, reduction="none"),
        "softplus": lambda: fastloss.softplus_cross_entropy(x, t, reduction="none"),
        "comp_sum": lambda: fastloss.comp_sum_loss(x, t, tau=0.5, reduction="none"),
        "gce": lambda: fastloss.generalized_cross_entropy(x, t, q=0.7, reduction="none"),
        "zlpr": lambda: fastloss.zlpr_loss(x, mask, reduction="none"),
        "decoupled": lambda: fastloss.decoupled_softmax_loss(x, mask, reduction="none"),
        "sparsemax_loss": lambda: fastloss.sparsemax_loss(x, t, reduction="none"),
        "entmax15_loss": lambda: fastloss.entmax15_loss(x, t, reduction="none"),
        "sparsemax": lambda: (fastloss.sparsemax(x) * torch.linspace(-1, 1, 1003)).sum(-1),
        "entmax15": lambda: (fastloss.entmax15(x) * torch.linspace(-1, 1, 1003)).sum(-1),
    }
    for name, call in calls.items():
        _grads(out, f"rows/{dtype}/{name}", call(), (x,))
    # probability targets: same dtype (packs, misaligned rows), float32 targets (beside 2-byte logits two target
    # packs per logit pack; fp64 logits read them converted), a masked class
    probs = torch.softmax(torch.randn(37, 1003, generator=gen), -1)
    probs[:, 5] = 0.0
    xm = x.detach().clone()
    xm[:, 5] = float("-inf")
    xm.requires_grad_()
    w = torch.rand(1003, generator=gen).to(dtype)
    prob_calls = {
        "prob": lambda: fastloss.cross_entropy(x, probs.to(dtype), reduction="none"),
        "prob_f32_targets": lambda: fastloss.cross_entropy(x, probs, weight=w, label_smoothing=0.1, reduction="none"),
        "prob_softcap": lambda: fastloss.cross_entropy(xm, probs.to(dtype), softcap=4.0, logit_scale=1.3,
                                                       reduction="none"),
        "prob_sliced": lambda: fastloss.cross_entropy(x[:, 1:], probs[:, 1:].to(dtype), reduction="none"),
    }
    for name, call in prob_calls.items():
        _grads(out, f"rows/{dtype}/{name}", call(), (x, xm))


def _contrastive_cases(out: dict, dtype: torch.dtype, gen: torch.Generator) -> None:
    """The contrastive tile loop: CLIP, SigLIP, InfoNCE with extra keys, HCL, DCL, NT-Xent, SupCon, stats."""
    import fastloss

    q = F.normalize(torch.randn(130, 24, generator=gen), dim=1).to(dtype).requires_grad_()
    k = F.normalize(torch.randn(301, 24, generator=gen), dim=1).to(dtype).requires_grad_()
    s = torch.tensor(14.0, requires_grad=True)
    b = torch.tensor(-4.0, requires_grad=True)
    pos = torch.randint(0, 301, (130,), generator=gen)
    labels = torch.randint(0, 9, (130,), generator=gen)
    kq = k[:130]
    calls = {
        "clip": lambda: fastloss.clip_loss(q, kq, s, reduction="none"),
        "clip_row_blocks": lambda: fastloss.clip_loss(q, kq, s, reduction="none", block_rows=48),
        "siglip": lambda: fastloss.siglip_loss(q, kq, s, b, reduction="none"),
        "infonce": lambda: fastloss.contrastive_loss(q, k, positive=pos, logit_scale=s, reduction="none"),
        "hcl_smooth": lambda: fastloss.contrastive_loss(q, k, positive=pos, logit_scale=s, hard_negative_beta=0.5,
                                                        label_smoothing=0.1, reduction="none"),
        "dcl_sym": lambda: fastloss.contrastive_loss(q, kq, logit_scale=s, symmetric=True, decoupled=True,
                                                     reduction="none"),
        "nt_xent": lambda: fastloss.nt_xent_loss(q[:65], q[65:], temperature=0.1, reduction="none"),
        "supcon": lambda: fastloss.supcon_loss(q, labels, temperature=0.1, reduction="none"),
        "infonce_mean": lambda: fastloss.contrastive_loss(q, k, positive=pos, logit_scale=s),
        "siglip_mean": lambda: fastloss.siglip_loss(q, kq, s, b),
    }
    for name, call in calls.items():
        _grads(out, f"contrastive/{dtype}/{name}", call(), (q, k, s, b))
    with torch.no_grad():
        loss, stats = fastloss.contrastive_loss(q, k, positive=pos, logit_scale=s, reduction="none",
                                                return_stats=True)
    out[f"contrastive/{dtype}/stats_lse"], out[f"contrastive/{dtype}/stats_correct"] = stats.lse, stats.correct


def cases(emulated: bool) -> dict[str, torch.Tensor]:
    import fastloss

    sys.path.insert(0, str(TESTS))
    from samples import streamed_losses

    out: dict[str, torch.Tensor] = {}
    # the row engine: staged and unstaged CE and spherical forwards and backwards, many rows per block
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for k, v in streamed_losses(dtype, device="cpu", rows_div=64, bad_row=False).items():
            out[f"streamed/{dtype}/{k}"] = v
    if emulated:  # a bad target: the CUDA kernels' NaN row (the CPU kernels raise instead)
        for k, v in streamed_losses(torch.bfloat16, device="cpu", rows_div=64).items():
            out[f"nan_row/{k}"] = v
    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        _row_cases(out, dtype, gen)
        _contrastive_cases(out, dtype, gen)
    # the Gram form: row terms, gathers, row statistics, hidden and weight gradients, the bf16 split
    for dtype, split in ((torch.float32, None), (torch.bfloat16, True)):
        h = torch.randn(70, 48, generator=gen).to(dtype).requires_grad_()
        w = (torch.randn(333, 48, generator=gen) * 0.2 + 0.05).to(dtype).requires_grad_()
        bias = (torch.randn(333, generator=gen) * 0.1).to(dtype).requires_grad_()
        t = torch.randint(0, 333, (70,), generator=gen)
        t[5] = -100
        for loss_kind in ("zloss", "spherical_softmax", "taylor_softmax", "mse"):
            extra = {} if split is None else {"bf16_split": True}
            loss = fastloss.linear_spherical_loss(h, w, t, bias=bias, loss=loss_kind, reduction="none", **extra)
            _grads(out, f"gram/{dtype}/{loss_kind}", loss, (h, w, bias))
    return out


def main() -> None:
    path = sys.argv[1]
    emulated = "--emulate" in sys.argv
    if emulated:
        os.environ.setdefault("FASTLOSS_EMU_SMS", "1")
        sys.path.insert(0, str(TESTS))
        from cuemu import emulate

        emulate.use_for_cpu()
    torch.save(cases(emulated), path)


if __name__ == "__main__":
    main()
