"""``multipy bench --overhead``: what a call through an interpreter costs over a direct one.

The model returns its input (the ``identity`` example), so a call is pure
dispatch: signal the interpreter, move the tensor in, run a no-op, move it back.
Sequential calls on a manager of one interpreter are timed one by one and
compared, quantile by quantile, with direct calls of the same model in the host.

On a shared machine a figure moves with the load from minute to minute, so the
calls are cut into ``rounds`` interleaved rounds (each shape, direct then
through the interpreter, in every round): the p50 overhead is the median of the
rounds' own overheads, printed with their range; p99s are over all calls.

Example:
    >>> for row in measure_overhead(calls=200):                # doctest: +SKIP
    ...     print(row.label, round(row.overhead_p50_us))
    1x16 12
    1x3x224x224 41
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from ..runtime import InterpreterManager
from ..runtime.stats import quantile
from . import _child
from .targets import example_archive

__all__ = ["OVERHEAD_SHAPES", "Overhead", "measure_overhead", "overhead_lines", "overhead_table"]

#: Input shapes timed: a small vector, and an image-sized tensor (bytes to move).
OVERHEAD_SHAPES: tuple[tuple[int, ...], ...] = ((1, 16), (1, 3, 224, 224))
_WARMUP = 50


@dataclasses.dataclass(frozen=True)
class Overhead:
    """Per-call times in microseconds for one input shape."""

    label: str
    calls: int
    direct_p50_us: float
    direct_p99_us: float
    p50_us: float
    p99_us: float
    device: str = "cpu"
    #: Each round's p50 through the interpreter minus its p50 direct (empty: one
    #: measurement, the p50s above).
    rounds_overhead_p50_us: tuple[float, ...] = ()

    @property
    def overhead_p50_us(self) -> float:
        """The median of the rounds' p50 overheads."""
        if self.rounds_overhead_p50_us:
            return statistics.median(self.rounds_overhead_p50_us)
        return self.p50_us - self.direct_p50_us

    @property
    def overhead_p99_us(self) -> float:
        return self.p99_us - self.direct_p99_us


def _timed(fn: Callable[[], object], calls: int) -> list[float]:
    for _ in range(_WARMUP):
        fn()
    clock = time.perf_counter_ns
    out = []
    for _ in range(calls):
        t = clock()
        fn()
        out.append((clock() - t) / 1e3)
    out.sort()
    return out


def measure_overhead(*, calls: int = 2000, backend: str = "process",
                     device: str = "cpu", rounds: int = 1) -> list[Overhead]:
    """Time ``calls`` sequential calls per shape, direct and through one interpreter,
    in ``rounds`` interleaved rounds of ``calls / rounds`` each.

    On a CUDA ``device`` the input lives there and every call, direct or not,
    ends with a sync of the caller's stream, so the time is the whole round trip.
    """
    if rounds < 1 or calls < rounds:
        raise ValueError(f"rounds must be at least 1 and at most calls, got {rounds!r} "
                         f"for {calls!r} calls")
    archive = example_archive("identity")
    direct = _child.load_from_archive(str(archive), "model.pkl")
    kind = torch.device(device).type
    sync = torch.cuda.current_stream().synchronize if kind == "cuda" else (lambda: None)
    per_round = calls // rounds
    timed: dict[tuple, list[tuple[list[float], list[float]]]] = {s: [] for s in OVERHEAD_SHAPES}
    with InterpreterManager(1, backend=backend, num_threads=1) as manager:
        model = manager.load_package(archive).load_pickle("model", "model.pkl")
        inputs = {shape: torch.randn(*shape, device=device) for shape in OVERHEAD_SHAPES}
        for _ in range(rounds):
            for shape, x in inputs.items():
                here = _timed(lambda: (direct(x), sync()), per_round)
                there = _timed(lambda: (model(x), sync()), per_round)
                timed[shape].append((here, there))
    out = []
    for shape, done in timed.items():
        here = sorted(t for h, _ in done for t in h)
        there = sorted(t for _, th in done for t in th)
        out.append(Overhead(
            "x".join(map(str, shape)), per_round * rounds,
            statistics.median(quantile(h, 0.5) for h, _ in done), quantile(here, 0.99),
            statistics.median(quantile(th, 0.5) for _, th in done), quantile(there, 0.99), kind,
            tuple(quantile(th, 0.5) - quantile(h, 0.5) for h, th in done) if rounds > 1 else ()))
    return out


def overhead_table(rows: list[Overhead]):
    """A rich Table of :func:`measure_overhead`'s rows (µs per call)."""
    from rich.table import Table

    table = Table(title="per-call time, µs: direct call vs through one interpreter")
    table.add_column("input", no_wrap=True)
    for name in ("direct p50", "multipy p50", "multipy p99", "overhead p50", "overhead p99"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(r.label, f"{r.direct_p50_us:.1f}", f"{r.p50_us:.1f}", f"{r.p99_us:.1f}",
                      f"{r.overhead_p50_us:.1f}", f"{r.overhead_p99_us:.1f}")
    return table


def overhead_lines(rows: list[Overhead]) -> list[str]:
    """One plain line per shape (greppable; the table may be cut to the terminal).

    >>> overhead_lines([Overhead("1x16", 300, 2.0, 3.0, 12.0, 40.0, "cpu", (9.0, 10.0, 14.0))])
    ['overhead 1x16: p50 10.0 µs (rounds 9.0-14.0), p99 37.0 µs over a direct call (300 calls in 3 interleaved rounds)']
    """
    out = []
    for r in rows:
        spread = (f" (rounds {min(r.rounds_overhead_p50_us):.1f}-{max(r.rounds_overhead_p50_us):.1f})"
                  if r.rounds_overhead_p50_us else "")
        n = len(r.rounds_overhead_p50_us)
        out.append(f"overhead {r.label}{' on cuda' if r.device == 'cuda' else ''}: "
                   f"p50 {r.overhead_p50_us:.1f} µs{spread}, p99 {r.overhead_p99_us:.1f} µs over a "
                   f"direct call ({r.calls} calls" + (f" in {n} interleaved rounds)" if n else ")"))
    return out
