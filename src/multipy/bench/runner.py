"""The sweep behind ``multipy bench``: targets × thread counts × strategies.

::

    for target:                      Fixtures(target): inputs, host models, managers
      for n in threads:              one manager of min(n, max) interpreters, reused
        for strategy:                STRATEGIES[strategy](fixtures, n, seconds) -> Result
          progress bar ◀── on_tick        └── Row(benchmark, strategy, n, ...)

Example:
    >>> sweep = run_sweep(["smallops"], [Strategy.THREADS], [1, 2], seconds=0.5,
    ...                   max_interpreters=2)                   # doctest: +SKIP
    >>> [r.n_threads for r in sweep.rows]                      # doctest: +SKIP
    [1, 2]
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import torch

from .report import Row
from .strategies import CAPPED, STRATEGIES, Fixtures, Skipped, Strategy
from .targets import Target, resolve_target

__all__ = ["DEFAULT_SWEEP", "Sweep", "host_threads", "progress_bar", "run_sweep", "thread_counts"]

#: deploy_benchmark's thread counts, cut at the maximum asked for.
DEFAULT_SWEEP = (1, 2, 4, 8, 16, 32, 40)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Rows in report order (benchmark, strategy, threads) and notes on skipped rows."""

    rows: tuple[Row, ...]
    notes: tuple[str, ...]


def thread_counts(max_threads: int, /) -> list[int]:
    """The default sweep up to ``max_threads``, ending at ``max_threads`` itself.

    Example:
        >>> thread_counts(6)
        [1, 2, 4, 6]
    """
    counts = [n for n in DEFAULT_SWEEP if n <= max_threads]
    if not counts or counts[-1] != max_threads:
        counts.append(max_threads)
    return counts


@contextlib.contextmanager
def host_threads(n: int, /) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` in the host, then restore it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def progress_bar(console=None):
    """A transient rich progress bar (on stderr unless a console is given)."""
    from rich.console import Console
    from rich.progress import (BarColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed:.1f}/{task.total:.0f} rows"), TimeElapsedColumn(),
                  console=console or Console(stderr=True), transient=True) as progress:
        yield progress


def run_sweep(targets: Sequence[str | Target], strategies: Sequence[Strategy],
              threads: Sequence[int], *, seconds: float, max_interpreters: int,
              backend: str = "process", progress=None) -> Sweep:
    """Measure every strategy at every thread count on every target.

    ``limit`` rows stop at ``max_interpreters`` processes.  A strategy that
    cannot run on a target (``jit`` without a ``_jit.pt``) is left out with a
    note.  ``progress`` is a rich Progress to draw on (optional).
    """
    resolved = [t if isinstance(t, Target) else resolve_target(t) for t in targets]
    plan = [(target, n, s) for target in resolved for n in threads for s in strategies
            if not (s in CAPPED and n > max_interpreters)]
    task = progress.add_task("bench", total=len(plan)) if progress is not None else None
    rows: list[Row] = []
    notes: list[str] = []
    skipped: set[tuple[str, Strategy]] = set()
    done = 0

    def status(text: str) -> None:
        if progress is not None:
            progress.update(task, description=text)

    with host_threads(1):
        for target in resolved:
            with Fixtures(target, max_interpreters=max_interpreters, backend=backend,
                          on_status=lambda text, t=target: status(f"{t.name}: {text}")) as fx:
                for _, n, strategy in (p for p in plan if p[0] is target):
                    if (target.name, strategy) in skipped:
                        done += 1
                        continue
                    status(f"{target.name}: {strategy.value} x{n}")

                    def tick(fraction: float, base: int = done) -> None:
                        if progress is not None:
                            progress.update(task, completed=base + fraction)

                    try:
                        result = STRATEGIES[strategy](fx, n, seconds, tick)
                    except Skipped as why:
                        skipped.add((target.name, strategy))
                        notes.append(f"{target.name}: {strategy.value} skipped: {why}")
                    else:
                        rows.append(Row.of(target.name, strategy.value, result))
                    done += 1
                    if progress is not None:
                        progress.update(task, completed=done)
    order = {s.value: i for i, s in enumerate(Strategy)}
    first = {t.name: i for i, t in reversed(list(enumerate(resolved)))}
    rows.sort(key=lambda r: (first[r.benchmark], order[r.strategy], r.n_threads))
    return Sweep(tuple(rows), tuple(notes))
