"""``multipy bench --async`` and ``--batching``: many callers, few interpreters.

Both run a package (the ``smallops`` example by default: 40 residual
``Linear(16, 16)`` layers, batch-1 input) on one manager of ``interpreters``
interpreters, with every interpreter limited to one intra-op thread.

``--async`` compares one way of keeping the interpreters busy with another:

==================  ===========================================================
strategy            callers
==================  ===========================================================
blocking_threads    n host threads, each calling ``model(x)`` in a loop
asyncio             one event-loop thread running n tasks, each awaiting
                    ``model.acall(x)`` in a loop
==================  ===========================================================

``--batching`` runs n caller threads of batch-1 requests against the model,
``unbatched`` (``model(x)``) and ``batched`` (``model.batched()(x)``).  Every
caller has its own input; before the clock starts each caller computes its
unbatched answer.  Both strategies copy every answer (the same work on each
side); the batched copies are kept and, after the clock stopped, compared with it (the comparison is not part of the measured calls): how many
are bit-identical, how many fall outside ``torch.allclose(rtol=1e-5,
atol=1e-6)`` (a wrong answer), and the largest difference relative to the
answer's scale.  Matrix products over a batch round differently from batch-1
ones, so a model of ``Linear`` layers gives answers equal to float32 rounding,
not bit for bit.

Throughput is calls over the wall windows; latencies are per call.  The two
strategies of a comparison run in interleaved windows (``rounds`` of each,
``seconds / rounds`` long, in the order A B, B A, A B, B A, ...), so that a
machine whose load changes from second to second gives both the same
conditions, and neither always runs first.

Example:
    >>> rows = measure_async("smallops", seconds=1.0)             # doctest: +SKIP
    >>> [(r.strategy, r.n_threads) for r in rows]                # doctest: +SKIP
    [('blocking_threads', 16), ('asyncio', 64)]
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence

import torch

from ..runtime import InterpreterManager
from ._child import _map_tensors
from .harness import Result, run_threads
from .report import Row
from .targets import resolve_target

__all__ = ["BatchingCheck", "async_lines", "batching_lines", "measure_async", "measure_batching"]


def _model(manager: InterpreterManager, archive: str):
    return manager.load_package(archive).load_pickle("model", "model.pkl")


def _input(archive: str, seed: int = 0) -> tuple:
    """The archive's example inputs, every tensor replaced by a random one of its shape."""
    example = torch.package.PackageImporter(archive).load_pickle("model", "example.pkl")
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype) if isinstance(t, torch.Tensor)
                 else t for t in example)


def run_tasks(make_call, n: int, seconds: float) -> Result:
    """Run ``n`` asyncio tasks on one event loop (this thread), each awaiting
    ``make_call(i)()`` in a loop for ``seconds`` after a warm-up call each."""

    async def main() -> Result:
        calls = [make_call(i) for i in range(n)]
        await asyncio.gather(*(call() for call in calls))  # warm-up
        latencies: list[float] = []
        started = time.perf_counter()
        deadline = started + seconds

        async def loop(call) -> None:
            clock = time.perf_counter
            now = clock()
            while now < deadline:
                await call()
                after = clock()
                latencies.append(after - now)
                now = after

        await asyncio.gather(*(loop(call) for call in calls))
        return Result.from_latencies(n, latencies, time.perf_counter() - started)

    return asyncio.run(main())


def _rounds(measures: dict, seconds: float, rounds: int) -> dict[str, Result]:
    """Run each ``measures[name](seconds / rounds)`` in turn, ``rounds`` times
    (every other round in reverse order), and merge each one's windows: on a
    machine whose load changes from second to second, interleaved windows
    compare strategies under the same load, and a load that rises or falls
    steadily favours neither."""
    parts: dict[str, list[Result]] = {name: [] for name in measures}
    order = list(measures.items())
    for round_ in range(rounds):
        for name, measure in (order if round_ % 2 == 0 else order[::-1]):
            parts[name].append(measure(seconds / rounds))
    return {name: _merged(results) for name, results in parts.items()}


def _merged(results: list[Result]) -> Result:
    weights = [r.work_items_completed for r in results]
    total = sum(weights) or 1

    def mean(field: str) -> float:
        return sum(getattr(r, field) * w for r, w in zip(results, weights)) / total

    return Result(results[0].n_threads, sum(weights), sum(r.seconds for r in results),
                  mean("p25_latency"), mean("p50_latency"), mean("p95_latency"))


def measure_async(package: str = "smallops", *, interpreters: int = 2, threads: int = 16,
                  tasks: int = 64, seconds: float = 3.0, rounds: int = 4,
                  backend: str = "process") -> list[Row]:
    """``threads`` blocking host threads vs one event loop of ``tasks`` concurrent
    ``acall`` tasks, on one manager of ``interpreters``; ``rounds`` interleaved
    windows each (latency percentiles are the windows' means, weighted by calls)."""
    target = resolve_target(package)
    archive = str(target.archive)
    x = _input(archive)
    with InterpreterManager(interpreters, backend=backend, num_threads=1) as manager:
        model = _model(manager, archive)
        results = _rounds({
            "blocking_threads": lambda s: run_threads(lambda i: (lambda: model(*x)), threads, s),
            "asyncio": lambda s: run_tasks(lambda i: (lambda: model.acall(*x)), tasks, s),
        }, seconds, rounds)
    name = f"{target.name}@{interpreters}interp"
    return [Row.of(name, strategy, result) for strategy, result in results.items()]


