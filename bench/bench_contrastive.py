"""Benchmark fastloss's tiled contrastive losses (clip_loss, siglip_loss, one-direction InfoNCE) against the
materialised torch loss.

    python bench/bench_contrastive.py --preset quick --device cpu
    python bench/bench_contrastive.py --preset target --device cpu      # N=M=8192, d=512 fwd+bwd (minutes)
    python bench/bench_contrastive.py --memory --device cpu --plot      # peak memory growth vs N + PNG
    python bench/bench_contrastive.py --preset quick --device cuda --dtype bf16

Ops: ``clip_loss`` (symmetric: fastloss runs 4 GEMM-equivalents, a forward and a recomputing backward),
``siglip_loss`` and ``infonce_loss`` (``contrastive_loss`` image -> text, one direction: row-wise losses, whose
gradient fastloss takes in the forward pass, 3 GEMM-equivalents), ``queue_loss`` (InfoNCE of N queries against a
frozen queue of 8N keys, MoCo-style: no key gradient, 2 GEMM-equivalents).
Providers: ``fastloss``; ``fastloss_fused`` (FASTLOSS_CONTRASTIVE_FUSED=1: the sm_90 fused GEMMs, whose epilogues
consume the tiles on chip); ``fastloss_tile2x`` (tiles of 2^28 elements, twice the CUDA default); ``torch`` = the
loss as open_clip writes it on one device (``s * x @ y.T``, then ``(CE(L) + CE(L.T)) / 2``, ``CE(L)``, or
``-logsigmoid(z * (s L + b)).sum() / N``), the baseline; ``reference`` (``fastloss.reference``, materialised too);
``open_clip`` (its ClipLoss / SigLipLoss, when its loss module loads); ``inf_cl`` (Inf-CL's tiled Triton loss,
CUDA, clip_loss and infonce_loss, when installed); ``siglip_kernel`` (the siglip-kernel package's fused Triton
SigLIP loss, CUDA, siglip_loss only). Inputs: L2-normalised ``randn(N, d)`` features, scale 14.3 (and bias -10 for
SigLIP) requiring grad.
Rows go to a CSV in bench/harness.py's columns; ``--memory`` records one fwd+bwd per N (no timing: the
materialised loss needs many seconds per call at large N on a small CPU) and plots extra peak memory vs N.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import Case, _CpuPeak, _CudaPeak, append_csv, csv_row, format_table, measure, run_info

import fastloss

RESULTS = Path(__file__).parent / "results"
OPS = ("clip_loss", "siglip_loss", "infonce_loss", "queue_loss")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def torch_clip(x, y, s, b):
    logits = s * x @ y.T
    labels = torch.arange(x.shape[0], device=x.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def torch_infonce(x, y, s, b):
    return F.cross_entropy(s * x @ y.T, torch.arange(x.shape[0], device=x.device))


def torch_siglip(x, y, s, b):
    logits = s * x @ y.T + b
    z = 2 * torch.eye(x.shape[0], device=x.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / x.shape[0]


def _open_clip():
    try:
        import open_clip.loss as mod
    except Exception:  # the package __init__ needs torchvision; its loss module needs only torch
        spec = importlib.util.find_spec("open_clip")
        path = Path(spec.submodule_search_locations[0]) / "loss.py"
        s = importlib.util.spec_from_file_location("_open_clip_loss", path)
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
    clip, sig = mod.ClipLoss(), mod.SigLipLoss()
    return {"clip_loss": lambda x, y, s, b: clip(x, y, s), "siglip_loss": lambda x, y, s, b: sig(x, y, s, b)}


def _inf_cl():
    # Inf-CL (DAMO-NLP-SG, Triton, CUDA only): one direction per call, scale applied to the queries
    from inf_cl import cal_inf_loss

    # scale applied here, not as scale=: cal_inf_loss wraps a scale in GradientGather, whose backward all-reduces
    # (ValueError without an initialised process group); cal_inf_loss(q, k, scale=s) == cal_inf_loss(s * q, k)
    def clip(x, y, s, b):
        return (cal_inf_loss(s * x, y) + cal_inf_loss(s * y, x)) / 2

    return {"clip_loss": clip, "infonce_loss": lambda x, y, s, b: cal_inf_loss(s * x, y)}  # needs N = M


def _siglip_kernel():
    # siglip-kernel (PyPI, Triton, CUDA only): its API takes the temperature's log; auto backend
    from siglip_kernel import fused_siglip_loss

    return {"siglip_loss": lambda x, y, s, b: fused_siglip_loss(x, y, torch.log(s), b)}


def _fastloss(tile_elems=None):
    """fastloss's three ops; tile_elems: rows per tile = tile_elems // M instead of the default budget (CUDA:
    2^27 elements), to measure what a larger tile buys (fewer passes over the fp32 dk accumulator)."""
    rows = (lambda x: max(16, tile_elems // x.shape[0])) if tile_elems else (lambda x: None)
    return {"clip_loss": lambda x, y, s, b: fastloss.clip_loss(x, y, s, block_rows=rows(y)),
            "siglip_loss": lambda x, y, s, b: fastloss.siglip_loss(x, y, s, b, block_rows=rows(y)),
            "infonce_loss": lambda x, y, s, b: fastloss.contrastive_loss(x, y, logit_scale=s, block_rows=rows(y)),
            "queue_loss": lambda x, y, s, b: fastloss.contrastive_loss(x, y, logit_scale=s, block_rows=rows(y))}


def _fastloss_fused():
    """fastloss with FASTLOSS_CONTRASTIVE_FUSED=1 while it is measured (forward and backward): on an sm_90 GPU
    the tiles' GEMMs run as CUTLASS GEMMs whose epilogues consume each tile on chip."""
    return {**_fastloss(), ENV: {"FASTLOSS_CONTRASTIVE_FUSED": "1"}}


