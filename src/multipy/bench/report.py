"""Benchmark output: deploy_benchmark's CSV, a rich table and a throughput plot.

Example:
    >>> row = Row("smallops", "threads", 1, 100, 50.0, 1.0, 2.0, 3.0)
    >>> write_csv("/tmp/bench.csv", [row])                     # doctest: +SKIP
    >>> open("/tmp/bench.csv").readline().strip()              # doctest: +SKIP
    'benchmark, strategy, n_threads, work_items_completed, ...'
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

from .harness import Result

__all__ = ["CSV_COLUMNS", "Row", "plot", "read_csv", "speedups", "table", "write_csv"]

#: deploy_benchmark's columns, in order (latencies in milliseconds).
CSV_COLUMNS = ("benchmark", "strategy", "n_threads", "work_items_completed",
               "work_items_per_second", "p25_latency", "p50_latency", "p95_latency", "device")


@dataclasses.dataclass(frozen=True)
class Row:
    """One CSV line: a strategy at one thread count on one benchmark."""

    benchmark: str
    strategy: str
    n_threads: int
    work_items_completed: int
    work_items_per_second: float
    p25_latency: float
    p50_latency: float
    p95_latency: float
    device: str = "cpu"

    @classmethod
    def of(cls, benchmark: str, strategy: str, result: Result, device: str = "cpu") -> "Row":
        return cls(benchmark, strategy, result.n_threads, result.work_items_completed,
                   result.work_items_per_second, result.p25_latency, result.p50_latency,
                   result.p95_latency, device)


def write_csv(path: str | os.PathLike, rows: Sequence[Row]) -> None:
    """Write ``rows`` with deploy_benchmark's header (``", "``-separated, as deploy did)."""
    lines = [", ".join(CSV_COLUMNS)]
    for row in rows:
        values = dataclasses.astuple(row)
        lines.append(", ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in values))
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read a file written by :func:`write_csv` back as dicts of strings."""
    with open(path, encoding="utf-8") as f:
        header, *body = [line.rstrip("\n") for line in f if line.strip()]
    names = [c.strip() for c in header.split(",")]
    return [dict(zip(names, (v.strip() for v in line.split(",")))) for line in body]


def speedups(rows: Sequence[Row], baseline: str) -> dict[Row, float]:
    """``{row: items/s over the baseline strategy's at the same benchmark and n}``,
    for the rows whose baseline was measured (and not zero)."""
    base = {(r.benchmark, r.n_threads): r.work_items_per_second
            for r in rows if r.strategy == baseline}
    out = {}
    for r in rows:
        ref = base.get((r.benchmark, r.n_threads))
        if ref:
            out[r] = r.work_items_per_second / ref
    return out


def table(rows: Sequence[Row], *, title: str | None = None, baseline: str = "threads",
          label: Callable[[Row], str] | None = None, p95: bool = True, batch: int = 1):
    """A rich Table of ``rows``; "vs threads" is throughput over the ``baseline``
    strategy's at the same thread count (blank when it was not measured).
    ``label`` names a row's strategy (default: the strategy's name).  With
    ``batch`` > 1 an "images/s" column gives items/s x batch (an item is one
    call on ``batch`` inputs)."""
    from rich.table import Table

    ratios = speedups(rows, baseline)
    several = len({r.benchmark for r in rows}) > 1
    out = Table(title=title)
    if several:
        out.add_column("benchmark")
    out.add_column("strategy")
    out.add_column("threads", justify="right")
    out.add_column("items/s", justify="right")
    if batch > 1:
        out.add_column("images/s", justify="right")
    out.add_column("p50 ms", justify="right")
    if p95:
        out.add_column("p95 ms", justify="right")
    out.add_column(f"vs {baseline}", justify="right")
    for r in rows:
        speedup = ratios.get(r)
        cells = [label(r) if label else r.strategy, str(r.n_threads),
                 f"{r.work_items_per_second:,.1f}",
                 *([f"{r.work_items_per_second * batch:,.1f}"] if batch > 1 else []),
                 f"{r.p50_latency:.3f}",
                 *([f"{r.p95_latency:.3f}"] if p95 else []),
                 f"{speedup:.2f}x" if speedup is not None else ""]
        out.add_row(*([r.benchmark] if several else []), *cells)
    return out


def plot(path: str | os.PathLike, rows: Sequence[Row], *, title: str | None = None,
         ylabel: str = "work items / s") -> None:
    """Save a PNG of throughput against threads, one line per strategy and one
    panel per benchmark (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmarks = list(dict.fromkeys(r.benchmark for r in rows))
    fig, axes = plt.subplots(1, max(1, len(benchmarks)), squeeze=False,
                             figsize=(6.4 * max(1, len(benchmarks)), 4.8))
    for ax, bench in zip(axes[0], benchmarks):
        mine = [r for r in rows if r.benchmark == bench]
        for strategy in dict.fromkeys(r.strategy for r in mine):
            points = sorted((r.n_threads, r.work_items_per_second)
                            for r in mine if r.strategy == strategy)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=strategy)
        ax.set_xticks(sorted({r.n_threads for r in mine}))
        ax.set_title(bench)
        ax.set_xlabel("host threads (processes for limit)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