@dataclasses.dataclass(frozen=True)
class BatchingCheck:
    """How batched answers compared with unbatched ones, and the batches formed."""

    callers: int
    answers: int
    identical: int        # bit for bit equal to the unbatched answer
    not_close: int        # outside torch.allclose(rtol=1e-5, atol=1e-6): a wrong answer
    max_rel_diff: float   # largest |batched - unbatched| / max |unbatched|
    mean_batch_size: float
    sent_on_arrival: int
    queued: int


def measure_batching(package: str = "smallops", *, interpreters: int = 2,
                     callers: Sequence[int] = (1, 16, 64), seconds: float = 3.0,
                     max_batch_size: int = 32, max_delay_ms: float = 2.0, rounds: int = 4,
                     backend: str = "process") -> tuple[list[Row], list[BatchingCheck]]:
    """Unbatched vs batched calls from ``callers`` host threads of batch-1 requests,
    ``rounds`` interleaved windows each."""
    target = resolve_target(package)
    archive = str(target.archive)
    rows, checks = [], []
    with InterpreterManager(interpreters, backend=backend, num_threads=1) as manager:
        model = _model(manager, archive)
        inputs = [_input(archive, seed) for seed in range(max(callers))]
        expected = [model(*x) for x in inputs]
        name = f"{target.name}@{interpreters}interp"
        for n in callers:
            fast = model.batched(max_batch_size=max_batch_size, max_delay_ms=max_delay_ms)
            answers: list[list] = [[] for _ in range(n)]
            results = _rounds({
                "unbatched": lambda s: run_threads(lambda i: _kept(model, inputs[i], None), n, s),
                "batched": lambda s: run_threads(lambda i: _kept(fast, inputs[i], answers[i]), n, s),
            }, seconds, rounds)
            rows += [Row.of(name, strategy, result) for strategy, result in results.items()]
            tally = _Tally()
            for i, outs in enumerate(answers):
                tally.check(outs, expected[i])
            stats = fast.statistics()
            checks.append(BatchingCheck(n, tally.answers, tally.identical, tally.not_close,
                                        tally.max_rel, stats.mean_batch_size,
                                        stats.sent_on_arrival, stats.queued))
    return rows, checks


class _Tally:
    """How a caller's batched answers compare with its unbatched one."""

    def __init__(self) -> None:
        self.answers = self.identical = self.not_close = 0
        self.max_rel = 0.0

    def check(self, outs: list, expected) -> None:
        scale = float(expected.abs().max()) or 1.0
        for out in outs:
            same = torch.equal(out, expected)
            self.answers += 1
            self.identical += same
            if not same:
                self.not_close += not torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
                self.max_rel = max(self.max_rel, float((out - expected).abs().max()) / scale)


def _kept(model, x: tuple, answers: list | None):
    """A call of ``model(*x)`` that keeps a copy of its answer in ``answers``
    (checked once the clock stopped), or copies it and drops it (``None``).

    Both strategies pay the same copy: a kept answer that still viewed the
    interpreter's result memory would hold that memory for the whole run and
    make the kept side's calls dearer than the dropped side's.
    """
    keep = (lambda out: None) if answers is None else answers.append

    def call():
        keep(_copy(model(*x)))
    return call


def _copy(value):
    """``value`` with every tensor in it (also in tuples, lists, dicts) cloned."""
    return _map_tensors(value, torch.Tensor.clone)


def async_lines(rows: Sequence[Row]) -> list[str]:
    """The asyncio / blocking ratio, in words."""
    by = {r.strategy: r for r in rows}
    blocking, tasked = by["blocking_threads"], by["asyncio"]
    ratio = tasked.work_items_per_second / blocking.work_items_per_second
    return [f"asyncio: one event-loop thread, {tasked.n_threads} concurrent acall tasks: "
            f"{tasked.work_items_per_second:,.0f} calls/s = {ratio:.2f} x "
            f"{blocking.n_threads} blocking host threads ({blocking.work_items_per_second:,.0f} calls/s)"]


def batching_lines(rows: Sequence[Row], checks: Sequence[BatchingCheck]) -> list[str]:
    """Batched / unbatched per caller count, with the answer check."""
    rate = {(r.strategy, r.n_threads): r.work_items_per_second for r in rows}
    out = []
    for check in checks:
        n = check.callers
        ratio = rate[("batched", n)] / rate[("unbatched", n)]
        verdict = (f"{check.identical} bit-identical to unbatched, {check.not_close} outside "
                   f"allclose(rtol=1e-5), max relative difference {check.max_rel_diff:.1e}")
        out.append(f"batching, {n} caller(s): batched {ratio:.2f} x unbatched; mean batch "
                   f"{check.mean_batch_size:.1f}, {check.sent_on_arrival} sent on arrival, "
                   f"{check.queued} queued; {check.answers} answers {verdict}")
    return out