ENV = "_env"  # a provider's environment variables, set while it is measured


@contextlib.contextmanager
def provider_env(fns: dict):
    old = {k: os.environ.get(k) for k in fns.get(ENV, {})}
    os.environ.update(fns.get(ENV, {}))
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


PROVIDERS = {
    "fastloss": _fastloss,
    "fastloss_tile2x": lambda: _fastloss(2**28),
    "fastloss_fused": _fastloss_fused,
    "torch": lambda: {"clip_loss": torch_clip, "siglip_loss": torch_siglip, "infonce_loss": torch_infonce,
                      "queue_loss": torch_infonce},
    "reference": lambda: {"clip_loss": lambda x, y, s, b: fastloss.reference.clip_loss(x, y, s),
                          "siglip_loss": fastloss.reference.siglip_loss,
                          "infonce_loss": lambda x, y, s, b: fastloss.reference.contrastive_loss(x, y, logit_scale=s)},
    "open_clip": _open_clip,
    "inf_cl": _inf_cl,
    "siglip_kernel": _siglip_kernel,
}
PRESETS = {  # (N, d) shapes, modes, providers
    "quick": (((2048, 256),), ("fwdbwd",), ("fastloss", "torch")),
    "target": (((8192, 512),), ("fwdbwd",), ("fastloss", "torch")),
    "gpu": (((16384, 768), (65536, 768)), ("fwd", "fwdbwd"), ("fastloss", "fastloss_fused", "fastloss_tile2x", "torch",
                                                                  "open_clip", "inf_cl", "siglip_kernel")),
}


QUEUE = 8  # queue_loss: a frozen queue of QUEUE * N keys (no gradient), as in MoCo


def keys_of(case: Case) -> int:
    return QUEUE * case.shape["N"] if case.op == "queue_loss" else case.shape["N"]


def input_setup(fn, case: Case):
    n, d, m = case.shape["N"], case.shape["d"], keys_of(case)

    def setup(requires_grad: bool):
        gen = torch.Generator(case.device).manual_seed(0)
        x = F.normalize(torch.randn(n, d, device=case.device, generator=gen), dim=1).to(case.dtype)
        y = F.normalize(torch.randn(m, d, device=case.device, generator=gen), dim=1).to(case.dtype)
        s = torch.tensor(14.3, device=case.device)
        b = torch.tensor(-10.0, device=case.device)
        for t in (x, y, s, b):
            t.requires_grad_(requires_grad and not (case.op == "queue_loss" and t is y))
        return fn, (x, y, s, b)

    return setup


