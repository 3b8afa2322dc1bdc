"""Benchmark the stable-softmax family against the plain-PyTorch form of each loss and fastloss.reference.

    python bench/bench_stable_softmax.py                       # CPU, N=4096 C=32768 fp32, fwd+bwd
    python bench/bench_stable_softmax.py --shapes 1024x8192 --ops stablemax,zlpr --modes fwd,fwdbwd

"torch" is the loss as users write it in plain PyTorch (the authors' or the usual reference code, in the logits'
dtype): StableMax as in the Grokking repository (without its float64 upcast), Taylor as in pytorch-loss's
autograd version, GCE / comp-sum as softmax then a power, ZLPR as bert4keras's sign-flip form with ±1e12
masks, DEXML as a masked logsumexp then logaddexp. Speedups and peak memory are relative to it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import MODES, Case, append_csv, csv_row, format_table, measure, run_info
from tqdm import tqdm

import fastloss
from fastloss import reference

TAU, Q, ORDER, K_POS = 0.5, 0.7, 4, 5


def _torch_stablemax(x, t):
    s = torch.where(x >= 0, x + 1, 1 / (1 - x))
    return F.nll_loss(torch.log(s / s.sum(-1, keepdim=True)), t)


def _torch_taylor(x, t, n=ORDER):
    fn, denom = torch.ones_like(x), 1.0
    for i in range(1, n + 1):
        denom *= i
        fn = fn + x.pow(i) / denom
    return F.nll_loss(torch.log(fn / fn.sum(-1, keepdim=True)), t)


def _torch_softplus(x, t):
    p = F.softplus(x)
    return F.nll_loss(torch.log(p / p.sum(-1, keepdim=True)), t)


def _torch_comp_sum(x, t, tau=TAU):
    py = F.softmax(x, -1).gather(1, t[:, None])
    return (((1 / py) ** (1 - tau) - 1) / (1 - tau)).mean()


def _torch_gce(x, t, q=Q):
    py = F.softmax(x, -1).gather(1, t[:, None])
    return ((1 - py**q) / q).mean()


def _torch_zlpr(x, y):  # y: float 0/1 mask
    s = (1 - 2 * y) * x
    neg = s - y * 1e12
    pos = s - (1 - y) * 1e12
    zeros = torch.zeros_like(s[:, :1])
    return (torch.logsumexp(torch.cat([neg, zeros], -1), -1) + torch.logsumexp(torch.cat([pos, zeros], -1), -1)).mean()


def _torch_dexml(x, mask):
    lse_n = torch.logsumexp(x.masked_fill(mask, float("-inf")), -1, keepdim=True)
    per = torch.logaddexp(x, lse_n) - x
    rows = (per * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return rows[mask.any(-1)].mean()


# op -> (target kind, {provider: loss(logits, target)})
OPS = {
    "stablemax": ("index", {"fastloss": fastloss.stablemax_cross_entropy,
                            "reference": reference.stablemax_cross_entropy, "torch": _torch_stablemax}),
    "taylor": ("index", {"fastloss": lambda x, t: fastloss.taylor_softmax_loss(x, t, order=ORDER),
                         "reference": lambda x, t: reference.taylor_softmax_loss(x, t, order=ORDER),
                         "torch": _torch_taylor}),
    "softplus": ("index", {"fastloss": fastloss.softplus_cross_entropy,
                           "reference": reference.softplus_cross_entropy, "torch": _torch_softplus}),
    "comp_sum": ("index", {"fastloss": lambda x, t: fastloss.comp_sum_loss(x, t, tau=TAU),
                           "reference": lambda x, t: reference.comp_sum_loss(x, t, tau=TAU),
                           "torch": _torch_comp_sum}),
    "gce": ("index", {"fastloss": lambda x, t: fastloss.generalized_cross_entropy(x, t, q=Q),
                      "reference": lambda x, t: reference.generalized_cross_entropy(x, t, q=Q),
                      "torch": _torch_gce}),
    "zlpr": ("mask", {"fastloss": fastloss.zlpr_loss, "reference": reference.zlpr_loss, "torch": _torch_zlpr}),
    "dexml": ("mask", {"fastloss": fastloss.decoupled_softmax_loss, "reference": reference.decoupled_softmax_loss,
                       "torch": _torch_dexml}),
}
PROVIDERS = ("fastloss", "reference", "torch")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def input_setup(fn, case: Case, target_kind: str, provider: str):
    n, c = case.shape["N"], case.shape["C"]

    def setup(requires_grad: bool):
        gen = torch.Generator(case.device).manual_seed(0)
        logits = (torch.randn(n, c, device=case.device, generator=gen) * 2).to(case.dtype)
        logits.requires_grad_(requires_grad)
        if target_kind == "index":
            target = torch.randint(c, (n,), device=case.device, generator=gen)
        else:  # K_POS positives per row, as a bool mask (a float 0/1 mask for bert4keras's ZLPR)
            idx = torch.randint(c, (n, K_POS), device=case.device, generator=gen)
            target = torch.zeros(n, c, dtype=torch.bool, device=case.device).scatter_(1, idx, True)
            if provider == "torch" and case.op == "zlpr":
                target = target.to(case.dtype)
        return fn, (logits, target)

    return setup


def main(argv=None):
    csv_list = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--shapes", type=lambda s: [tuple(map(int, x.split("x"))) for x in csv_list(s)],
                   default=[(4096, 32768)], help="comma list of NxC (default 4096x32768)")
    p.add_argument("--ops", type=csv_list, default=list(OPS))
    p.add_argument("--modes", type=csv_list, default=["fwdbwd"], help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--providers", type=csv_list, default=["fastloss", "torch"],
                   help=f"comma list of {', '.join(PROVIDERS)}")
    p.add_argument("--min-run-time", type=float, default=0.2)
    p.add_argument("--min-samples", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "stable_softmax.csv")
    args = p.parse_args(argv)
    for name, given, allowed in (("ops", args.ops, OPS), ("modes", args.modes, MODES),
                                 ("providers", args.providers, PROVIDERS)):
        if bad := set(given) - set(allowed):
            p.error(f"--{name}: unknown {sorted(bad)}; choose from {list(allowed)}")

    print(f"fastloss {fastloss.__version__}, torch {torch.__version__}, {args.device}, "
          f"{torch.get_num_threads()} threads")
    info = run_info(args.device)
    append_csv(args.out, [])
    todo = [(Case(op, {"N": n, "C": c}, DTYPES[args.dtype], args.device, mode), prov)
            for n, c in args.shapes for op in args.ops for mode in args.modes for prov in args.providers]
    results, start = [], time.perf_counter()
    for case, prov in (bar := tqdm(todo, unit="run", dynamic_ncols=True)):
        bar.set_postfix_str(f"{case.op} {case.mode} {prov}")
        kind, fns = OPS[case.op]
        r = measure(input_setup(fns[prov], case, kind, prov), case, min_run_time=args.min_run_time,
                    min_samples=args.min_samples)
        nbytes = case.shape["N"] * case.shape["C"] * case.dtype.itemsize * {"fwd": 1, "bwd": 2, "fwdbwd": 3}[case.mode]
        append_csv(args.out, [csv_row(case, prov, r, nbytes, info)])
        results.append((case, prov, r))
    print(f"\n{len(results)} measurements in {time.perf_counter() - start:.0f} s -> {args.out}\n")
    key = lambda c: (c.op, c.mode, c.shape_str)  # noqa: E731
    base = {key(c): r for c, prov, r in results if prov == "torch"}
    rows = []
    for c, prov, r in results:
        b = base.get(key(c))
        speed = f"{b.median_ms / r.median_ms:.2f}x" if b else "-"
        mem = f"{r.peak_mem_mb / b.peak_mem_mb:.2f}" if b and b.peak_mem_mb > 0 else "-"
        rows.append((*key(c), prov, f"{r.median_ms:.1f}", speed, f"{r.peak_mem_mb:.0f}", mem))
    print(format_table(("op", "mode", "shape", "provider", "median ms", "vs torch", "peak MB", "peak / torch"),
                       rows, align="llllrrrr"))


if __name__ == "__main__":
    main()
