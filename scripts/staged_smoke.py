"""A short check of the staged row kernels (csrc/cuda/common.cuh, stream_rows_staged) before the rest of
scripts/gpu_check.sh: aligned rows, several per block, CE forward + backward and the Z-loss forward, against
float64. Exit status 1 on a wrong value; a fault or a hang ends it too (the caller's timeout). On failure the
caller runs every later step with FASTLOSS_ROW_STAGED=0, so that one broken kernel does not spend the session."""

import sys

import torch

import fastloss
from fastloss import reference

torch.manual_seed(0)
worst = 0.0
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    for N, C in ((3000, 264), (600, 9000), (1, 70000)):
        x = (torch.randn(N, C, device="cuda", dtype=torch.float64) * 2).to(dtype).requires_grad_()
        t = torch.randint(0, C, (N,), device="cuda")
        for fn, ref in ((fastloss.cross_entropy, reference.cross_entropy), (fastloss.zloss, reference.zloss)):
            loss = fn(x, t, reduction="none")
            (g,) = torch.autograd.grad(loss.sum(), x)
            x64 = x.detach().double().requires_grad_()
            want = ref(x64, t, reduction="none")
            (g64,) = torch.autograd.grad(want.sum(), x64)
            err = max(((loss.double() - want) / want.abs().clamp_min(1)).abs().max().item(),
                      ((g.double() - g64).abs().max() / g64.abs().max()).item())
            # results rounded once to the logits' dtype; fp32: fp32 sums (a broken kernel is off by O(1))
            limit = 4 * torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5
            worst = max(worst, err / limit)
            print(f"{fn.__name__:14s} {str(dtype):15s} N={N:5d} C={C:6d} max rel err {err:.2e} (limit {limit:.1e})")
torch.cuda.synchronize()
print(f"worst error / limit: {worst:.2f}")
sys.exit(0 if worst <= 1 else 1)
