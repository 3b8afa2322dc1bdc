"""A small run of every CUDA op for compute-sanitizer (memcheck): odd widths, misaligned and aligned rows, every dtype,
every option path, an out-of-range target (NaN row, no out-of-bounds access) and N = 0. ``--fused``: only the
opt-in fused sm_90 contrastive GEMMs (scripts/gpu_check.sh runs them in a step of their own)."""

import os
import sys

import torch

import fastloss

torch.manual_seed(0)
dev = "cuda"


def fused_cases():
    """The opt-in fused sm_90 GEMMs (FASTLOSS_CONTRASTIVE_FUSED=1): forward folds, the recomputing backward, the
    one-pass gradients (softmax: fold + G; SigLIP: one GEMM), at sizes that cut the 128 x 128 tiles, with a bad
    positive. Where they are not built or this is not an sm_90 device, the tile loop runs instead."""
    os.environ["FASTLOSS_CONTRASTIVE_FUSED"] = "1"
    for N, M, d in ((1, 1, 8), (130, 130, 24), (200, 300, 40)):
        for dtype in (torch.bfloat16, torch.float16):
            q = torch.randn(N, d, device=dev, dtype=dtype, requires_grad=True)
            k = torch.randn(M, d, device=dev, dtype=dtype, requires_grad=True)
            s = torch.full((N,), 3.0, device=dev, requires_grad=True)
            b = torch.tensor(-2.0, device=dev, requires_grad=True)
            if N == M:
                out, _ = fastloss.contrastive_loss(q, k, logit_scale=s, symmetric=True, reduction="none",
                                                   return_stats=True)
                out.sum().backward()
            pos = torch.randint(0, M, (N,), device=dev)
            pos[-1] = M + 4
            for kw in ({"label_smoothing": 0.1}, {"hard_negative_beta": 0.5}, {"loss": "sigmoid", "logit_bias": b}):
                fastloss.contrastive_loss(q, k, positive=pos, logit_scale=s, **kw).backward()  # one-pass gradient
                fastloss.contrastive_loss(q, k, positive=pos, logit_scale=s, reduction="none", **kw).sum().backward()
    torch.cuda.synchronize()


