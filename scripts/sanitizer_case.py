"""A small run of every CUDA op for compute-sanitizer (memcheck): odd widths, misaligned rows, every dtype,
every option path, an out-of-range target (NaN row, no out-of-bounds access) and N = 0."""

import torch

import fastloss

torch.manual_seed(0)
dev = "cuda"
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
        fastloss.zloss(x, t, a=1.3, b=0.2).backward()
        bad = t.clone()
        bad[-1] = C + 5
        fastloss.cross_entropy(x, bad).backward()
        fastloss.zloss(x, bad).backward()
    empty = torch.randn(0, 9, device=dev, dtype=dtype, requires_grad=True)
    fastloss.cross_entropy(empty, torch.zeros(0, dtype=torch.long, device=dev), reduction="sum").backward()
# contrastive family: every kind and option, odd sizes, tile boundaries, a bad positive (NaN row, no OOB access)
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for N, M, d, block in ((1, 1, 3, None), (5, 9, 3, 2), (33, 33, 17, 8)):
        q = torch.randn(N, d, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(M, d, device=dev, dtype=dtype, requires_grad=True)
        s = torch.tensor(3.0, device=dev, requires_grad=True)
        b = torch.tensor(-1.0, device=dev, requires_grad=True)
        opts = [{}, {"hard_negative_beta": 0.5, "label_smoothing": 0.1}, {"decoupled": True, "logit_bias": b},
                {"loss": "sigmoid", "logit_bias": b}]
        if N == M:
            opts.append({"symmetric": True, "hard_negative_beta": 0.3, "return_stats": True})
        for kw in opts:
            out = fastloss.contrastive_loss(q, k, logit_scale=s, block_rows=block, **kw)
            (out[0] if isinstance(out, tuple) else out).backward()
        pos = torch.arange(N, device=dev)
        pos[-1] = M + 4
        fastloss.contrastive_loss(q, k, positive=pos, logit_scale=s, block_rows=block).backward()
    z = torch.randn(8, 5, device=dev, dtype=dtype, requires_grad=True)
    fastloss.nt_xent_loss(z[:4], z[4:], temperature=0.5).backward()
    fastloss.supcon_loss(z, torch.tensor([0, 1, 0, 1, 2, 2, 3, 0], device=dev), temperature=0.5).backward()
torch.cuda.synchronize()
print("sanitizer case done")
