"""``InterpreterManager.statistics()``: a frozen snapshot of the pool."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


def quantile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of sorted values; 0 when there are none.

    >>> quantile([1.0, 2.0, 3.0], 0.5)
    2.0
    """
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclasses.dataclass(frozen=True)
class InterpreterStatistics:
    """One interpreter's counters.  Latencies are seconds over recent calls."""

    index: int
    pid: int | None
    generation: int
    calls: int
    in_flight: int
    failures: int
    restarts: int
    p50_latency: float
    p95_latency: float
    p99_latency: float


@dataclasses.dataclass(frozen=True)
class ManagerStatistics:
    """The pool's counters; ``interpreters`` holds one entry per interpreter."""

    backend: str
    interpreters: tuple[InterpreterStatistics, ...]

    @property
    def calls(self) -> int:
        return sum(i.calls for i in self.interpreters)

    @property
    def failures(self) -> int:
        return sum(i.failures for i in self.interpreters)

    @property
    def restarts(self) -> int:
        return sum(i.restarts for i in self.interpreters)
