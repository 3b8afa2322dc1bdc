"""Benchmark fastloss's sparsemax family against the `entmax` package and the plain-torch (sort-based) forms.

    python bench/bench_sparsemax.py --preset quick --device cpu
    python bench/bench_sparsemax.py --preset target --device cpu     # the issue's N=4096, C=32768 fp32 fwd+bwd

Appends one CSV row per (op, provider, mode, dtype, shape) to bench/results/sparsemax.csv (columns in
bench/README.md) and prints each provider's speedup and memory against the `entmax` package. Activations are
timed as ``p.sum()`` of the map (upstream gradient of ones), the losses with reduction="mean".
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from harness import MODES, Case, Result, append_csv, csv_row, format_table, measure, run_info
from tqdm import tqdm

import fastloss

OPS = ("sparsemax_loss", "entmax15_loss", "sparsemax", "entmax15")
Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _acts(sparsemax, entmax15) -> dict[str, Fn]:
    return {"sparsemax": lambda x, t: sparsemax(x, dim=-1).sum(), "entmax15": lambda x, t: entmax15(x, dim=-1).sum()}


def _fastloss() -> dict[str, Fn]:
    return {"sparsemax_loss": fastloss.sparsemax_loss, "entmax15_loss": fastloss.entmax15_loss,
            **_acts(fastloss.sparsemax, fastloss.entmax15)}


def _reference() -> dict[str, Fn]:
    ref = fastloss.reference
    return {"sparsemax_loss": ref.sparsemax_loss, "entmax15_loss": ref.entmax15_loss,
            **_acts(ref.sparsemax, ref.entmax15)}


def _entmax() -> dict[str, Fn]:
    em = importlib.import_module("entmax")
    return {"sparsemax_loss": lambda x, t: em.sparsemax_loss(x, t).mean(),
            "entmax15_loss": lambda x, t: em.entmax15_loss(x, t).mean(), **_acts(em.sparsemax, em.entmax15)}


PROVIDERS: dict[str, Callable[[], dict[str, Fn]]] = {
    "fastloss": _fastloss,
    "reference": _reference,  # fastloss.reference: the plain-torch sort-based forms
    "entmax": _entmax,  # deep-spin/entmax (sorts each row; its losses keep p* for the backward)
}
BASELINE = "entmax"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass(frozen=True)
class Preset:
    shapes: tuple[tuple[int, int], ...]  # (N, C)
    ops: tuple[str, ...]
    modes: tuple[str, ...]
    min_run_time: float
    min_samples: int


PRESETS = {
    # A few seconds per provider on 2 cores (the sort-based providers dominate).
    ("quick", "cpu"): Preset(((256, 8192),), OPS, ("fwd", "fwdbwd"), 0.1, 3),
    # The target shape; the sort-based providers take tens of seconds per call here.
    ("target", "cpu"): Preset(((4096, 32768),), ("sparsemax_loss", "entmax15_loss"), ("fwdbwd",), 0.1, 2),
    ("quick", "cuda"): Preset(((4096, 32768), (4096, 131072)), OPS, ("fwd", "fwdbwd"), 0.2, 10),
    ("target", "cuda"): Preset(((4096, 32768),), OPS, MODES, 0.5, 20),
}


def input_setup(fn: Fn, case: Case):
    """logits randn(N, C) * 2 in the case's dtype, uniform targets, fixed seed."""
    n, c = case.shape["N"], case.shape["C"]

    def setup(requires_grad: bool):
        gen = torch.Generator(case.device).manual_seed(0)
        logits = (torch.randn(n, c, device=case.device, generator=gen) * 2).to(case.dtype)
        target = torch.randint(c, (n,), device=case.device, generator=gen)
        return fn, (logits.requires_grad_(requires_grad), target)

    return setup


def bytes_moved(case: Case) -> int:
    logits = case.shape["N"] * case.shape["C"] * case.dtype.itemsize
    return logits * {"fwd": 1, "bwd": 2, "fwdbwd": 3}[case.mode]


def table(results: list[tuple[Case, str, Result]]) -> str:
    key = lambda case: (case.op, case.mode, case.dtype_str, case.shape_str)
    base = {key(c): r for c, name, r in results if name == BASELINE}
    rows = []
    for case, name, r in results:
        b = base.get(key(case))
        speed = f"{b.median_ms / r.median_ms:.1f}x" if b else "-"
        mem = f"{r.peak_mem_mb / b.peak_mem_mb:.2f}" if b and b.peak_mem_mb else "-"
        rows.append((*key(case), name, f"{r.median_ms:.1f}", speed, f"{r.peak_mem_mb:.0f}", f"{r.extra_mem_mb:.0f}",
                     mem))
    headers = ("op", "mode", "dtype", "shape", "provider", "median ms", f"vs {BASELINE}", "peak MB", "extra MB",
               f"peak / {BASELINE}")
    return format_table(headers, rows, align="lllllrrrrr")


def main(argv=None):
    csv_list = lambda s: [x for x in s.split(",") if x]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("quick", "target"), default="quick")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", type=csv_list, default=["fp32"])
    p.add_argument("--ops", type=csv_list, help=f"comma list of {', '.join(OPS)} (default: preset's)")
    p.add_argument("--providers", type=csv_list, default=list(PROVIDERS))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sparsemax.csv")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset, args.device]
    providers = {}
    for name in args.providers:
        try:
            providers[name] = PROVIDERS[name]()
        except ImportError as exc:
            print(f"skipped {name}: {exc}")
    print(f"fastloss {fastloss.__version__}, torch {torch.__version__}, device {args.device}, "
          f"threads {torch.get_num_threads()}")
    cases = [Case(op, {"N": n, "C": c}, DTYPES[dt], args.device, mode)
             for dt in args.dtype for n, c in preset.shapes for op in (args.ops or preset.ops) for mode in preset.modes]
    info = run_info(args.device)
    append_csv(args.out, [])
    results, start = [], time.perf_counter()
    for case, name in tqdm([(c, n) for c in cases for n in providers], unit="run", dynamic_ncols=True):
        try:
            r = measure(input_setup(providers[name][case.op], case), case, min_run_time=preset.min_run_time,
                        min_samples=preset.min_samples)
        except Exception as exc:  # a failing provider must not end the sweep
            print(f"\n{case.op} {case.shape_str} {name}: failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            continue
        append_csv(args.out, [csv_row(case, name, r, bytes_moved(case), info)])
        results.append((case, name, r))
    print(f"\n{len(results)} measurements in {time.perf_counter() - start:.0f} s -> {args.out}\n")
    print(table(results))


if __name__ == "__main__":
    main()
