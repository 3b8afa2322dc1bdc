"""Accuracy of the Gram form against the logits' shared mean, each result against the float64 materialised
reference on the same (rounded) inputs.

    python bench/gram_accuracy.py                  # bf16 and fp32 tables, CPU (bf16 split emulated exactly)
    python bench/gram_accuracy.py --device cuda    # the same on the GPU (bf16 tensor-core GEMMs)

``W`` has rows N(0, 1/d) plus ``shift`` times a shared random direction of the same norm; ``ratio`` is the
largest (μ² + σ²) / σ² over rows of the logits (mean μ, spread σ). Errors: largest absolute error relative to
the largest reference value.

bf16 table (N=256, d=256, V=32768; the per-row losses only): the Gram form's fp32 per-row losses (before the
output's bf16 rounding, 4e-3) with the centred Gram and with the raw Gram WᵀW − V·m mᵀ (the bf16 default, whose
subtraction cancels as the ratio grows), and ``loss(F.linear(h, W).float())``: what a bf16 model computes
without fastloss.

fp32 table (N=64, d=16, V=301, bias; loss and the hidden / weight gradients): ``linear_spherical_loss`` (the
centred Gram) against the same loss of fp32 logits rounded once from exact values, the best a materialised fp32
computation can do (its hidden gradient through an fp32 matmul, as autograd's would be).

bf16 weight-gradient table (N=256, d=256, V=8192, bf16 inputs, the split path): the weight gradient of
``linear_spherical_loss`` with ``weight_grad_precision="fp32"`` (the default: split d×d factor) and ``"bf16"``
(rounded once, one GEMM fewer over W and over the hidden states), and of bf16-materialised logits (``F.linear``,
then the loss, autograd), as norm-wise relative errors (‖got − want‖ / ‖want‖): over the rows no target names
(only the dense part 2·W_c·Hᵀdiag(a)H, where the two precisions differ) and over all rows.
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

LOSSES = ("zloss", "spherical_softmax", "taylor_softmax", "mse")
MATERIALISED = {"zloss": fastloss.zloss, "spherical_softmax": fastloss.spherical_softmax_loss,
                "taylor_softmax": fastloss.taylor_softmax_loss, "mse": fastloss.spherical_mse_loss}


def _problem(shift, N, d, V, dtype, device, seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(V, d, generator=gen, dtype=torch.float64) / d**0.5
    W = W + shift * torch.randn(d, generator=gen, dtype=torch.float64) / d**0.5
    h = torch.randn(N, d, generator=gen, dtype=torch.float64)
    b = torch.randn(V, generator=gen, dtype=torch.float64) * 0.3 if bias else None
    t = torch.randint(0, V, (N,), generator=gen)
    cast = lambda x: None if x is None else x.to(dtype).to(device)  # noqa: E731
    return cast(h), cast(W), cast(b), t.to(device)


def _ratio(o):
    return (o.square().mean(-1) / o.var(-1, correction=0)).max().item()


def _err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def measure(loss: str, shift: float, N: int, d: int, V: int, device: str, seed: int = 0) -> dict:
    """bf16 inputs: per-row loss errors of the centred Gram, the raw Gram and bf16-materialised logits."""
    h, W, _, t = _problem(shift, N, d, V, torch.bfloat16, device, seed)
    want = reference.linear_spherical_loss(h.double(), W.double(), t, loss=loss, reduction="none")
    row = {"loss": loss, "shift": shift, "ratio": _ratio(h.double() @ W.double().t())}
    for name, centred in (("centred", True), ("raw", False)):
        got, _ = _LinearSpherical.apply(h, W, None, t[:, None], None, KINDS[loss], 1.0, 0.0, DEFAULT_EPS, -100,
                                        None, False, True, centred)
        row[name] = _err(got, want)
    row["materialised_bf16"] = _err(MATERIALISED[loss](F.linear(h, W).float(), t, reduction="none"), want)
    return row


def measure_fp32(loss: str, shift: float, N: int, d: int, V: int, device: str, seed: int = 0) -> dict:
    """fp32 inputs: loss, hidden- and weight-gradient errors of linear_spherical_loss, and loss and hidden-gradient
    errors of fp32 logits rounded once from exact values."""
    h, W, b, t = _problem(shift, N, d, V, torch.float32, device, seed, bias=True)
    up = torch.linspace(0.5, 1.5, N, dtype=torch.float64, device=device)

    def run(fn, *xs):
        leaves = [x.clone().requires_grad_() for x in xs]
        out = fn(*leaves)
        return (out.detach(), *torch.autograd.grad(out, leaves, up.to(out.dtype)))

    want, gh, gW = run(lambda x, w: reference.linear_spherical_loss(x, w, t, bias=b.double(), loss=loss,
                                                                    reduction="none"), h.double(), W.double())
    got, hh, hW = run(lambda x, w: fastloss.linear_spherical_loss(x, w, t, bias=b, loss=loss, reduction="none"), h, W)
    o = h.double() @ W.double().t() + b.double()
    lo, lg = run(lambda z: MATERIALISED[loss](z, t, reduction="none"), o.float())
    return {"loss": loss, "shift": shift, "ratio": _ratio(o), "gram_loss": _err(got, want),
            "gram_grad_hidden": _err(hh, gh), "gram_grad_weight": _err(hW, gW), "logits_fp32_loss": _err(lo, want),
            "logits_fp32_grad_hidden": _err(lg @ W, gh)}


def _norm_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def measure_weight_grad(loss: str, shift: float, N: int, d: int, V: int, device: str, seed: int = 0) -> dict:
    """bf16 inputs: weight-gradient errors of both weight_grad_precision settings and of bf16-materialised
    logits, over the untargeted rows and over all rows."""
    h, W, _, t = _problem(shift, N, d, V, torch.bfloat16, device, seed)

    def grad_w(fn, w):
        w = w.clone().requires_grad_()
        return torch.autograd.grad(fn(w), w)[0]

    want = grad_w(lambda w: reference.linear_spherical_loss(h.double(), w, t, loss=loss, reduction="sum"),
                  W.double())
    free = torch.ones(V, dtype=torch.bool, device=device)
    free[t] = False
    row = {"loss": loss, "shift": shift, "ratio": _ratio(h.double() @ W.double().t())}
    for prec in ("fp32", "bf16"):
        got = grad_w(lambda w, p=prec: fastloss.linear_spherical_loss(h, w, t, loss=loss, reduction="sum",
                                                                      bf16_split=True, weight_grad_precision=p), W)
        row[f"{prec}_untargeted"], row[f"{prec}_all"] = _norm_err(got[free], want[free]), _norm_err(got, want)
    got = grad_w(lambda w: MATERIALISED[loss](F.linear(h, w), t, reduction="sum"), W)
    row["materialised_bf16_untargeted"], row["materialised_bf16_all"] = _norm_err(got[free], want[free]), \
        _norm_err(got, want)
    return row


def _write(rows, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _print(rows, title):
    print(title)
    keys = list(rows[0])
    print("  ".join(f"{k:>18s}" if i else f"{k:18s}" for i, k in enumerate(keys)))
    for r in rows:
        print("  ".join(f"{r[k]:18s}" if i == 0 else f"{r[k]:18.3g}" for i, k in enumerate(keys)))
    print()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default="256x256x32768", help="NxdxV of the bf16 table")
    p.add_argument("--out", type=Path, default=None,
                   help="CSV of the bf16 table (default bench/results/gram_accuracy_<device>.csv); the fp32 and "
                        "weight-gradient tables go beside it with the suffixes _fp32 and _wgrad")
    args = p.parse_args(argv)
    N, d, V = map(int, args.shape.split("x"))
    out = args.out or Path(__file__).parent / "results" / f"gram_accuracy_{args.device}.csv"
    bf16 = [measure(loss, s, N, d, V, args.device) for loss in LOSSES for s in (0.0, 1.0, 3.0, 10.0, 30.0, 100.0)]
    fp32 = [measure_fp32(loss, s, 64, 16, 301, args.device) for loss in LOSSES
            for s in (3.0, 30.0, 100.0, 300.0, 1000.0, 10000.0)]
    wgrad = [measure_weight_grad(loss, s, 256, 256, 8192, args.device) for loss in LOSSES for s in (0.0, 3.0, 30.0)]
    _write(bf16, out)
    _write(fp32, out.with_name(out.stem + "_fp32.csv"))
    _write(wgrad, out.with_name(out.stem + "_wgrad.csv"))
    _print(bf16, f"bf16, N={N} d={d} V={V}, {args.device}: largest per-row loss error / largest loss")
    _print(fp32, f"fp32, N=64 d=16 V=301 with bias, {args.device}: largest error / largest reference value")
    _print(wgrad, f"bf16 weight gradient, N=256 d=256 V=8192, {args.device}: norm-wise relative error")


if __name__ == "__main__":
    main()
