"""Benchmark fastloss's row losses (cross_entropy with class-index and probability targets, zloss) against torch,
the pure-torch reference and peers.

    python bench/bench_row_losses.py --preset quick --device cpu --plot
    python bench/bench_row_losses.py --preset full --device cuda --out bench/results/cuda.csv --plot

Appends one CSV row per (op, provider, mode, dtype, shape) and prints each provider's speedup over
``torch.nn.functional.cross_entropy``, which is the baseline for every op: it is what a user would otherwise
run. See bench/README.md for the columns.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import MODES, Case, Result, append_csv, csv_row, format_table, measure, run_info
from tqdm import tqdm

import fastloss

OPS = ("cross_entropy", "cross_entropy_prob", "zloss")  # cross_entropy_prob: (N, C) probability targets
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _compiled_reference() -> dict[str, LossFn]:
    # Specialised per shape, dtype and grad mode: a sweep needs more than dynamo's default 8 recompiles, past
    # which it would silently run eager. The reference checks targets with a host sync, a known graph break
    # that dynamo warns about at length.
    torch._dynamo.config.recompile_limit = 256
    torch._logging.set_logs(dynamo=logging.ERROR)
    return {op: torch.compile(fn, dynamic=False) for op, fn in _reference().items()}


def _reference() -> dict[str, LossFn]:
    ref = fastloss.reference
    return {"cross_entropy": ref.cross_entropy, "cross_entropy_prob": ref.cross_entropy, "zloss": ref.zloss}


def _liger() -> dict[str, LossFn]:
    # Liger writes the gradient into the logits during the forward; its backward only rescales it.
    return {"cross_entropy": importlib.import_module("liger_kernel.transformers").LigerCrossEntropyLoss()}


def _flash_attn() -> dict[str, LossFn]:
    return {"cross_entropy": importlib.import_module("flash_attn.losses.cross_entropy").CrossEntropyLoss()}


# provider -> builder of {op: loss(logits, target)}; torch's cross-entropy stands in for every op.
PROVIDERS: dict[str, Callable[[], dict[str, LossFn]]] = {
    "fastloss": lambda: {"cross_entropy": fastloss.cross_entropy, "cross_entropy_prob": fastloss.cross_entropy,
                         "zloss": fastloss.zloss},
    "reference": _reference,
    "torch": lambda: dict.fromkeys(OPS, F.cross_entropy),
    "compiled_reference": _compiled_reference,
    "liger": _liger,
    "flash_attn": _flash_attn,
}
PEERS = ("liger", "flash_attn")  # third-party CUDA kernels: cross_entropy only, used when importable
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass(frozen=True)
class Preset:
    shapes: tuple[tuple[int, int], ...]  # (N, C)
    dtypes: tuple[str, ...]
    providers: tuple[str, ...]
    min_run_time: float  # seconds per Timer.blocked_autorange
    min_samples: int


_CORE = ("fastloss", "reference", "torch")
_CUDA_C = (32768, 65536, 131072, 262144)
PRESETS = {
    # ~1 minute on 2 cores. torch.compile of the reference costs ~30 s per graph on CPU: full preset only.
    ("quick", "cpu"): Preset(((256, 8192), (1024, 32768)), ("fp32",), _CORE, 0.1, 3),
    ("full", "cpu"): Preset(
        ((1024, 8192), (1024, 32768), (4096, 32768)), ("fp32",), (*_CORE, "compiled_reference"), 0.5, 5
    ),
    ("quick", "cuda"): Preset(tuple((4096, c) for c in _CUDA_C), ("bf16",), (*_CORE, *PEERS), 0.2, 10),
    ("full", "cuda"): Preset(
        tuple((n, c) for n in (4096, 16384) for c in _CUDA_C), ("bf16", "fp32"),
        (*_CORE, "compiled_reference", *PEERS), 0.5, 20,
    ),
}


def load_providers(names: list[str], device: str) -> dict[str, dict[str, LossFn]]:
    """Build the providers in `names`; peers that cannot run here are dropped with one printed line."""
    loaded, skipped = {}, []
    for name in names:
        if name in PEERS and device != "cuda":
            skipped.append(f"{name} (needs cuda)")
            continue
        try:
            loaded[name] = PROVIDERS[name]()
        except Exception as exc:  # a peer that is missing, or that fails to import against this torch
            if name not in PEERS:
                raise
            skipped.append(f"{name} ({type(exc).__name__}: {exc})")
    if skipped:
        print("skipped peers:", ", ".join(skipped))
    return loaded


def input_setup(fn: LossFn, case: Case):
    """The harness's fn_setup: logits randn(N, C) * 2 in the case's dtype, uniform targets (cross_entropy_prob:
    a softmax of randn(N, C) in the logits' dtype), fixed seed."""
    n, c = case.shape["N"], case.shape["C"]

    def setup(requires_grad: bool):
        gen = torch.Generator(case.device).manual_seed(0)
        logits = torch.randn(n, c, device=case.device, generator=gen) * 2
        logits = logits.to(case.dtype).requires_grad_(requires_grad)
        if case.op == "cross_entropy_prob":
            target = torch.softmax(torch.randn(n, c, device=case.device, generator=gen), -1).to(case.dtype)
        else:
            target = torch.randint(c, (n,), device=case.device, generator=gen)
        return fn, (logits, target)

    return setup


def bytes_moved(case: Case) -> int:
    """Logits read in the forward; logits read and gradient written in the backward; all three in fwdbwd
    (probability targets: the targets are read in both passes too)."""
    logits = case.shape["N"] * case.shape["C"] * case.dtype.itemsize
    if case.op == "cross_entropy_prob":
        return logits * {"fwd": 2, "bwd": 3, "fwdbwd": 5}[case.mode]
    return logits * {"fwd": 1, "bwd": 2, "fwdbwd": 3}[case.mode]


def sweep(providers: dict[str, dict[str, LossFn]], preset: Preset, args) -> list[tuple[Case, str, Result]]:
    cases = [
        Case(op, {"N": n, "C": c}, DTYPES[dtype], args.device, mode)
        for dtype in args.dtype for n, c in args.shapes for op in args.ops for mode in args.modes
    ]
    todo = [(case, name) for case in cases for name, fns in providers.items() if case.op in fns]
    results, dropped = [], set()
    info = run_info(args.device)
    for case, name in (bar := tqdm(todo, unit="run", dynamic_ncols=True)):
        if name in dropped:
            continue
        bar.set_postfix_str(f"{case.op} {case.mode} {case.dtype_str} {case.shape_str} {name}")
        try:
            result = measure(input_setup(providers[name][case.op], case), case,
                             min_run_time=preset.min_run_time, min_samples=preset.min_samples)
        except torch.OutOfMemoryError:
            tqdm.write(f"note: {name} ran out of memory on {case.op} {case.dtype_str} {case.shape_str}")
            torch.cuda.empty_cache()
            continue
        except Exception as exc:  # a failing provider (a torch.compile error, say) must not end the sweep
            reason = str(exc).partition("\n")[0][:200]
            tqdm.write(f"note: dropping {name}: {type(exc).__name__}: {reason}")
            dropped.add(name)
            continue
        append_csv(args.out, [csv_row(case, name, result, bytes_moved(case), info)])
        results.append((case, name, result))
        if result.warmup_s > args.warmup_budget:
            tqdm.write(f"note: dropping {name}: its first call took {result.warmup_s:.0f} s "
                       f"(> --warmup-budget {args.warmup_budget:.0f} s)")
            dropped.add(name)
    return results


def speedup_table(results: list[tuple[Case, str, Result]]) -> str:
    key = lambda case: (case.op, case.mode, case.dtype_str, case.shape_str)
    baseline = {key(case): r.median_ms for case, name, r in results if name == "torch"}
    rows = []
    for case, name, r in results:
        base = baseline.get(key(case))
        speedup = f"{base / r.median_ms:.2f}x" if base else "-"
        rows.append((*key(case), name, f"{r.median_ms:.3f}", f"{r.p20_ms:.3f}-{r.p80_ms:.3f}", speedup,
                     f"{r.extra_mem_mb:.1f}", f"{r.peak_mem_mb:.1f}"))
    headers = ("op", "mode", "dtype", "shape", "provider", "median ms", "p20-p80 ms", "vs torch",
               "extra MB", "peak MB")
    return format_table(headers, rows, align="lllllrrrrr")


def parse_args(argv=None):
    csv_list = lambda s: [x for x in s.split(",") if x]
    shape_list = lambda s: [tuple(map(int, x.split("x"))) for x in csv_list(s)]
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("quick", "full"), default="quick")
    p.add_argument("--device", choices=("cpu", "cuda"), default=default_device)
    p.add_argument("--dtype", type=csv_list, help=f"comma list of {', '.join(DTYPES)} (default: preset's)")
    p.add_argument("--shapes", type=shape_list, help="comma list of NxC, e.g. 1024x32768 (default: preset's)")
    p.add_argument("--ops", type=csv_list, default=list(OPS), help="comma list (default: all)")
    p.add_argument("--modes", type=csv_list, default=list(MODES), help="comma list of fwd, bwd, fwdbwd")
    p.add_argument("--providers", type=csv_list,
                   help=f"comma list of {', '.join(PROVIDERS)} (default: preset's)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "row_losses.csv")
    p.add_argument("--plot", action="store_true", help="also write PNGs next to --out")
    p.add_argument("--warmup-budget", type=float, default=300.0,
                   help="drop a provider whose first call (e.g. torch.compile) takes longer, in seconds")
    args = p.parse_args(argv)
    for name, given, allowed in (("dtype", args.dtype, DTYPES), ("ops", args.ops, OPS),
                                 ("modes", args.modes, MODES), ("providers", args.providers, PROVIDERS)):
        if bad := set(given or ()) - set(allowed):
            p.error(f"--{name}: unknown {sorted(bad)}; choose from {list(allowed)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    return args


def main(argv=None):
    args = parse_args(argv)
    preset = PRESETS[args.preset, args.device]
    args.dtype = args.dtype or list(preset.dtypes)
    args.shapes = args.shapes or list(preset.shapes)
    build = fastloss.build_info()
    kernels = "compiled kernels" if build["extension_loaded"] else "NO compiled kernels: reference fallback"
    print(f"fastloss {fastloss.__version__} ({kernels}), torch {torch.__version__}, device {args.device}")
    providers = load_providers(args.providers or list(preset.providers), args.device)
    append_csv(args.out, [])  # creates the file, or checks its header, before any time is spent
    start = time.perf_counter()
    results = sweep(providers, preset, args)
    print(f"\n{len(results)} measurements in {time.perf_counter() - start:.0f} s -> {args.out}")
    print("vs torch = torch median / provider median (>1: faster than torch.nn.functional.cross_entropy)\n")
    print(speedup_table(results))
    if args.plot:
        from plot import plot_csvs

        for png in plot_csvs([args.out], args.out.parent):
            print("wrote", png)


if __name__ == "__main__":
    main()
