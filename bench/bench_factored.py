"""Time per SGD step of an output layer: the factored spherical layer vs dense layers, CPU (or GPU).

Providers, each a full step (forward, backward, weight update) on a batch of hidden states:
  factored          fastloss.FactoredSphericalLinear(d, V, loss="zloss"): loss, backward, sgd_step
  dense_softmax     nn.Linear(d, V) + F.cross_entropy + torch.optim.SGD
  dense_zloss       nn.Linear(d, V) + fastloss.zloss (materialised logits) + torch.optim.SGD

    python bench/bench_factored.py                    # V in 10k, 100k, 800k; d in 128, 512; batch 128
    python bench/bench_factored.py --plot             # also bench/results/factored_speedup.png
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from harness import format_table, run_info  # noqa: E402

import fastloss  # noqa: E402


def make_step(provider: str, V: int, d: int, batch: int, device: str, dtype: torch.dtype):
    gen = torch.Generator(device).manual_seed(0)
    h = torch.randn(batch, d, device=device, dtype=dtype, generator=gen).requires_grad_()
    t = torch.randint(V, (batch,), device=device, generator=gen)
    lr = 0.01
    if provider == "factored":
        layer = fastloss.FactoredSphericalLinear(d, V, loss="zloss", device=device, dtype=dtype)

        def step():
            layer(h, t).backward()
            layer.sgd_step(lr)
            h.grad = None
    else:
        lin = torch.nn.Linear(d, V, device=device, dtype=dtype)
        opt = torch.optim.SGD(lin.parameters(), lr=lr)
        loss_fn = F.cross_entropy if provider == "dense_softmax" else fastloss.zloss

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(lin(h), t).backward()
            opt.step()
            h.grad = None
    return step


def time_step(step, device: str, min_time: float, min_steps: int) -> list[float]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step()  # warm-up (first touch of the weight gradient, lazy init)
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < min_steps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--V", default="10000,100000,800000")
    p.add_argument("--d", default="128,512")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--providers", default="factored,dense_softmax,dense_zloss")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed steps per case")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "factored.csv")
    p.add_argument("--plot", action="store_true")
    args = p.parse_args(argv)
    info = run_info(args.device)
    results = {}
    for d in map(int, args.d.split(",")):
        for V in map(int, args.V.split(",")):
            for prov in args.providers.split(","):
                step = make_step(prov, V, d, args.batch, args.device, torch.float32)
                ts = time_step(step, args.device, args.min_time, 3)
                del step
                results[prov, V, d] = statistics.median(ts) * 1e3
                print(f"{prov:14s} V={V:7d} d={d:4d} batch={args.batch}: {results[prov, V, d]:10.2f} ms/step "
                      f"({len(ts)} steps)", flush=True)
    rows = []
    for (prov, V, d), ms in results.items():
        fac = results.get(("factored", V, d))
        rows.append((prov, V, d, f"{ms:.2f}", f"{ms / fac:.1f}x" if fac else "-"))
    print()
    print(format_table(("provider", "V", "d", "ms/step", "time / factored"), rows, align="lrrrr"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new = not args.out.exists()
    with args.out.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["provider", "V", "d", "batch", "device", "ms_per_step", *info])
        for (prov, V, d), ms in results.items():
            w.writerow([prov, V, d, args.batch, args.device, f"{ms:.4g}", *info.values()])
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for d in sorted({k[2] for k in results}):
            for prov, style in (("dense_softmax", "o-"), ("dense_zloss", "s--")):
                pts = [(V, results[prov, V, d] / results["factored", V, d]) for (p_, V, dd) in results
                       if p_ == prov and dd == d and ("factored", V, d) in results]
                if pts:
                    ax.loglog(*zip(*sorted(pts), strict=True), style, label=f"vs {prov}, d={d}")
        ax.set_xlabel("V (classes)")
        ax.set_ylabel("speedup of the factored SGD step")
        ax.set_title(f"factored spherical layer, batch {args.batch}, {args.device}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        png = args.out.with_name("factored_speedup.png")
        fig.savefig(png, dpi=120)
        print("wrote", png)


if __name__ == "__main__":
    main()
