"""Accuracy of the spherical family's row statistics on logits (the Z-loss's mean and spread), against float64.

    python bench/row_stats_accuracy.py                  # the CPU kernels
    python bench/row_stats_accuracy.py --emulate        # the CUDA kernels, emulated on the CPU (tests/cuemu)
    python bench/row_stats_accuracy.py --device cuda    # the CUDA kernels on a GPU

For rows of C standard-normal logits (fp32 and bf16), with and without an outlier first logit (20 std: the
statistics are taken relative to the row's first value), the largest relative error of m2 = Σ (o − mean)² and
the error of d = mean − o_0 in units of the row's std, from `spherical_fwd`'s per-row statistics.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch


def measure(C: int, dtype: torch.dtype, outlier: float | None, device: str, rows: int = 2, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, C, generator=gen).to(dtype)
    if outlier is not None:
        x[:, 0] = outlier
    x = x.to(device)
    t = torch.zeros(rows, 1, dtype=torch.long, device=device)
    _, stats = torch.ops.fastloss.spherical_fwd(x, t, None, 0, 1.0, 0.0, 0.0, -100)
    xd = x.double().cpu()
    stats = stats.double().cpu()
    mean = xd.mean(1)
    m2 = (xd - mean[:, None]).square().sum(1)
    std = (m2 / C).sqrt()
    return {"C": C, "dtype": str(dtype).split(".")[-1], "outlier": outlier or 0.0,
            "m2_rel_err": ((stats[:, 1] - m2) / m2).abs().max().item(),
            "d_err_over_std": ((stats[:, 0] - (mean - xd[:, 0])).abs() / std).max().item()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--emulate", action="store_true", help="the CUDA kernels through tests/cuemu (CPU tensors)")
    p.add_argument("--sizes", default="1000,262144,1048576")
    p.add_argument("--out", type=Path, default=None, help="CSV (default: none)")
    args = p.parse_args(argv)
    if args.emulate:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from cuemu import emulate

        emulate.use_for_cpu()
    import fastloss  # noqa: F401  (registers the ops)

    rows = [measure(int(C), dtype, outlier, args.device) for C in args.sizes.split(",")
            for dtype in (torch.float32, torch.bfloat16) for outlier in (None, 20.0)]
    print(f"{'C':>9s} {'dtype':>9s} {'outlier':>8s} {'m2 rel err':>11s} {'d err / std':>12s}")
    for r in rows:
        print(f"{r['C']:9d} {r['dtype']:>9s} {r['outlier']:8.0f} {r['m2_rel_err']:11.1e} {r['d_err_over_std']:12.1e}")
    if args.out:
        with args.out.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
