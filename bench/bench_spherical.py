"""Benchmark of the spherical Gram form: fastloss.linear_spherical_loss (Z-loss) from hidden states vs the
materialised paths, forward + backward, with peak memory.

Providers (op ``linear_zloss``):
  fastloss      linear_spherical_loss(h, W, t, bias=b, loss="zloss")           ~ V·d² + N·d², no N x V tensor
                (bf16 on CUDA: the raw Gram, one bf16 GEMM over W; fp32: the centred Gram)
  torch         F.linear_cross_entropy(h, W, t, linear_bias=b) (torch's own linear + CE; on a torch without it,
                F.cross_entropy(F.linear(h, W, b), t), which it is defined as)              ~ N·V·d
  materialised  fastloss.zloss(F.linear(h, W, b), t)  (same loss, logits formed)   ~ N·V·d
  fastloss_fp32 the Gram form with bf16_split=False (fp32 products; compares the bf16 hi/lo split on CUDA)
  fastloss_centred    the Gram form with centred_gram=True (bf16: the centred weight split, two GEMMs over W)
  fastloss_bf16wgrad  the Gram form with weight_grad_precision="bf16" (bf16: one GEMM over W and one over the
                hidden states fewer; 4·V·d² + 6·N·d² flops instead of 6·V·d² + 8·N·d²)
  liger, cce    Liger's fused linear cross-entropy and Cut Cross-Entropy (CUDA), when importable

    python bench/bench_spherical.py                      # CPU fp32 N=8192 d=256 V=50000 (issue target shape)
    python bench/bench_spherical.py --sweep --plot       # N and V sweeps, fastloss vs materialised, PNG
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from harness import Case, append_csv, csv_row, format_table, measure, run_info  # noqa: E402

import fastloss  # noqa: E402


def _torch_linear_ce():
    """torch's F.linear_cross_entropy where this torch has it (2.12+), else the same two ops it stands for."""
    if hasattr(F, "linear_cross_entropy"):
        return lambda h, W, b, t: F.linear_cross_entropy(h, W, t, linear_bias=b)
    return lambda h, W, b, t: F.cross_entropy(F.linear(h, W, b), t)


def _liger():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda h, W, b, t: loss(W, h, t, b)


def _cce():
    from cut_cross_entropy import linear_cross_entropy

    return lambda h, W, b, t: linear_cross_entropy(h, W, t)  # CCE takes no bias (the bench's bias is zero)


