"""Benchmark of fastloss.linear_cross_entropy (LM head + cross-entropy, logits formed chunk by chunk) against
torch's F.linear_cross_entropy (materialised, and its opt-in chunked path) and the fused peers, forward +
backward, with peak memory.

Providers (op ``linear_ce``; every one computes the same mean cross-entropy of h Wᵀ + b):
  fastloss            linear_cross_entropy(h, W, t, linear_bias=b): gradients formed in the forward, 3 GEMMs
  fastloss_recompute  the same with return_lse=True (the recomputing schedule: 4 GEMMs, 12 bytes per row kept)
  torch               F.linear_cross_entropy(h, W, t, linear_bias=b)       (the N x V logits, and their gradient;
                      before torch 2.12 F.cross_entropy(F.linear(h, W, b), t), which it is defined as)
  torch_chunked       the same with options=nn.LinearCrossEntropyOptions() (torch's batch-chunked op, 2.12+)
  materialised        fastloss.cross_entropy(F.linear(h, W, b), t)
  liger, cce          Liger's fused linear cross-entropy and Cut Cross-Entropy (CUDA), when importable

    python bench/bench_linear_ce.py                 # CPU fp32 N=2048 d=512 V=32768; CUDA bf16 N=16384 d=4096 V=128256
    python bench/bench_linear_ce.py --shapes 4096x1024x50304 --providers fastloss,torch
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_spherical import _cce, _liger, _torch_linear_ce, setup_for  # noqa: E402
from harness import Case, append_csv, csv_row, format_table, measure, run_info  # noqa: E402

import fastloss  # noqa: E402


def _torch_chunked():
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda h, W, b, t: F.linear_cross_entropy(h, W, t, linear_bias=b, options=options)


PROVIDERS = {
    "fastloss": lambda: lambda h, W, b, t: fastloss.linear_cross_entropy(h, W, t, linear_bias=b),
    "fastloss_recompute": lambda: lambda h, W, b, t: fastloss.linear_cross_entropy(h, W, t, linear_bias=b,
                                                                                   return_lse=True)[0],
    "torch": _torch_linear_ce,
    "torch_chunked": _torch_chunked,
    "materialised": lambda: lambda h, W, b, t: fastloss.cross_entropy(F.linear(h, W, b), t),
    "liger": _liger,
    "cce": _cce,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="fp32 (cpu default) or bf16 (cuda default)")
    p.add_argument("--shapes", default=None, help="comma list of NxdxV")
    p.add_argument("--providers", default=None, help="comma list (default: fastloss,fastloss_recompute,torch,"
                   "torch_chunked,materialised; on CUDA also liger, cce)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "linear_ce.csv")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    default = "16384x4096x128256" if args.device == "cuda" else "2048x512x32768"
    shapes = [tuple(map(int, s.split("x"))) for s in (args.shapes or default).split(",")]
    providers = "fastloss,fastloss_recompute,torch,torch_chunked,materialised"
    providers = (args.providers or (providers + (",liger,cce" if args.device == "cuda" else ""))).split(",")
    info = run_info(args.device)
    append_csv(args.out, [])
    fns = {}
    for prov in providers:
        try:
            fns[prov] = PROVIDERS[prov]()
        except Exception as e:  # optional peers (missing, or failing to import on this machine)
            print(f"skip {prov}: {e}", flush=True)
    results = []
    for n, d, v in shapes:
        for prov in providers:
            if prov not in fns:
                continue
            case = Case("linear_ce", {"N": n, "d": d, "V": v}, dtype, args.device, "fwdbwd")
            try:
                r = measure(setup_for(fns[prov], case, ignore_every=7), case, min_run_time=0.5, min_samples=3)
            except torch.OutOfMemoryError:
                print(f"{prov:18s} N={n} d={d} V={v}: out of memory", flush=True)
                continue
            except Exception as e:  # a failing peer must not end the run
                print(f"{prov:18s} N={n} d={d} V={v}: failed: {type(e).__name__}: {e}", flush=True)
                continue
            append_csv(args.out, [csv_row(case, prov, r, 0.0, info)])
            results.append((case, prov, r))
            print(f"{prov:18s} N={n} d={d} V={v}: {r.median_ms:9.1f} ms  extra {r.extra_mem_mb:8.1f} MB", flush=True)
    base = {c.shape_str: r for c, prov, r in results if prov == "torch"}
    rows = []
    for c, prov, r in results:
        ref = base.get(c.shape_str)
        rows.append((c.shape_str, prov, f"{r.median_ms:.1f}", f"{r.extra_mem_mb:.0f}",
                     f"{ref.median_ms / r.median_ms:.2f}x" if ref else "-",
                     f"{r.extra_mem_mb / max(ref.extra_mem_mb, 1e-9):.2f}" if ref else "-"))
    print()
    print(format_table(("shape", "provider", "fwd+bwd ms", "extra MB", "speed vs torch", "memory / torch"), rows,
                       align="llrrrr"))


if __name__ == "__main__":
    main()
