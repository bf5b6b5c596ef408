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

from .errors import BenchError
from .report import Row
from .strategies import CAPPED, STRATEGIES, Fixtures, Skipped, Strategy
from .targets import Target, resolve_target

__all__ = ["DEFAULT_SWEEP", "BenchError", "Sweep", "host_threads", "progress_bar", "run_rows", "run_sweep",
           "thread_counts"]

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
    """A transient rich progress bar on stderr (unless a console is given).

    Yields ``None`` when that console is not a terminal (logs, pipes, tests):
    nothing to animate there, and the runner accepts ``progress=None``.
    """
    from rich.console import Console
    from rich.progress import (BarColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)

    console = console or Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed:.1f}/{task.total:.0f} rows"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        yield progress


def run_rows(fx: Fixtures, plan: Sequence[tuple[Strategy, int]], *, seconds: float,
             progress=None) -> Sweep:
    """Measure ``(strategy, n)`` pairs, in order, on one target's fixtures.

    A strategy that cannot run on the target (``jit`` without a ``_jit.pt``)
    is left out with a note.  ``progress`` is a rich Progress to draw on.
    """
    name = fx.name
    task = progress.add_task(name, total=len(plan)) if progress is not None else None
    rows: list[Row] = []
    notes: list[str] = []
    skipped: set[Strategy] = set()

    def show(**fields) -> None:
        if progress is not None:
            progress.update(task, **fields)

    fx.on_status = lambda text: show(description=f"{name}: {text}")
    with host_threads(1):
        for done, (strategy, n) in enumerate(plan):
            if strategy not in skipped:
                show(description=f"{name}: {strategy.value} x{n}")
                try:
                    result = STRATEGIES[strategy](
                        fx, n, seconds, lambda f, base=done: show(completed=base + f))
                except Skipped as why:
                    skipped.add(strategy)
                    notes.append(f"{name}: {strategy.value} skipped: {why}")
                except Exception as exc:
                    detail = str(exc).strip().splitlines()
                    raise BenchError(f"{name}: {strategy.value} x{n} failed: "
                                     f"{type(exc).__name__}: {detail[0] if detail else ''}"
                                     ) from exc
                else:
                    rows.append(Row.of(name, strategy.value, result, device=fx.device))
            show(completed=done + 1)
    return Sweep(tuple(rows), tuple(notes))


def run_sweep(targets: Sequence[str | Target], strategies: Sequence[Strategy],
              threads: Sequence[int], *, seconds: float, max_interpreters: int,
              backend: str = "process", progress=None, device: str = "cpu",
              batch: int = 1) -> Sweep:
    """Measure every strategy at every thread count on every target.

    ``device`` (``"cpu"``, ``"cuda"``) is where the models and inputs live;
    ``batch`` repeats the example inputs to that many rows, and rows are then
    named ``<target>@b<batch>`` (see :class:`Fixtures`).

    Thread counts are the outer loop so that ``one_python`` and
    ``multi_python`` share one manager per count.  ``limit`` rows stop at
    ``max_interpreters`` processes.  Rows come back grouped by target, then
    strategy (in :class:`Strategy` order), then thread count.
    """
    resolved = [t if isinstance(t, Target) else resolve_target(t) for t in targets]
    plan = [(s, n) for n in threads for s in strategies
            if not (s in CAPPED and n > max_interpreters)]
    order = {s.value: i for i, s in enumerate(Strategy)}
    rows: list[Row] = []
    notes: list[str] = []
    for target in resolved:
        with Fixtures(target, max_interpreters=max_interpreters, backend=backend,
                      device=device, batch=batch) as fx:
            sweep = run_rows(fx, plan, seconds=seconds, progress=progress)
        rows.extend(sorted(sweep.rows, key=lambda r: (order[r.strategy], r.n_threads)))
        notes.extend(sweep.notes)
    return Sweep(tuple(rows), tuple(notes))