PROVIDERS = {
    "fastloss": lambda: lambda h, W, b, t: fastloss.linear_spherical_loss(h, W, t, bias=b, loss="zloss"),
    "fastloss_fp32": lambda: lambda h, W, b, t: fastloss.linear_spherical_loss(h, W, t, bias=b, loss="zloss",
                                                                               bf16_split=False),
    "fastloss_centred": lambda: lambda h, W, b, t: fastloss.linear_spherical_loss(h, W, t, bias=b, loss="zloss",
                                                                                  centred_gram=True),
    "fastloss_bf16wgrad": lambda: lambda h, W, b, t: fastloss.linear_spherical_loss(
        h, W, t, bias=b, loss="zloss", weight_grad_precision="bf16"),
    "torch": lambda: _torch_linear_ce(),
    "materialised": lambda: lambda h, W, b, t: fastloss.zloss(F.linear(h, W, b), t),
    "liger": _liger,
    "cce": _cce,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def setup_for(fn, case: Case, ignore_every: int = 0):
    """Inputs (h, W, b, t) of one case; ignore_every = k > 0 marks every k-th target -100 (padding tokens)."""
    N, d, V = case.shape["N"], case.shape["d"], case.shape["V"]

    def setup(requires_grad: bool):
        gen = torch.Generator(case.device).manual_seed(0)
        h = torch.randn(N, d, device=case.device, generator=gen).to(case.dtype).requires_grad_(requires_grad)
        W = (torch.randn(V, d, device=case.device, generator=gen) / d**0.5).to(case.dtype)
        b = torch.zeros(V, device=case.device).to(case.dtype)
        W.requires_grad_(requires_grad)
        b.requires_grad_(requires_grad)
        t = torch.randint(V, (N,), device=case.device, generator=gen)
        if ignore_every:
            t[::ignore_every] = -100
        return fn, (h, W, b, t)

    return setup


def flops(case: Case) -> float:
    """Multiply-adds x 2 of the materialised path (forward + backward: 3 GEMMs of N·V·d)."""
    return 6.0 * case.shape["N"] * case.shape["V"] * case.shape["d"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="fp32 (cpu default) or bf16 (cuda default)")
    p.add_argument("--shapes", default=None, help="comma list of NxdxV (default: the issue's target shape)")
    p.add_argument("--providers", default=None, help="comma list (default: fastloss,torch,materialised; on CUDA "
                   "also fastloss_bf16wgrad, fastloss_centred, fastloss_fp32, liger, cce)")
    p.add_argument("--sweep", action="store_true", help="N in 1k..64k at V=50k and V in 10k..500k at N=8192 "
                   "(d=256), fastloss only, plus the materialised path where it fits")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "spherical.csv")
    p.add_argument("--plot", action="store_true")
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    default = "32768x2048x131072" if args.device == "cuda" else "8192x256x50000"
    shapes = [tuple(map(int, s.split("x"))) for s in (args.shapes or default).split(",")]
    gpu = "fastloss,fastloss_bf16wgrad,fastloss_centred,fastloss_fp32,torch,materialised,liger,cce"
    providers = (args.providers or (gpu if args.device == "cuda" else "fastloss,torch,materialised")).split(",")
    todo = [(n, d, v, prov) for n, d, v in shapes for prov in providers]
    if args.sweep:
        todo = [(n, 256, 50_000, "fastloss") for n in (1024, 4096, 16384, 65536)]
        todo += [(8192, 256, v, "fastloss") for v in (10_000, 50_000, 200_000, 500_000)]
        todo += [(n, 256, 50_000, "materialised") for n in (1024, 4096)]
        todo += [(1024, 256, v, "materialised") for v in (10_000, 50_000)]
    info = run_info(args.device)
    append_csv(args.out, [])
    results = []
    fns = {}
    for prov in {p for *_, p in todo}:
        try:
            fns[prov] = PROVIDERS[prov]()
        except Exception as e:  # optional peers (missing, or failing to import on this machine)
            print(f"skip {prov}: {e}", flush=True)
    for n, d, v, prov in todo:
        if prov not in fns:
            continue
        case = Case("linear_zloss", {"N": n, "d": d, "V": v}, dtype, args.device, "fwdbwd")
        try:
            r = measure(setup_for(fns[prov], case), case, min_run_time=0.5, min_samples=3)
        except torch.OutOfMemoryError:
            print(f"{prov:18s} N={n:6d} d={d:5d} V={v:7d}: out of memory", flush=True)
            continue
        except Exception as e:  # a failing peer must not end the run
            print(f"{prov:18s} N={n:6d} d={d:5d} V={v:7d}: failed: {type(e).__name__}: {e}", flush=True)
            continue
        append_csv(args.out, [csv_row(case, prov, r, 0.0, info)])
        results.append((case, prov, r))
        print(f"{prov:18s} N={n:6d} d={d:5d} V={v:7d}: {r.median_ms:9.1f} ms  peak {r.peak_mem_mb:8.1f} MB  "
              f"extra {r.extra_mem_mb:8.1f} MB", flush=True)
    base = {(c.shape_str, prov): r for c, prov, r in results}
    rows = []
    for c, prov, r in results:
        ref = base.get((c.shape_str, "fastloss"))
        rows.append((c.shape_str, prov, f"{r.median_ms:.1f}", f"{r.extra_mem_mb:.0f}",
                     f"{r.median_ms / ref.median_ms:.1f}x" if ref else "-",
                     f"{r.extra_mem_mb / max(ref.extra_mem_mb, 1e-9):.1f}x" if ref else "-"))
    print()
    print(format_table(("shape", "provider", "fwd+bwd ms", "extra MB", "time / fastloss", "memory / fastloss"), rows,
                       align="llrrrr"))
    if args.plot and args.sweep:
        plot(results, args.out.with_suffix(".png"))


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, var, fixed in ((axes[0], "N", {"V": 50_000}), (axes[1], "V", {"N": 8192 if True else 1024})):
        for prov, style in (("fastloss", "o-"), ("materialised", "s--")):
            pts = sorted((c.shape[var], r.median_ms) for c, p, r in results
                         if p == prov and all(c.shape[k] == val for k, val in fixed.items())
                         or (p == prov == "materialised" and var == "V" and c.shape["N"] == 1024))
            if pts:
                label = prov if not (prov == "materialised" and var == "V") else "materialised (N=1024)"
                ax.loglog(*zip(*pts, strict=True), style, label=label)
        ax.set_xlabel(var)
        ax.set_ylabel("fwd+bwd ms")
        ax.set_title(f"linear Z-loss, d=256, {', '.join(f'{k}={v}' for k, v in fixed.items())}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print("wrote", path)


if __name__ == "__main__":
    main()
