"""Turn benchmark CSVs (bench/harness.py columns) into PNGs: one figure per (op, mode, device).

    python bench/plot.py bench/results/row_losses.csv [more.csv ...] [--out-dir bench/results]

Each figure has one panel per dtype: x = shape (ordered by element count), y = median ms on a log scale with
p20-p80 error bars, one line per provider (per provider and host when the CSVs mix machines). When a
measurement was repeated, the newest row wins.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator


def read_latest(paths: Iterable[str | Path]) -> list[dict]:
    """All rows of `paths`, keeping only the newest row of each repeated measurement."""
    latest = {}
    for path in paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                key = tuple(row[k] for k in ("op", "provider", "mode", "dtype", "device", "shape", "host"))
                if key not in latest or row["timestamp"] >= latest[key]["timestamp"]:
                    latest[key] = row
    return list(latest.values())


def _shape_order(shape: str) -> tuple[int, str]:
    """Sort key: element count of "N=1024 C=32768", then the text."""
    return math.prod(int(part.split("=")[1]) for part in shape.split()), shape


def plot_csvs(paths: Iterable[str | Path], out_dir: str | Path) -> list[Path]:
    rows = read_latest(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    providers = sorted({r["provider"] for r in rows})
    color = {p: f"C{i % 10}" for i, p in enumerate(providers)}  # same colour per provider in every figure
    several_hosts = len({r["host"] for r in rows}) > 1
    figures = defaultdict(list)
    for r in rows:
        figures[r["op"], r["mode"], r["device"]].append(r)

    written = []
    for (op, mode, device), fig_rows in sorted(figures.items()):
        dtypes = sorted({r["dtype"] for r in fig_rows})
        fig = Figure(figsize=(6.5 * len(dtypes), 4.5), layout="constrained")
        for ax, dtype in zip(fig.subplots(1, len(dtypes), squeeze=False)[0], dtypes, strict=True):
            panel = [r for r in fig_rows if r["dtype"] == dtype]
            shapes = sorted({r["shape"] for r in panel}, key=_shape_order)
            lines = defaultdict(list)
            for r in panel:
                lines[r["provider"], r["host"]].append(r)
            for (provider, host), pts in sorted(lines.items()):
                pts.sort(key=lambda r: _shape_order(r["shape"]))
                x = [shapes.index(r["shape"]) for r in pts]
                y = [float(r["median_ms"]) for r in pts]
                err = [[m - float(r["p20_ms"]) for m, r in zip(y, pts, strict=True)],
                       [float(r["p80_ms"]) - m for m, r in zip(y, pts, strict=True)]]
                label = f"{provider} @ {host}" if several_hosts else provider
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=color[provider], label=label)
            ax.set_xticks(range(len(shapes)), [s.replace(" ", "\n") for s in shapes])
            ax.set_yscale("log")
            ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))  # ticks at 1, 2, 5, 10, 20, 50, ...
            for set_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                set_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_xlabel("shape")
            ax.set_ylabel("median ms (bars: p20-p80)")
            ax.set_title(dtype)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="small")
        fig.suptitle(f"{op} {mode} on {device}")
        path = out_dir / f"{op}_{mode}_{device}.png"
        fig.savefig(path, dpi=120)
        written.append(path)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+", type=Path)
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    for path in plot_csvs(args.csv, args.out_dir):
        print("wrote", path)


if __name__ == "__main__":
    main()
