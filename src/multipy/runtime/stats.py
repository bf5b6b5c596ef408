"""``InterpreterManager.statistics()``: a frozen snapshot of the pool."""

from __future__ import annotations

import dataclasses


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
