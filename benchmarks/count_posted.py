"""How often an interpreter waits for its next posted call, by pipeline depth.

``--interpreters`` process interpreters (default 1) run a call that keeps its core busy for ``--work-us``
microseconds (a small model's forward); one asyncio event loop keeps
``--tasks`` ``acall``s in flight on them for ``--seconds``.  Each depth in
``--depths`` runs in a fresh Python (``MULTIPY_PIPELINE_DEPTH`` is read at
import).  Per call it prints what depends little on machine load:

* interpreter waits: how often the interpreter found its request ring empty
  after a call and had to wait (spin, then FUTEX_WAIT) for the next request,
  i.e. sat idle for a host round trip (the channel's own counters;
  ``MULTIPY_CHANNEL_COUNTS=1`` is set for the child);
* interpreter sleeps and context switches: waits that went to sleep;
* interpreter and host CPU per call, and calls/s (these depend on load).

    PYTHONPATH=src python benchmarks/count_posted.py [--depths 1,2,4] [--tasks 8] [--interpreters 1] [--seconds 2]
"""
import argparse
import asyncio
import os
import subprocess
import sys
import time

BUSY_MODULE = "multipy_bench_busy"
BUSY_SOURCE = (
    "import time\n"
    "class Busy:\n"
    "    def __init__(self, seconds):\n"
    "        self.seconds = seconds\n"
    "    def __call__(self):\n"
    "        end = time.perf_counter() + self.seconds\n"
    "        while time.perf_counter() < end:\n"
    "            pass\n"
)


def child(tasks: int, seconds: float, work: float, interpreters: int) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from count_switches import interpreter_counters, switches

    from multipy import _native
    from multipy.bench.dispatch import _cpu_seconds
    from multipy.runtime import InterpreterManager
    from multipy.transport import channel

    if not channel.NATIVE:
        print(f"depth -: {channel.NATIVE_WHY}")
        return
    with InterpreterManager(interpreters, backend="process", num_threads=1) as manager:
        manager.register_module_source(BUSY_MODULE, BUSY_SOURCE)
        with manager.acquire_one() as s:
            busy = s.create_movable(s.global_(BUSY_MODULE, "Busy")(work))
        workers = manager._workers
        worker = workers[0]
        busy.load_everywhere()

        async def run(until: float) -> int:
            done = 0

            async def one() -> None:
                nonlocal done
                while time.perf_counter() < until:
                    await busy.acall()
                    done += 1

            await asyncio.gather(*(one() for _ in range(tasks)))
            return done

        asyncio.run(run(time.perf_counter() + 0.5))  # warm up
        def counters():
            out = [interpreter_counters(w) for w in workers]
            return {k: sum(c[k] for c in out) for k in out[0]}

        def switched():
            return sum(switches(w.pid)[0] for w in workers)

        def cpu():
            return sum(_cpu_seconds(w.pid) for w in workers)

        k0, s0 = counters(), switched()
        h0, i0, t0 = time.process_time(), cpu(), time.perf_counter()
        n = max(asyncio.run(run(t0 + seconds)), 1)
        elapsed = time.perf_counter() - t0
        h1, i1 = time.process_time(), cpu()
        k1, s1 = counters(), switched()
        waits = (k1["waits"] - k0["waits"]) / n
        sleeps = (k1["sleeps"] - k0["sleeps"]) / n
        load = open("/proc/loadavg").read().split()[0]
        print(f"depth {worker.posted_depth}: interpreter waits {waits:4.2f}, sleeps {sleeps:4.2f}, "
              f"voluntary switches {(s1 - s0) / n:4.2f} per call | interpreter "
              f"{(i1 - i0) / n * 1e6:6.1f} µs CPU, host {(h1 - h0) / n * 1e6:6.1f} µs CPU per call "
              f"| {n / elapsed:7,.0f} calls/s (load {load})")
        del _native


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="1,2,4")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--work-us", type=float, default=200.0)
    parser.add_argument("--interpreters", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.tasks, args.seconds, args.work_us / 1e6, args.interpreters)
        return
    print(f"{args.tasks} acall tasks on one event loop, {args.interpreters} interpreter(s), "
          f"{args.work_us:g} µs of work per call")
    for depth in args.depths.split(","):
        env = dict(os.environ, MULTIPY_PIPELINE_DEPTH=depth, MULTIPY_CHANNEL_COUNTS="1")
        subprocess.run([sys.executable, __file__, "--child", "--tasks", str(args.tasks),
                        "--seconds", str(args.seconds), "--work-us", str(args.work_us),
                        "--interpreters", str(args.interpreters)],
                       env=env, check=True)


if __name__ == "__main__":
    main()
