"""Generic timing and memory harness for fastloss benchmarks.

A benchmark describes each measurement as a :class:`Case` plus a ``fn_setup(requires_grad) -> (fn, args)``
that builds fresh inputs; ``fn(*args)`` returns a scalar loss. :func:`measure` turns that into a step for the
case's mode, times it with ``torch.utils.benchmark.Timer`` (which synchronises CUDA itself) and records the
peak memory of one call. :func:`csv_row` and :func:`append_csv` write the results in the columns of
:data:`COLUMNS`.
"""

from __future__ import annotations

import csv
import gc
import itertools
import math
import os
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.benchmark import Timer

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # silence the profiler's start/stop chatter (CPU memory)

MODES = ("fwd", "bwd", "fwdbwd")
COLUMNS = (
    "op", "provider", "mode", "dtype", "device", "shape", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb",
    "extra_mem_mb", "gbps", "torch_version", "fastloss_version", "git_sha", "timestamp", "host",
)
MB = 2**20

Setup = Callable[[bool], tuple[Callable[..., torch.Tensor], tuple]]
"""``fn_setup(requires_grad) -> (fn, args)``: fresh inputs (floating ones requiring grad when asked)."""


@dataclass(frozen=True)
class Case:
    op: str
    shape: dict[str, int]
    dtype: torch.dtype
    device: str
    mode: str

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    @property
    def shape_str(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape.items())

    @property
    def dtype_str(self) -> str:
        return str(self.dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Result:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int
    peak_mem_mb: float  # allocator bytes in use at the peak of one call, the case's inputs included
    extra_mem_mb: float  # that peak minus the bytes in use just before the call
    warmup_s: float  # building the inputs plus the first call (torch.compile, autotuning, lazy init)


def make_step(fn_setup: Setup, mode: str) -> Callable[[], None]:
    """A zero-argument callable running the timed region of `mode`, leaving the state as it found it.

    fwd: the forward on inputs that do not require grad. fwdbwd: forward and ``loss.backward()``. bwd: one
    forward here, then each call runs only ``loss.backward(retain_graph=True)``. Gradients are dropped after
    each call (``grad = None``, like ``zero_grad(set_to_none=True)``), so no call accumulates into the last.
    """
    fn, args = fn_setup(mode != "fwd")
    if mode == "fwd":
        return lambda: fn(*args)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if mode == "fwdbwd":
        run = lambda: fn(*args).backward()
    else:
        loss = fn(*args)
        run = lambda: loss.backward(retain_graph=True)

    def step():
        run()
        for t in leaves:
            t.grad = None

    return step


class _CudaPeak:
    """Peak from the caching allocator's statistics (live tensors only, not the cache)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def start(self):
        torch.cuda.synchronize(self.device)
        self.before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self):
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)


class _CpuPeak:
    """Peak from the profiler's memory events: the CPU allocator keeps no statistics.

    With ``profile_memory=True`` every allocation and free of c10's CPU allocator is logged as a ``[memory]``
    event carrying its signed size. Their running sum in time order is the bytes held by tensors allocated
    since the profiler started (so build the inputs inside the ``with``); ``before`` is that sum when
    :meth:`start` opens the marked region, ``peak`` its maximum inside the region. Exact for tensors;
    memory that kernels get from ``malloc`` directly, outside the allocator, is not seen.
    """

    MARK = "fastloss_bench::measured"

    def __enter__(self):
        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True).__enter__()
        return self

    def start(self):
        self.region = record_function(self.MARK).__enter__()

    def stop(self):
        self.region.__exit__(None, None, None)

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        if exc[0] is not None:
            return False
        events = self.prof.profiler.kineto_results.events()
        mark = next(e for e in events if e.name() == self.MARK)
        t0, t1 = mark.start_ns(), mark.start_ns() + mark.duration_ns()
        mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        self.before = sum(n for t, n in mem if t < t0)
        self.peak = max(itertools.accumulate((n for t, n in mem if t0 <= t <= t1), initial=self.before))
        return False


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def measure(fn_setup: Setup, case: Case, *, min_run_time: float = 0.2, min_samples: int = 5) -> Result:
    """Time `case` and record the peak memory of one call.

    Order: build the step (inputs, and the forward for bwd), one warm-up call, one call under the memory
    tracker, then ``Timer.blocked_autorange``, repeated until it has collected `min_samples` per-call times
    (a slow call yields a single sample per block). Median and the 20th/80th percentiles are taken over them.
    """
    if min_samples < 2:
        raise ValueError(f"min_samples must be at least 2 for percentiles, got {min_samples}")
    device = torch.device(case.device)
    gc.collect()
    tracker = _CudaPeak(device) if device.type == "cuda" else _CpuPeak()
    with tracker:
        t = time.perf_counter()
        step = make_step(fn_setup, case.mode)
        step()
        warmup_s = time.perf_counter() - t
        tracker.start()
        call_s = _timed(step, device)
        tracker.stop()

    timer = Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    times: list[float] = []
    while len(times) < min_samples:
        budget = max(min_run_time, (min_samples - len(times)) * call_s)
        times += timer.blocked_autorange(min_run_time=budget).times
    del step, timer
    if device.type == "cuda":
        torch.cuda.empty_cache()

    p20, _, _, p80 = statistics.quantiles(times, n=5, method="inclusive")
    return Result(
        median_ms=statistics.median(times) * 1e3, p20_ms=p20 * 1e3, p80_ms=p80 * 1e3, samples=len(times),
        peak_mem_mb=tracker.peak / MB, extra_mem_mb=(tracker.peak - tracker.before) / MB, warmup_s=warmup_s,
    )


def _git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_info(device: str) -> dict[str, str]:
    """The columns shared by every row of one sweep (versions, commit, start time, host)."""
    try:
        import fastloss

        fastloss_version = fastloss.__version__
    except ImportError:
        fastloss_version = "unknown"
    cuda = device.startswith("cuda")
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    return {
        "torch_version": torch.__version__,
        "fastloss_version": fastloss_version,
        "git_sha": _git_sha(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": f"{socket.gethostname()} ({where})",
    }


def csv_row(case: Case, provider: str, result: Result, bytes_moved: float, info: dict[str, str]) -> dict:
    """One CSV row; ``gbps`` is `bytes_moved` (the caller's count for this mode) over the median time."""
    return {
        "op": case.op, "provider": provider, "mode": case.mode, "dtype": case.dtype_str,
        "device": torch.device(case.device).type, "shape": case.shape_str,
        "median_ms": result.median_ms, "p20_ms": result.p20_ms, "p80_ms": result.p80_ms,
        "peak_mem_mb": result.peak_mem_mb, "extra_mem_mb": result.extra_mem_mb,
        "gbps": bytes_moved / (result.median_ms * 1e-3) / 1e9, **info,
    }


def append_csv(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Append `rows`, writing the header first when the file is new (and refusing a foreign header)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != COLUMNS:
            raise ValueError(f"{path} has other columns than {COLUMNS}; write to a new file")
    fmt = lambda v: f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows({k: fmt(v) for k, v in row.items()} for row in rows)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: str) -> str:
    """Plain-text table; `align` has one letter per column, ``l`` (left) or ``r`` (right)."""
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    pad = lambda c, w, a: c.rjust(w) if a == "r" else c.ljust(w)
    lines = ["  ".join(map(pad, r, widths, align)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