if "--fused" in sys.argv:
    fused_cases()
    sys.exit(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    for N, C in ((3, 1), (5, 3), (7, 1001), (4, 8195)):
        base = torch.randn(N, C + 3, device=dev, dtype=dtype)
        x = base[:, 1 : C + 1].requires_grad_(False)  # rows that start misaligned
        x = x.clone() if C == 1 else x
        x.requires_grad_()
        t = torch.randint(0, C, (N,), device=dev)
        t[0] = -100
        w = torch.rand(C, device=dev, dtype=dtype)
        m = torch.rand(C, device=dev, dtype=dtype)
        for kw in ({}, {"weight": w, "label_smoothing": 0.1, "lse_square_scale": 1e-3},
                   {"softcap": 3.0, "logit_scale": 0.5, "target_margin": m}, {"return_lse": True}):
            out = fastloss.cross_entropy(x, t, **kw)
            loss = out[0] + out[1].sum() if isinstance(out, tuple) else out
            loss.backward()
        t2 = torch.stack([t, torch.randint(0, C, (N,), device=dev)], -1)
        tw = torch.rand(t2.shape, device=dev, dtype=dtype)
        for fn in (fastloss.zloss, fastloss.spherical_softmax_loss, fastloss.taylor_softmax_loss,
                   fastloss.spherical_mse_loss):
            fn(x, t).backward()
            fn(x, t2, target_weight=tw).backward()
        # probability targets: misaligned logits (element path), contiguous ones with targets of their dtype (packs
        # with heads and tails) and with float32 targets (2-byte logits: two target packs per logit pack)
        probs = torch.softmax(torch.randn(N, C, device=dev), -1)
        xc = x.detach().contiguous().requires_grad_()
        for xp, tp in ((x, probs.to(dtype)), (xc, probs.to(dtype)), (xc, probs)):
            fastloss.cross_entropy(xp, tp, weight=w, label_smoothing=0.1, softcap=3.0).backward()
        bad = t.clone()
        bad[-1] = C + 5
        fastloss.cross_entropy(x, bad).backward()
        fastloss.zloss(x, bad).backward()
    # the staged kernels (16-byte-aligned rows of 2-byte / fp32 logits, a persistent grid): several rows per
    # block, a tail past the last whole pack, an offset row start, the general forward before a staged backward
    if dtype != torch.float64:
        for N, width, lo, hi in ((3000, 264, 0, 264), (300, 2056, 0, 2053), (40, 9000, 0, 9000), (64, 1032, 8, 1032)):
            xa = torch.randn(N, width, device=dev, dtype=dtype)[:, lo:hi].requires_grad_()
            C = hi - lo
            t = torch.randint(0, C, (N,), device=dev)
            t[0], t[-1] = -100, C + 5
            for kw in ({}, {"softcap": 3.0, "weight": torch.rand(C, device=dev, dtype=dtype)}):
                fastloss.cross_entropy(xa, t, reduction="none", **kw).sum().backward()
            fastloss.zloss(xa, t, reduction="none").sum().backward()
            fastloss.spherical_softmax_loss(xa, torch.stack([t, t.flip(0)], -1), reduction="none").sum().backward()
    # Gram form: odd widths, a weight shard's worth of rows, multi-target, an out-of-range target
    h = torch.randn(6, 37, device=dev, dtype=dtype, requires_grad=True)
    W = torch.randn(101, 37, device=dev, dtype=dtype, requires_grad=True)
    b = torch.randn(101, device=dev, dtype=dtype, requires_grad=True)
    for loss in ("zloss", "spherical_softmax", "taylor_softmax", "mse"):
        tt = torch.randint(0, 101, (6, 3), device=dev)
        tt[0, 1] = -100
        fastloss.linear_spherical_loss(h, W, tt, bias=b, loss=loss).backward()
    tt[1, 0] = 101
    fastloss.linear_spherical_loss(h, W, tt, bias=b, reduction="sum").backward()
    if dtype in (torch.float32, torch.float64):
        layer = fastloss.FactoredSphericalLinear(37, 101, device=dev, dtype=dtype)
        layer(h, tt.clamp(0, 100)).backward()
        layer.sgd_step(0.1)
    empty = torch.randn(0, 9, device=dev, dtype=dtype, requires_grad=True)
    fastloss.cross_entropy(empty, torch.zeros(0, dtype=torch.long, device=dev), reduction="sum").backward()
# contrastive family: every kind and option, odd sizes, tile boundaries, a bad positive (NaN row, no OOB access)
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for N, M, d, block in ((1, 1, 3, None), (5, 9, 3, 2), (33, 33, 17, 8), (130, 130, 24, None)):  # last: grouped folds
        q = torch.randn(N, d, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(M, d, device=dev, dtype=dtype, requires_grad=True)
        s = torch.tensor(3.0, device=dev, requires_grad=True)
        b = torch.tensor(-1.0, device=dev, requires_grad=True)
        opts = [{}, {"hard_negative_beta": 0.5, "label_smoothing": 0.1}, {"decoupled": True, "logit_bias": b},
                {"loss": "sigmoid", "logit_bias": b, "return_stats": True}]
        if N == M:
            opts.append({"symmetric": True, "hard_negative_beta": 0.3, "return_stats": True})
        for kw in opts:  # scalar reductions: the gradient in the forward pass (contrastive_fwd_grad) unless symmetric
            out = fastloss.contrastive_loss(q, k, logit_scale=s, block_rows=block, **kw)
            (out[0] if isinstance(out, tuple) else out).backward()
        for kw in opts[:2] + opts[3:4]:  # per-row losses: the recomputing backward (contrastive_bwd)
            out = fastloss.contrastive_loss(q, k, logit_scale=s, block_rows=block, reduction="none", **kw)
            (out[0] if isinstance(out, tuple) else out).sum().backward()
        pos = torch.arange(N, device=dev)
        pos[-1] = M + 4
        fastloss.contrastive_loss(q, k, positive=pos, logit_scale=s, block_rows=block).backward()
    z = torch.randn(8, 5, device=dev, dtype=dtype, requires_grad=True)
    fastloss.nt_xent_loss(z[:4], z[4:], temperature=0.5).backward()
    fastloss.supcon_loss(z, torch.tensor([0, 1, 0, 1, 2, 2, 3, 0], device=dev), temperature=0.5).backward()

# sparsemax family: maps and losses, masked lanes, a fully masked row, a bad target, dim != -1.
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for N, C in ((3, 1), (5, 3), (7, 1001), (4, 8195)):
        x = torch.randn(N, C + 3, device=dev, dtype=dtype)[:, 1 : C + 1]
        x = (x.clone() if C == 1 else x).requires_grad_()
        t = torch.randint(0, C, (N,), device=dev)
        t[0] = -100
        for act, loss in ((fastloss.sparsemax, fastloss.sparsemax_loss), (fastloss.entmax15, fastloss.entmax15_loss)):
            (act(x) * torch.rand_like(x)).sum().backward()
            act(x, dim=0).sum().backward()
            loss(x, t).backward()
            masked = x.detach().clone()
            masked[0] = float("-inf")
            masked[-1, ::2] = float("-inf")
            act(masked.requires_grad_()).sum().backward()
            bad = t.clone()
            bad[-1] = C + 5
            loss(masked, bad, reduction="sum").backward()
torch.cuda.synchronize()
print("sanitizer case done")
