"""``InterpreterManager.statistics()``: a frozen snapshot of the pool."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence


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
    #: False while the interpreter is down (crashed and restarting, or broken).
    available: bool = True


@dataclasses.dataclass(frozen=True)
class ManagerStatistics:
    """The pool's counters; ``interpreters`` holds one entry per interpreter.

    ``notes`` are plain-language remarks on how the pool runs, for example
    ``preload`` modules that could not be shared from the fork server.
    """

    backend: str
    interpreters: tuple[InterpreterStatistics, ...]
    notes: tuple[str, ...] = ()

    @property
    def calls(self) -> int:
        return sum(i.calls for i in self.interpreters)

    @property
    def failures(self) -> int:
        return sum(i.failures for i in self.interpreters)

    @property
    def restarts(self) -> int:
        return sum(i.restarts for i in self.interpreters)


@dataclasses.dataclass(frozen=True)
class BatchStatistics:
    """What a :class:`~multipy.runtime.batching.BatchedObj` did so far.

    ``batch_sizes`` maps a batch's number of requests to how many such batches
    were sent.  ``sent_on_arrival`` counts requests that found an interpreter
    free and were sent at once (a lone caller's requests all are: nothing waits
    a timer); ``queued`` those that waited for an interpreter to free.
    ``retried_alone`` counts requests run again on their own after their batch
    raised or returned something that cannot be split by rows.  Waits are
    seconds from the call to its batch being sent.
    """

    requests: int
    batches: int
    mean_batch_size: float
    batch_sizes: Mapping[int, int]
    sent_on_arrival: int
    queued: int
    retried_alone: int
    mean_wait: float
    p50_wait: float
    p99_wait: float
