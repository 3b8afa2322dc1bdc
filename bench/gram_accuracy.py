"""Accuracy of the Gram form for bf16 inputs against the logits' shared mean: the centred Gram, the raw Gram
(``centred_gram=False``, the bf16 default) and the loss of bf16-materialised logits, each against the float64
reference on the same bf16 inputs.

    python bench/gram_accuracy.py                 # CPU (the bf16 split emulated exactly in fp32)
    python bench/gram_accuracy.py --device cuda   # the bf16 tensor-core GEMMs

The raw Gram WᵀW − V·m mᵀ cancels when the logits' mean μ is large against their spread σ: its error grows with
(μ² + σ²) / σ² (the ``ratio`` column, the worst row). Columns: the largest per-row loss error relative to the
largest reference loss, for the Gram form's fp32 per-row losses (before the output's bf16 rounding, 4e-3) and for
``loss(F.linear(h, W).float())``, which is what a bf16 model computes without fastloss. ``W`` has rows
N(0, 1/d) plus ``shift`` times a shared random direction of the same norm.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
import torch.nn.functional as F

import fastloss
from fastloss import reference
from fastloss.linear_spherical import _LinearSpherical
from fastloss.spherical import DEFAULT_EPS, KINDS

MATERIALISED = {"zloss": fastloss.zloss, "spherical_softmax": fastloss.spherical_softmax_loss,
                "taylor_softmax": fastloss.taylor_softmax_loss, "mse": fastloss.spherical_mse_loss}


def measure(loss: str, shift: float, N: int, d: int, V: int, device: str, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(V, d, generator=gen, dtype=torch.float64) / d**0.5
    W = (W + shift * torch.randn(d, generator=gen, dtype=torch.float64) / d**0.5).bfloat16().to(device)
    h = torch.randn(N, d, generator=gen, dtype=torch.float64).bfloat16().to(device)
    t = torch.randint(0, V, (N,), generator=gen).to(device)
    o = h.double() @ W.double().t()
    want = reference.linear_spherical_loss(h.double(), W.double(), t, loss=loss, reduction="none")
    scale = want.abs().max()
    row = {"loss": loss, "shift": shift,
           "ratio": (o.square().mean(-1) / o.var(-1, correction=0)).max().item()}
    for name, centred in (("centred", True), ("raw", False)):
        got, _ = _LinearSpherical.apply(h, W, None, t[:, None], None, KINDS[loss], 1.0, 0.0, DEFAULT_EPS, -100,
                                        None, False, True, centred)
        row[name] = ((got.double() - want).abs().max() / scale).item()
    got = MATERIALISED[loss](F.linear(h, W).float(), t, reduction="none")
    row["materialised_bf16"] = ((got.double() - want).abs().max() / scale).item()
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default="256x256x32768", help="NxdxV")
    p.add_argument("--out", type=Path, default=None, help="CSV (default bench/results/gram_accuracy_<device>.csv)")
    args = p.parse_args(argv)
    N, d, V = map(int, args.shape.split("x"))
    out = args.out or Path(__file__).parent / "results" / f"gram_accuracy_{args.device}.csv"
    rows = [measure(loss, shift, N, d, V, args.device)
            for loss in ("zloss", "spherical_softmax", "taylor_softmax", "mse")
            for shift in (0.0, 1.0, 3.0, 10.0, 30.0, 100.0)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"N={N} d={d} V={V} bf16, {args.device}: max per-row loss error / max loss vs float64 -> {out}")
    print(f"{'loss':18s} {'shift':>6s} {'ratio':>9s} {'centred':>9s} {'raw':>9s} {'bf16 logits':>11s}")
    for r in rows:
        print(f"{r['loss']:18s} {r['shift']:6.1f} {r['ratio']:9.3g} {r['centred']:9.2e} {r['raw']:9.2e} "
              f"{r['materialised_bf16']:11.2e}")


if __name__ == "__main__":
    main()
