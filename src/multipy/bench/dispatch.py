"""``multipy bench --dispatch``: how many calls per second the host can dispatch.

N host threads call one interpreter whose callable does nothing, so every
microsecond is dispatch: the caller's bookkeeping, the transport, the
interpreter's serve loop.  Host CPU per call (this process only; the
interpreter runs elsewhere) shows what the waiting costs.  The same run times
a bare ``os.pipe`` ping-pong between two Python processes, one byte each way,
as the yardstick a call should beat.

On a shared machine the yardstick moves as much as the calls do (8,000 to
107,000 round trips/s on one 2-core VM within an hour), so the run is cut into
``rounds`` short rounds, each timing every thread count and then the pipe, one
after the other: a call rate is compared with the pipe of its own round, and
each figure is the median over the rounds, printed with its range.

Example:
    >>> report = measure_dispatch(threads=(1, 16), seconds=1.0)   # doctest: +SKIP
    >>> for line in dispatch_lines(report):                       # doctest: +SKIP
    ...     print(line)
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import threading
import time

from ..runtime import InterpreterManager

__all__ = ["Dispatch", "DispatchReport", "Round", "measure_dispatch", "dispatch_lines"]

_NOOP_MODULE = "multipy_bench_noop"
_NOOP_SOURCE = "class Noop:\n    def __call__(self):\n        return None\n"
_ECHO = ("import os\n"
         "while True:\n"
         "    b = os.read(0, 1)\n"
         "    if not b:\n"
         "        break\n"
         "    os.write(1, b)\n")


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """One row: ``threads`` host threads calling a no-op in one interpreter."""

    threads: int
    calls: int
    seconds: float
    host_cpu_s: float
    interpreter_cpu_s: float | None = None  # None where /proc is not readable

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.seconds

    @property
    def host_cpu_us_per_call(self) -> float:
        return self.host_cpu_s / max(self.calls, 1) * 1e6

    @property
    def interpreter_cpu_us_per_call(self) -> float | None:
        if self.interpreter_cpu_s is None:
            return None
        return self.interpreter_cpu_s / max(self.calls, 1) * 1e6


def _cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of process ``pid`` so far (Linux /proc), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return None


@dataclasses.dataclass(frozen=True)
class Round:
    """One round: a row per thread count, then the pipe ping-pong, back to back."""

    rows: list[Dispatch]
    pipe_round_trips_per_s: float


@dataclasses.dataclass(frozen=True)
class DispatchReport:
    """The rounds, and which transport and backend ran.

    ``rows`` and ``pipe_round_trips_per_s`` are the medians over the rounds;
    :meth:`ratios` compares each round's calls with that round's pipe.

    >>> r = DispatchReport([Round([Dispatch(1, 300, 1.0, 0.1)], 100.0),
    ...                     Round([Dispatch(1, 100, 1.0, 0.1)], 50.0),
    ...                     Round([Dispatch(1, 200, 1.0, 0.1)], 200.0)], "native", "process")
    >>> r.rows[0].calls_per_s, r.pipe_round_trips_per_s, r.ratios(0)
    (200.0, 100.0, [3.0, 2.0, 1.0])
    """

    rounds: list[Round]
    transport: str
    backend: str

    @property
    def rows(self) -> list[Dispatch]:
        """Per thread count, the round with the median calls/s (the lower middle one
        of an even count)."""
        out = []
        for i in range(len(self.rounds[0].rows)):
            by_rate = sorted((rnd.rows[i] for rnd in self.rounds), key=lambda d: d.calls_per_s)
            out.append(by_rate[(len(by_rate) - 1) // 2])
        return out

    @property
    def pipe_round_trips_per_s(self) -> float:
        return statistics.median(rnd.pipe_round_trips_per_s for rnd in self.rounds)

    def ratios(self, i: int) -> list[float]:
        """Row ``i``'s calls/s over its own round's pipe round trips/s, per round."""
        return [rnd.rows[i].calls_per_s / rnd.pipe_round_trips_per_s for rnd in self.rounds]


class _PipePeer:
    """A child process echoing one byte at a time over two pipes (``with`` block)."""

    def __enter__(self) -> "_PipePeer":
        self.child = subprocess.Popen([sys.executable, "-c", _ECHO], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, bufsize=0)
        return self

    def __exit__(self, *exc) -> None:
        self.child.stdin.close()
        self.child.wait()
        self.child.stdout.close()

    def round_trips_per_s(self, seconds: float) -> float:
        """Round trips per second of one byte to the child and back, for ``seconds``."""
        w, r = self.child.stdin.fileno(), self.child.stdout.fileno()
        for _ in range(200):  # warm up
            os.write(w, b"x")
            os.read(r, 1)
        n = 0
        clock = time.perf_counter
        start = clock()
        end = start + seconds
        while True:
            for _ in range(100):
                os.write(w, b"x")
                os.read(r, 1)
            n += 100
            now = clock()
            if now >= end:
                return n / (now - start)


def _drive(noop, threads: int, seconds: float, pid: int | None) -> Dispatch:
    counts = [0] * threads
    go = threading.Event()
    stop = threading.Event()

    def caller(i: int) -> None:
        go.wait()
        n = 0
        while not stop.is_set():
            noop()
            n += 1
        counts[i] = n

    workers = [threading.Thread(target=caller, args=(i,), name=f"multipy-dispatch-{i}")
               for i in range(threads)]
    for t in workers:
        t.start()
    cpu0, t0, icpu0 = time.process_time(), time.perf_counter(), _cpu_seconds(pid)
    go.set()
    stop.wait(seconds)
    stop.set()
    for t in workers:
        t.join()
    elapsed, cpu, icpu = time.perf_counter() - t0, time.process_time() - cpu0, _cpu_seconds(pid)
    interp = None if icpu is None or icpu0 is None else icpu - icpu0
    return Dispatch(threads, sum(counts), elapsed, cpu, interp)


def measure_dispatch(*, threads=(1, 4, 16), seconds: float = 2.0, backend: str = "process",
                     rounds: int = 3) -> DispatchReport:
    """Calls/s and host CPU per call for each count of host threads, plus the pipe
    yardstick, in ``rounds`` interleaved rounds of ``seconds / rounds`` per row."""
    from ..transport.channel import NATIVE_WHY

    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds!r}")
    window = seconds / rounds
    done = []
    with InterpreterManager(1, backend=backend, num_threads=1) as manager, _PipePeer() as pipe:
        manager.register_module_source(_NOOP_MODULE, _NOOP_SOURCE)
        with manager.acquire_one() as s:
            noop = s.create_movable(s.global_(_NOOP_MODULE, "Noop")())
        for _ in range(500):  # warm up
            noop()
        pid = manager.all_instances()[0].pid
        for _ in range(rounds):
            rows = [_drive(noop, n, window, pid) for n in threads]
            done.append(Round(rows, pipe.round_trips_per_s(window)))
    return DispatchReport(done, NATIVE_WHY, backend)


def _spread(values) -> str:
    return f"{min(values):,.0f}-{max(values):,.0f}"


def dispatch_lines(report: DispatchReport) -> list[str]:
    """One plain line per thread count: the medians over the rounds, their ranges,
    and the calls against the pipe ping-pong of the same round."""
    n = len(report.rounds)
    pipes = [rnd.pipe_round_trips_per_s for rnd in report.rounds]
    out = [f"dispatch, {report.backend} backend, {os.cpu_count()} cores; transport {report.transport}; "
           f"median of {n} interleaved round(s) of {report.rounds[0].rows[0].seconds:.1f} s per row",
           f"bare os.pipe ping-pong between two Python processes: {report.pipe_round_trips_per_s:,.0f} "
           f"round trips/s (rounds {_spread(pipes)})"]
    for i, r in enumerate(report.rows):
        rates = [rnd.rows[i].calls_per_s for rnd in report.rounds]
        ratios = report.ratios(i)
        host = statistics.median(rnd.rows[i].host_cpu_us_per_call for rnd in report.rounds)
        interp = [rnd.rows[i].interpreter_cpu_us_per_call for rnd in report.rounds]
        out.append(f"{r.threads:>3} host thread(s) -> 1 no-op interpreter: {r.calls_per_s:,.0f} calls/s "
                   f"(rounds {_spread(rates)}; {statistics.median(ratios):.2f}x the pipe ping-pong of "
                   f"the same round, rounds {min(ratios):.2f}-{max(ratios):.2f}), "
                   f"host CPU {host:.1f} µs/call"
                   + ("" if None in interp
                      else f", interpreter CPU {statistics.median(interp):.1f} µs/call"))
    return out
