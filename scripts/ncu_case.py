"""One call of each kernel worth profiling, for Nsight Compute (scripts/gpu_check.sh): the bf16 cross-entropy
forward (the kernel furthest from its bandwidth target), its zloss twin for comparison, and one contrastive
epilogue tile. ncu filters by kernel name and replays each launch itself, so one call each is enough."""

import torch

import fastloss

dev = "cuda"
torch.manual_seed(0)
x = torch.randn(8192, 32768, device=dev, dtype=torch.bfloat16)
t = torch.randint(0, 32768, (8192,), device=dev)
fastloss.cross_entropy(x, t)
fastloss.zloss(x, t)
q = torch.nn.functional.normalize(torch.randn(8192, 768, device=dev), dim=-1).to(torch.bfloat16)
fastloss.clip_loss(q, q.roll(1, 0), torch.tensor(30.0, device=dev))
torch.cuda.synchronize()
print("ok")