def flops(case: Case) -> float:
    """GEMM-equivalents of the materialised loss: 1 forward, 2 backward (2 N M d FLOPs each; 1 backward for the
    frozen queue, which gets no gradient)."""
    g = 2.0 * case.shape["N"] * keys_of(case) * case.shape["d"]
    bwd = 1 if case.op == "queue_loss" else 2
    return g * {"fwd": 1, "bwd": bwd, "fwdbwd": 1 + bwd}[case.mode]


BF16_PEAK = 989e12  # dense bf16 tensor-core peak of the H200 (issue 6 target: >= 60% on fwd+bwd)


def performed_gemms(case: Case, provider: str = "fastloss") -> int:
    """GEMM-equivalents fastloss runs: clip_loss 1 forward + 3 backward (the tile is recomputed); the row-wise
    losses take their gradient in the forward pass, 3 in all (2 against a frozen queue). fastloss_fused: the
    softmax row-wise losses run the block's GEMM twice (fold, then G: no fp32 tile kept in between), one more."""
    if case.mode == "fwd":
        return 1
    extra = 1 if provider == "fastloss_fused" and case.op in ("infonce_loss", "queue_loss") else 0
    return {"clip_loss": 4, "queue_loss": 2}.get(case.op, 3) + extra


def peak_share(case: Case, ms: float, provider: str) -> str:
    """Share of the H200 bf16 peak for the 3 GEMM-equivalents of the materialised loss (useful work), then for
    the GEMM-equivalents fastloss performs (performed_gemms); only for bf16 on CUDA."""
    if not case.device.startswith("cuda") or case.dtype != torch.bfloat16:
        return "-"
    g = 2.0 * case.shape["N"] * keys_of(case) * case.shape["d"] / (ms * 1e-3) / BF16_PEAK
    return f"{100 * flops(case) / (ms * 1e-3) / BF16_PEAK:.0f}% / {100 * g * performed_gemms(case, provider):.0f}%"


def timing(args):
    shapes, modes, providers = PRESETS[args.preset]
    shapes = args.shapes or shapes
    providers = args.providers or providers
    fns = {}
    for name in providers:
        try:
            fns[name] = PROVIDERS[name]()
        except Exception as exc:
            print(f"skipped provider {name}: {type(exc).__name__}: {exc}")
    info = run_info(args.device)
    rows, table = [], []
    for dtype in args.dtype:
        for n, d in shapes:
            for op in args.ops:
                for mode in modes:
                    case = Case(op, {"N": n, "d": d}, DTYPES[dtype], args.device, mode)
                    base, medians = None, {}
                    for name, f in fns.items():
                        if op not in f:
                            continue
                        try:
                            with provider_env(f):
                                r = measure(input_setup(f[op], case), case, min_run_time=0.1,
                                            min_samples=args.samples)
                        except Exception as exc:  # a failing provider must not end the run (nor lose the CSV)
                            print(f"{op} {mode} {case.shape_str} {name}: failed: {type(exc).__name__}: "
                                  f"{str(exc)[:200]}", flush=True)
                            if case.device.startswith("cuda"):
                                torch.cuda.empty_cache()
                            continue
                        rows.append(csv_row(case, name, r, 0.0, info))
                        base = r.median_ms if name == "torch" else base
                        medians[name] = r.median_ms
                        table.append([op, mode, dtype, case.shape_str, name, f"{r.median_ms:.1f}",
                                      f"{flops(case) / r.median_ms / 1e9:.2f}", f"{r.extra_mem_mb:.1f}",
                                      peak_share(case, r.median_ms, name)])
                        print(" ".join(table[-1]), flush=True)
                    for row in (t for t in table if t[:4] == [op, mode, dtype, case.shape_str]):
                        row.append(f"{medians[row[4]] / base:.2f}x" if base else "-")  # unrounded times
    append_csv(args.out, rows)
    print(format_table(("op", "mode", "dtype", "shape", "provider", "median ms", "TFLOP/s", "extra MB",
                        "bf16 peak (useful / performed)", "time vs torch"), table, "lllllrrrrr"))


