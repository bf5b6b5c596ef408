"""``multipy bench --dispatch``: how many calls per second the host can dispatch.

N host threads call one interpreter whose callable does nothing, so every
microsecond is dispatch: the caller's bookkeeping, the transport, the
interpreter's serve loop.  Host CPU per call (this process only; the
interpreter runs elsewhere) shows what the waiting costs.  The same run times
a bare ``os.pipe`` ping-pong between two Python processes, one byte each way,
as the yardstick a call should beat.

Example:
    >>> report = measure_dispatch(threads=(1, 16), seconds=1.0)   # doctest: +SKIP
    >>> for line in dispatch_lines(report):                       # doctest: +SKIP
    ...     print(line)
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time

from ..runtime import InterpreterManager

__all__ = ["Dispatch", "DispatchReport", "measure_dispatch", "dispatch_lines"]

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
class DispatchReport:
    """The rows, the pipe ping-pong beside them, and which transport ran."""

    rows: list[Dispatch]
    pipe_round_trips_per_s: float
    transport: str
    backend: str


def _pipe_ping_pong(seconds: float) -> float:
    """Round trips per second of one byte between this process and a child over pipes."""
    child = subprocess.Popen([sys.executable, "-c", _ECHO], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, bufsize=0)
    w, r = child.stdin.fileno(), child.stdout.fileno()
    try:
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
    finally:
        child.stdin.close()
        child.wait()
        child.stdout.close()


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


def measure_dispatch(*, threads=(1, 4, 16), seconds: float = 2.0,
                     backend: str = "process") -> DispatchReport:
    """Calls/s and host CPU per call for each count of host threads, plus the pipe yardstick."""
    from ..transport.channel import NATIVE_WHY

    rows = []
    with InterpreterManager(1, backend=backend, num_threads=1) as manager:
        manager.register_module_source(_NOOP_MODULE, _NOOP_SOURCE)
        with manager.acquire_one() as s:
            noop = s.create_movable(s.global_(_NOOP_MODULE, "Noop")())
        for _ in range(500):  # warm up
            noop()
        pid = manager.all_instances()[0].pid
        for n in threads:
            rows.append(_drive(noop, n, seconds, pid))
    pipe = _pipe_ping_pong(seconds)
    return DispatchReport(rows, pipe, NATIVE_WHY, backend)


def dispatch_lines(report: DispatchReport) -> list[str]:
    """One plain line per row, each against the pipe ping-pong of the same run."""
    out = [f"dispatch, {report.backend} backend, {os.cpu_count()} cores; transport {report.transport}",
           f"bare os.pipe ping-pong between two Python processes: {report.pipe_round_trips_per_s:,.0f} round trips/s"]
    for r in report.rows:
        out.append(f"{r.threads:>3} host thread(s) -> 1 no-op interpreter: {r.calls_per_s:,.0f} calls/s "
                   f"({r.calls_per_s / report.pipe_round_trips_per_s:.2f}x the pipe ping-pong), "
                   f"host CPU {r.host_cpu_us_per_call:.1f} µs/call"
                   + ("" if r.interpreter_cpu_us_per_call is None
                      else f", interpreter CPU {r.interpreter_cpu_us_per_call:.1f} µs/call"))
    return out
