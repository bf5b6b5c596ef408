"""``multipy bench --overhead``: what a call through an interpreter costs over a direct one.

The model returns its input (the ``identity`` example), so a call is pure
dispatch: signal the interpreter, move the tensor in, run a no-op, move it back.
Sequential calls on a manager of one interpreter are timed one by one and
compared, quantile by quantile, with direct calls of the same model in the host.

Example:
    >>> for row in measure_overhead(calls=200):                # doctest: +SKIP
    ...     print(row.label, round(row.overhead_p50_us))
    1x16 12
    1x3x224x224 41
"""

from __future__ import annotations

import dataclasses
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

    @property
    def overhead_p50_us(self) -> float:
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
                     device: str = "cpu") -> list[Overhead]:
    """Time ``calls`` sequential calls per shape, direct and through one interpreter.

    On a CUDA ``device`` the input lives there and every call, direct or not,
    ends with a sync of the caller's stream, so the time is the whole round trip.
    """
    archive = example_archive("identity")
    direct = _child.load_from_archive(str(archive), "model.pkl")
    kind = torch.device(device).type
    sync = torch.cuda.current_stream().synchronize if kind == "cuda" else (lambda: None)
    out = []
    with InterpreterManager(1, backend=backend, num_threads=1) as manager:
        model = manager.load_package(archive).load_pickle("model", "model.pkl")
        for shape in OVERHEAD_SHAPES:
            x = torch.randn(*shape, device=device)
            here = _timed(lambda: (direct(x), sync()), calls)
            there = _timed(lambda: (model(x), sync()), calls)
            out.append(Overhead("x".join(map(str, shape)), calls, quantile(here, 0.5),
                                quantile(here, 0.99), quantile(there, 0.5),
                                quantile(there, 0.99), kind))
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
    """One plain line per shape (greppable; the table may be cut to the terminal)."""
    return [f"overhead {r.label}{' on cuda' if r.device == 'cuda' else ''}: "
            f"p50 {r.overhead_p50_us:.1f} µs, p99 {r.overhead_p99_us:.1f} µs over a direct call "
            f"({r.calls} calls)"
            for r in rows]
