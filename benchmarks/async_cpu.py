"""CPU per call of ``multipy bench --async``'s two strategies, host and interpreters.

The ``bench --async`` set-up (the ``smallops`` example on 2 process interpreters,
one intra-op thread each): ``--threads`` blocking host threads calling
``model(x)``, then one event loop of ``--tasks`` tasks awaiting ``model.acall(x)``,
``--rounds`` times in turn.  For each window it prints calls/s and, per call, the
CPU time of the host process (every thread) and of the interpreters (from
``/proc``), and the load average::

    PYTHONPATH=src python benchmarks/async_cpu.py [--seconds 3] [--rounds 2]
    MULTIPY_CHANNEL_COUNTS=1 PYTHONPATH=src python benchmarks/async_cpu.py

With every interpreter busy all the time, calls/s is about the cores' time divided
by the CPU a call costs on both sides: CPU per call says why one strategy runs
faster than the other, and depends on the machine's load much less than calls/s
does.  With ``MULTIPY_CHANNEL_COUNTS=1`` (native channel) it also prints how often
per call each interpreter found its request ring empty and waited (``waits``),
and how often that wait went to sleep (``sleeps``): an interpreter that waits is
one the host does not keep fed.
"""
import argparse
import os
import time

from multipy.bench.concurrency import _input, _model, run_tasks
from multipy.bench.dispatch import _cpu_seconds
from multipy.bench.harness import run_threads
from multipy.bench.targets import resolve_target
from multipy.runtime import InterpreterManager
from multipy.transport import channel as _channel
from multipy.transport.messages import Op


def _counters(manager) -> list[dict] | None:
    """Each interpreter's channel counters, when the extension keeps them."""
    if not _channel.NATIVE or os.environ.get("MULTIPY_CHANNEL_COUNTS") != "1":
        return None
    return [w.request(Op.EXEC, ("import multipy._native as n\nresult = n.counters()",))
            for w in manager._workers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default="smallops")
    parser.add_argument("--interpreters", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0, help="per window")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    archive = str(resolve_target(args.package).archive)
    x = _input(archive)
    with InterpreterManager(args.interpreters, backend="process", num_threads=1) as manager:
        model = _model(manager, archive)
        for _ in range(50):
            model(*x)
        strategies = {
            f"{args.threads} blocking threads": lambda s: run_threads(
                lambda i: (lambda: model(*x)), args.threads, s),
            f"{args.tasks} acall tasks": lambda s: run_tasks(
                lambda i: (lambda: model.acall(*x)), args.tasks, s),
        }
        for _ in range(args.rounds):
            for name, run in strategies.items():
                before = _counters(manager)
                host0 = time.process_time()
                interp0 = sum(_cpu_seconds(w.pid) for w in manager._workers)
                result = run(args.seconds)
                host = time.process_time() - host0
                interp = sum(_cpu_seconds(w.pid) for w in manager._workers) - interp0
                after = _counters(manager)
                n = max(result.work_items_completed, 1)
                line = (f"{name:>19}: {n / result.seconds:7,.0f} calls/s | CPU per call: host "
                        f"{host / n * 1e6:6.1f} µs, interpreters {interp / n * 1e6:7.1f} µs")
                if before is not None:
                    waits = sum(b["waits"] - a["waits"] for a, b in zip(before, after))
                    sleeps = sum(b["sleeps"] - a["sleeps"] for a, b in zip(before, after))
                    line += f" | interpreter waits {waits / n:.2f}, sleeps {sleeps / n:.2f}"
                print(f"{line}  (load {open('/proc/loadavg').read().split()[0]})", flush=True)


if __name__ == "__main__":
    main()