def one_call_memory(fn, n, d, device, dtype) -> tuple[float, float]:
    """(extra peak MB of one fwd+bwd, seconds) with inputs built outside the measured region."""
    tracker = _CudaPeak(torch.device(device)) if device.startswith("cuda") else _CpuPeak()
    with tracker:
        gen = torch.Generator(device).manual_seed(0)
        x = F.normalize(torch.randn(n, d, device=device, generator=gen), dim=1).to(dtype).requires_grad_()
        y = F.normalize(torch.randn(n, d, device=device, generator=gen), dim=1).to(dtype).requires_grad_()
        s = torch.tensor(14.3, device=device, requires_grad=True)
        tracker.start()
        t = time.perf_counter()
        fn(x, y, s, None).backward()
        seconds = time.perf_counter() - t
        tracker.stop()
    return (tracker.peak - tracker.before) / 2**20, seconds


def memory(args):
    d = args.memory_d
    ns = args.memory_n
    out = []
    for n in ns:
        for name in ("fastloss", "torch"):
            if name == "torch" and n > args.torch_max_n:
                continue
            fn = PROVIDERS[name]()["clip_loss"]
            mb, sec = one_call_memory(fn, n, d, args.device, DTYPES[args.dtype[0]])
            out.append((n, name, mb, sec))
            print(f"clip_loss fwd+bwd N={n} d={d} {name}: extra peak {mb:.1f} MB, {sec:.1f} s", flush=True)
    path = args.out.with_name(args.out.stem + "_memory.csv")
    new = not path.exists()
    with path.open("a") as f:
        if new:
            f.write("op,provider,device,dtype,N,d,extra_peak_mb,seconds\n")
        for n, name, mb, sec in out:
            f.write(f"clip_loss,{name},{args.device},{args.dtype[0]},{n},{d},{mb:.2f},{sec:.2f}\n")
    for n in ns:
        got = {name: mb for m, name, mb, _ in out if m == n}
        if len(got) == 2:
            print(f"N={n}: fastloss / torch extra peak = {got['fastloss'] / got['torch']:.4f} "
                  f"(1/{got['torch'] / max(got['fastloss'], 1e-9):.0f})")
    if args.plot:
        plot_memory(path, args.out.with_name(args.out.stem + "_memory.png"))


def plot_memory(csv_path: Path, png: Path) -> None:
    """Extra peak memory vs N from every row of the memory CSV (the newest per provider, d, N)."""
    import csv

    from matplotlib.figure import Figure

    latest = {}
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f):
            latest[(row["provider"], int(row["d"]), int(row["N"]))] = float(row["extra_peak_mb"])
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for provider, d in sorted({(p, d) for p, d, _ in latest}):
        pts = sorted((n, mb) for (p, dd, n), mb in latest.items() if (p, dd) == (provider, d))
        ax.loglog(*zip(*pts, strict=True), marker="o", label=f"{provider} d={d}", base=2)
    ax.set_xlabel("N = M (batch)")
    ax.set_ylabel("extra peak memory of one fwd+bwd (MB)")
    ax.set_title(f"clip_loss memory ({csv_path.name})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(png, dpi=120, bbox_inches="tight")
    print("wrote", png)


def main(argv=None):
    csv_list = lambda s: [x for x in s.split(",") if x]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS), default="quick")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", type=csv_list, default=None)
    p.add_argument("--ops", type=csv_list, default=["clip_loss"])
    p.add_argument("--shapes", type=lambda s: [tuple(map(int, x.split("x"))) for x in csv_list(s)],
                   help="comma list of NxD")
    p.add_argument("--providers", type=csv_list)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--memory", action="store_true", help="peak-memory sweep over N instead of timing")
    p.add_argument("--memory-n", type=lambda s: [int(x) for x in csv_list(s)],
                   default=[1024, 2048, 4096, 8192, 16384, 65536])
    p.add_argument("--memory-d", type=int, default=256)
    p.add_argument("--torch-max-n", type=int, default=16384, help="largest N for the materialised loss")
    p.add_argument("--plot", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "contrastive_cpu.csv")
    args = p.parse_args(argv)
    args.dtype = args.dtype or (["bf16"] if args.device.startswith("cuda") else ["fp32"])
    if bad := set(args.ops) - set(OPS):
        p.error(f"--ops: unknown {sorted(bad)}")
    if args.memory:
        memory(args)
    else:
        timing(args)


if __name__ == "__main__":
    main()
