"""``multipy demo``: why multipy, measured on this machine.

::

    small-op model ──┐   N plain threads sharing one eager model (one GIL)
                     ├─▶ N interpreters (multipy)
    all-MiniLM-L6-v2 ┘   N bare processes running the model: the machine's limit
                         + PSS of N interpreters against N eager processes
                         + a PNG of all of it

Two models: one whose time goes to Python (40 small ``Linear`` layers, batch
1), where the GIL decides everything, and a real pretrained one (all-MiniLM-L6-v2
through Hugging Face transformers, packaged with ``extern("transformers.**")``),
where part of the time goes to larger ops that release the GIL.  Every
interpreter's output is checked against eager PyTorch first.

Example:
    >>> from rich.console import Console
    >>> run_demo(interpreters=2, seconds=1.0, console=Console())   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from .report import Row, speedups, table

__all__ = ["DemoResult", "run_demo"]

_CHECK_RTOL, _CHECK_ATOL = 1e-3, 1e-5
_MIB = 1 << 20


class DemoFailure(Exception):
    """An interpreter's output differs from eager PyTorch."""


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What the demo measured: throughput rows per model, and memory rows."""

    rows: tuple[Row, ...]
    memory: tuple = ()            # bench.pss.MemoryRow, for the real model
    skipped: tuple[str, ...] = () # what was left out, and why


def run_demo(*, interpreters: int, seconds: float, console, err=None, out: str | None = None,
             backend: str = "process", plot_path: str | None = None,
             real_model: bool = True) -> DemoResult:
    """Run both models and the memory comparison, print tables and ratios to
    ``console``, and save the plot to ``plot_path``.  Raises
    :class:`DemoFailure` when an interpreter's output differs from eager."""
    from rich.console import Console

    from ..package import inspect_package
    from .runner import progress_bar
    from .targets import cache_dir, example_archive, resolve_target

    err = err or Console(stderr=True)
    n = interpreters
    console.print(f"[bold]multipy demo[/]: {n} interpreter(s) against {n} plain thread(s) "
                  f"sharing one model, on {os.cpu_count()} cores")
    rows: list[Row] = []
    skipped: list[str] = []
    memory: tuple = ()
    with err.status("writing the small-op model's package"):
        smallops = resolve_target(str(example_archive("smallops", out)))
    rows += _measure(smallops, "small-op model (40 x Linear(16,16), batch 1)", n, seconds,
                     backend, console, err, progress_bar)
    if real_model:
        from ..examples import minilm

        why = minilm.available()
        if why is not None:
            skipped.append(f"all-MiniLM-L6-v2: {why}")
            console.print(f"[yellow]skipped all-MiniLM-L6-v2[/]: {why}")
        else:
            directory = Path(out) if out is not None else cache_dir()
            archive = directory / "minilm.pt"
            if not archive.exists():
                with err.status("writing all-MiniLM-L6-v2's package (extern transformers)"):
                    _quiet_transformers()
                    directory.mkdir(parents=True, exist_ok=True)
                    minilm.write_package(archive)
            target = resolve_target(str(archive))
            # Every module the archive imports from the environment (transformers'), imported
            # once where the interpreters are forked from, so that they share its memory.
            preload = inspect_package(target.archive).externs
            rows += _measure(target, "all-MiniLM-L6-v2 (sentence embeddings, 1 sentence)", n,
                             seconds, backend, console, err, progress_bar, preload=preload)
            if backend == "process":
                memory = _memory(target.archive, n, console, err, preload)
    result = DemoResult(tuple(rows), memory, tuple(skipped))
    if plot_path:
        plot_demo(plot_path, result, title=f"multipy demo, {n} interpreter(s), "
                  f"{os.cpu_count()} cores")
        console.print(f"wrote {plot_path}")
    return result


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging

        logging.disable_progress_bar()
    except ImportError:
        pass


def _measure(target, title: str, n: int, seconds: float, backend: str, console, err,
             progress_bar, *, preload: tuple[str, ...] = ()) -> list[Row]:
    from .runner import host_threads, run_rows
    from .strategies import Fixtures, Strategy

    with Fixtures(target, max_interpreters=n, backend=backend, preload=preload) as fx, \
            host_threads(1):
        with err.status(f"{target.name}: starting {n} interpreter(s), loading the model on each"):
            manager, model = fx.replicated(n)
        _check_against_eager(fx, manager, model, console)
        plan = [(Strategy.THREADS, n), (Strategy.MULTI_PYTHON, n), (Strategy.LIMIT, n)]
        with progress_bar(err) as progress:
            sweep = run_rows(fx, plan, seconds=seconds, progress=progress)
    labels = {"threads": f"plain threads, one model ({n})",
              "multi_python": f"multipy, {n} interpreter{'s' if n > 1 else ''}",
              "limit": f"limit: {n} bare process{'es' if n > 1 else ''}"}
    console.print(table(sweep.rows, title=f"{title}, {seconds:g} s per row", baseline="threads",
                        label=lambda r: labels[r.strategy], p95=False))
    for line in ratio_lines(sweep.rows):
        console.print(line, highlight=False)
    return list(sweep.rows)


