"""Where the time of the large GPU targets goes (scripts/gpu_check.sh): one warm forward + backward of each case
under torch.profiler, then its CUDA kernels grouped by name with their share of the GPU time. Splits the GEMMs
(cuBLAS) from fastloss's epilogue and row kernels, which is what the next kernel change needs to know:
    issue 6: clip_loss / siglip_loss / one-direction InfoNCE at N = 65536, d = 768, bf16 (``*_fused``: the same
             with FASTLOSS_CONTRASTIVE_FUSED=1, the sm_90 CUTLASS GEMMs with on-chip epilogues)
    issue 3: linear_spherical_loss (Z-loss) at N = 32768, d = 2048, V = 131072, bf16
    python scripts/profile_case.py [--cases clip,siglip,infonce,gram] [--n 65536]
    python scripts/profile_case.py --device cpu --n 1024 --gram 2048,256,8192   # a smoke run without a GPU
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import fastloss


def contrastive_case(name: str, n: int, d: int, dev: str):
    gen = torch.Generator(dev).manual_seed(0)
    x = F.normalize(torch.randn(n, d, device=dev, generator=gen), dim=1).bfloat16().requires_grad_()
    y = F.normalize(torch.randn(n, d, device=dev, generator=gen), dim=1).bfloat16().requires_grad_()
    s = torch.tensor(14.3, device=dev, requires_grad=True)
    b = torch.tensor(-10.0, device=dev, requires_grad=True)
    fn = {"clip": lambda: fastloss.clip_loss(x, y, s),
          "siglip": lambda: fastloss.siglip_loss(x, y, s, b),
          "infonce": lambda: fastloss.contrastive_loss(x, y, logit_scale=s)}[name]
    useful = 3 * 2.0 * n * n * d  # the materialised loss's 3 GEMM-equivalents
    return fn, (x, y, s, b), useful


def gram_case(n: int, d: int, v: int, dev: str):
    gen = torch.Generator(dev).manual_seed(0)
    h = (torch.randn(n, d, device=dev, generator=gen) / d**0.5).bfloat16().requires_grad_()
    w = (torch.randn(v, d, device=dev, generator=gen) / d**0.5).bfloat16().requires_grad_()
    t = torch.randint(0, v, (n,), device=dev, generator=gen)
    return lambda: fastloss.linear_spherical_loss(h, w, t, loss="zloss"), (h, w), 3 * 2.0 * n * v * d


def run(name, fn, leaves, useful, dev):
    cuda = dev == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn().backward()  # warm-up: cuBLAS heuristics, allocator
    sync()
    for t in leaves:
        t.grad = None
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn().backward()
        sync()
        wall = (time.perf_counter() - t0) * 1e3
    by_name = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == kind:
            key = e.name if len(e.name) < 90 else e.name[:87] + "..."
            by_name[key][0] += (e.device_time_total if cuda else e.self_cpu_time_total) / 1e3
            by_name[key][1] += 1
    busy = sum(ms for ms, _ in by_name.values())
    print(f"\n== {name}: fwd+bwd {wall:.2f} ms wall, {busy:.2f} ms in {'kernels' if cuda else 'ops (self)'}; "
          f"{useful / (wall * 1e-3) / 1e12:.1f} TFLOP/s on the materialised loss's GEMM-equivalents")
    gemm = sum(ms for k, (ms, _) in by_name.items()
               if any(w in k.lower() for w in ("gemm", "nvjet", "xmma", "sm90", "cutlass", "aten::mm", "aten::addmm")))
    print(f"   GEMMs {gemm:.2f} ms ({100 * gemm / max(busy, 1e-9):.0f}%), other {busy - gemm:.2f} ms")
    for k, (ms, calls) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:14]:
        print(f"   {ms:9.3f} ms {100 * ms / max(busy, 1e-9):5.1f}%  x{calls:<4d} {k}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="clip,clip_fused,siglip,siglip_fused,infonce,infonce_fused,gram")
    p.add_argument("--device", default="cuda")
    p.add_argument("--n", type=int, default=65536, help="contrastive rows (N = M)")
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--gram", default="32768,2048,131072", help="N,d,V of the Gram-form case")
    args = p.parse_args()
    print(torch.cuda.get_device_name() if args.device == "cuda" else args.device, "torch", torch.__version__)
    for name in args.cases.split(","):
        if name == "gram":
            fn, leaves, useful = gram_case(*map(int, args.gram.split(",")), args.device)
        else:
            fn, leaves, useful = contrastive_case(name.removesuffix("_fused"), args.n, args.d, args.device)
        if name.endswith("_fused"):
            os.environ["FASTLOSS_CONTRASTIVE_FUSED"] = "1"
        run(name, fn, leaves, useful, args.device)
        os.environ.pop("FASTLOSS_CONTRASTIVE_FUSED", None)
        del fn, leaves
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
