"""GPU roofline check of the row kernels: achieved bandwidth against the device's own copy bandwidth.

bytes: forward = logits read; backward = logits read + gradient written (per-row statistics are negligible).
Each op is timed alone (torch.ops.fastloss.*) with CUDA events, median of `--iters` launches after warm-up.

    python bench/bench_bandwidth.py --out bench/results/bandwidth_h200.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys

import torch

import fastloss

ops = torch.ops.fastloss


def time_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(nbytes: int, iters: int) -> float:
    """GB/s of a device-to-device copy, counting bytes read and written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / time_ms(lambda: dst.copy_(src), iters) / 1e6


def measure_cases(x, t, iters):
    """(op, mode, ms, bytes) of the four row ops on one logits tensor."""
    nb = x.numel() * x.element_size()
    parts, stats = ops.cross_entropy_fwd(x, t, None, None, 0.0, 1.0, 0.0, -100, False)
    g = torch.ones_like(parts)
    t1 = t.view(-1, 1)  # the spherical ops take (N, K) targets; kind 0 = Z-loss (a=1, b=0, eps unused)
    zl, zst = ops.spherical_fwd(x, t1, None, 0, 1.0, 0.0, 0.0, -100)
    gz = torch.ones_like(zl)
    ce_opts = (1.0, 0.0, -100, False)  # logit_scale, softcap, ignore_index, with_smoothing
    cases = [
        ("cross_entropy", "fwd", nb, lambda: ops.cross_entropy_fwd(x, t, None, None, 0.0, *ce_opts)),
        ("cross_entropy", "bwd", 2 * nb, lambda: ops.cross_entropy_bwd(g, x, t, None, stats, *ce_opts)),
        ("zloss", "fwd", nb, lambda: ops.spherical_fwd(x, t1, None, 0, 1.0, 0.0, 0.0, -100)),
        ("zloss", "bwd", 2 * nb, lambda: ops.spherical_bwd(gz, x, t1, None, zst, 0, 1.0, 0.0, 0.0, -100)),
    ]
    return [(op, mode, time_ms(fn, iters), nbytes) for op, mode, nbytes, fn in cases]


def run(args) -> list[dict]:
    dev = torch.cuda.get_device_name()
    peak = copy_bandwidth(args.elements * 2, args.iters)
    knob = os.environ.get("FASTLOSS_ROW_PACKS_PER_THREAD", "default")
    light = os.environ.get("FASTLOSS_CE_LIGHT", "default")
    prefetch = os.environ.get("FASTLOSS_ROW_PREFETCH", "default")
    print(f"{dev}: device copy {peak:.0f} GB/s (read + write); packs per thread: {knob}; CE light loop: {light}; "
          f"L2 prefetch: {prefetch}")
    rows = []
    for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
        for C in [int(c) for c in args.classes.split(",")]:
            N = max(1, args.elements // C)
            x = torch.randn(N, C, device="cuda", dtype=dtype) * 2
            t = torch.randint(0, C, (N,), device="cuda")
            for op, mode, ms, nbytes in measure_cases(x, t, args.iters):
                gbps = nbytes / ms / 1e6
                rows.append({"device": dev, "op": op, "mode": mode, "dtype": str(dtype).replace("torch.", ""),
                             "N": N, "C": C, "median_ms": round(ms, 4), "gbps": round(gbps, 1),
                             "copy_gbps": round(peak, 1), "fraction_of_copy": round(gbps / peak, 3),
                             "packs_per_thread": knob, "ce_light": light, "row_prefetch": prefetch,
                             "fastloss_version": fastloss.__version__,
                             "torch_version": torch.__version__})
                print(f"{op:14s} {mode} {rows[-1]['dtype']:9s} N={N:6d} C={C:6d} {ms:8.3f} ms "
                      f"{gbps:7.0f} GB/s  {gbps / peak:6.1%} of copy")
            del x, t
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--elements", type=int, default=1 << 28, help="N*C per case (default 2^28)")
    p.add_argument("--classes", default="32768,65536,131072,262144")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--sweep", default="", help="packs-per-thread values (comma list), one subprocess each")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.sweep:
        argv = ["--elements", str(args.elements), "--classes", args.classes, "--dtypes", args.dtypes,
                "--iters", str(args.iters)] + (["--out", args.out] if args.out else [])
        for v in args.sweep.split(","):
            env = {**os.environ, "FASTLOSS_ROW_PACKS_PER_THREAD": v}
            subprocess.run([sys.executable, __file__, *argv], env=env, check=False)
        return
    rows = run(args)
    if args.out:
        new = not os.path.exists(args.out)
        with open(args.out, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