def ratio_lines(rows: Sequence[Row]) -> list[str]:
    """multipy against plain threads and against the limit, as plain measured ratios.

    >>> rows = [Row("m", "threads", 2, 0, 100.0, 0, 0, 0), Row("m", "multi_python", 2, 0, 250.0, 0, 0, 0),
    ...         Row("m", "limit", 2, 0, 300.0, 0, 0, 0)]
    >>> ratio_lines(rows)
    ['m: multipy 2.50x plain threads, 0.83x the limit (2 each)']
    """
    against_threads = speedups(rows, "threads")
    against_limit = speedups(rows, "limit")
    lines = []
    for r in rows:
        if r.strategy != "multi_python":
            continue
        parts = []
        if r in against_threads:
            parts.append(f"{against_threads[r]:.2f}x plain threads")
        if r in against_limit:
            parts.append(f"{against_limit[r]:.2f}x the limit")
        if parts:
            lines.append(f"{r.benchmark}: multipy {', '.join(parts)} ({r.n_threads} each)")
    return lines


def _check_against_eager(fx, manager, model, console) -> None:
    import torch

    with torch.inference_mode():
        expected = fx.eager()(*fx.args)
    worst = 0.0
    for interp in manager.all_instances():
        with model.acquire_session(interp) as session, torch.inference_mode():
            got = session.self(*fx.args).deref()
        diff = (got - expected).abs().max().item()
        if not torch.allclose(got, expected, rtol=_CHECK_RTOL, atol=_CHECK_ATOL):
            raise DemoFailure(f"{fx.name}: interpreter {interp.index}'s output differs from eager "
                              f"PyTorch (max abs diff {diff:.3g}, rtol {_CHECK_RTOL}, "
                              f"atol {_CHECK_ATOL})")
        worst = max(worst, diff)
    console.print(f"{fx.name}: outputs match eager PyTorch on all {len(manager)} interpreter(s) "
                  f"(max abs diff {worst:.2g})")


def _memory(archive, n: int, console, err, preload) -> tuple:
    from .pss import compare_memory, memory_table_lines

    counts = (1, n) if n > 1 else (1,)
    with err.status("memory") as status:
        rows = compare_memory(archive, counts, preload=preload,
                              on_status=lambda text: status.update(f"memory (PSS): {text}"))
    console.print("memory (PSS, all processes of each side) holding all-MiniLM-L6-v2, "
                  "preload = the archive's externs:")
    for line in memory_table_lines(rows):
        console.print("  " + line, highlight=False)
    return tuple(rows)


def plot_demo(path: str | os.PathLike, result: DemoResult, *, title: str) -> None:
    """A PNG: throughput per model (plain threads, multipy, limit) and memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmarks = list(dict.fromkeys(r.benchmark for r in result.rows))
    panels = len(benchmarks) + (1 if result.memory else 0)
    fig, axes = plt.subplots(1, panels, squeeze=False, figsize=(5.2 * panels, 4.4))
    names = {"threads": "plain threads", "multi_python": "multipy", "limit": "limit"}
    colours = {"threads": "tab:gray", "multi_python": "tab:blue", "limit": "tab:green"}
    for ax, bench in zip(axes[0], benchmarks):
        mine = [r for r in result.rows if r.benchmark == bench]
        ax.bar([names[r.strategy] for r in mine], [r.work_items_per_second for r in mine],
               color=[colours[r.strategy] for r in mine])
        ax.set_title(f"{bench}, {mine[0].n_threads} threads / interpreters / processes")
        ax.set_ylabel("calls / s")
        ax.grid(True, axis="y", alpha=0.3)
    if result.memory:
        ax = axes[0][-1]
        xs = range(len(result.memory))
        width = 0.38
        ax.bar([x - width / 2 for x in xs], [r.multipy_bytes / _MIB for r in result.memory],
               width, label="multipy (host + interpreters)", color="tab:blue")
        ax.bar([x + width / 2 for x in xs], [r.eager_bytes / _MIB for r in result.memory],
               width, label="eager processes", color="tab:gray")
        ax.set_xticks(list(xs), [f"n = {r.n}" for r in result.memory])
        ax.set_ylabel("PSS, MiB")
        ax.set_title("memory holding all-MiniLM-L6-v2")
        ax.legend()
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
