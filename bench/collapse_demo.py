"""Softmax Collapse (Prieto et al., ICLR 2025) vs the logit gap: the fraction of rows whose float32 loss is
exactly 0 for torch's softmax cross-entropy, fastloss.cross_entropy (rest mass kept apart from the maximum) and
fastloss.stablemax_cross_entropy, plus the fraction whose float32 softmax normaliser rounds to exactly 1.

    python bench/collapse_demo.py            # -> bench/results/softmax_collapse.{png,csv}

Rows: C = 113 classes (the paper's modular-addition task), non-target logits ~ N(0, 1), target logit = row
maximum + gap.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

import fastloss


def sweep(gaps, n_rows: int, num_classes: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for gap in gaps:
        x = torch.randn(n_rows, num_classes, generator=gen)
        t = torch.randint(0, num_classes, (n_rows,), generator=gen)
        x[torch.arange(n_rows), t] = x.amax(-1) + gap
        out.append({"gap": float(gap), **fastloss.softmax_collapse_stats(x, t)})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--classes", type=int, default=113)
    p.add_argument("--max-gap", type=float, default=120.0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "softmax_collapse.png")
    args = p.parse_args(argv)
    gaps = torch.linspace(0, args.max_gap, 121).tolist()
    rows = sweep(gaps, args.rows, args.classes)
    with args.out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    g = [r["gap"] for r in rows]
    series = [
        ("softmax_collapse", "torch fp32: normaliser == 1 (SC)", ":"),
        ("zero_loss", "torch F.cross_entropy fp32: loss == 0", "-"),
        ("fastloss_zero_loss", "fastloss.cross_entropy fp32: loss == 0", "--"),
        ("stablemax_zero_loss", "fastloss.stablemax_cross_entropy fp32: loss == 0", "-."),
    ]
    for key, label, style in series:
        ax.plot(g, [r[key] for r in rows], style, label=label, linewidth=2)
    ax.set_xlabel("logit gap (target − largest other logit)")
    ax.set_ylabel("fraction of rows")
    ax.set_title(f"Softmax Collapse vs logit gap ({args.rows} rows, C = {args.classes}, float32)")
    ax.legend(fontsize=8, loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print("wrote", args.out, "and", args.out.with_suffix(".csv"))
    for r in rows[:: len(rows) // 12]:
        print(f"gap {r['gap']:6.1f}: SC {r['softmax_collapse']:.3f}  torch 0-loss {r['zero_loss']:.3f}  "
              f"fastloss 0-loss {r['fastloss_zero_loss']:.3f}  stablemax 0-loss {r['stablemax_zero_loss']:.3f}")


if __name__ == "__main__":
    main()
