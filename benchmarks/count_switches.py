"""Context switches and waits per call when many host threads call one interpreter.

N host threads call a no-op in one process interpreter for a few seconds (the
``multipy bench --dispatch`` set-up).  Per call, it prints the voluntary and
involuntary context switches of the host (all its threads) and of the
interpreter, from ``/proc/<pid>/task/*/status``, and CPU per call on both
sides.  Switch counts depend far less on machine load than times do.  With
``MULTIPY_CHANNEL_COUNTS=1`` in the environment (native channel only) it also
prints the channel's own counters: waits, spins that found the reply, sleeps
in FUTEX_WAIT, FUTEX_WAKE calls and time spent taking the GIL back.

    PYTHONPATH=src python benchmarks/count_switches.py [--threads 1,4,16] [--seconds 2] [--locks]
    PYTHONPATH=src python benchmarks/count_switches.py --model smallops --threads 4,64 --seconds 4

``--model NAME`` calls an example model (or archive) instead of the no-op, as
``multipy bench NAME --strategies one_python --max-interpreters 2`` does: two
interpreters started, the balancer limited to the first, each item a fresh
copy of the example inputs under ``torch.inference_mode``.

``--locks`` wraps the worker's lock (held to send) and its reply lock in
counting wrappers and prints how many acquisitions per call had to wait.
"""
import argparse
import os
import threading
import time

from multipy.bench.dispatch import _NOOP_MODULE, _NOOP_SOURCE, _cpu_seconds
from multipy.runtime import InterpreterManager
from multipy.transport import channel as _channel


def own_switches() -> tuple[int, int]:
    """(voluntary, involuntary) context switches of the calling thread so far."""
    vol = inv = 0
    with open("/proc/thread-self/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches"):
                vol = int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches"):
                inv = int(line.split()[1])
    return vol, inv


def switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of every thread of ``pid`` so far."""
    vol = inv = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        inv += int(line.split()[1])
        except OSError:
            pass
    return vol, inv


def interpreter_counters(worker) -> dict:
    from multipy.transport.messages import Op

    return worker.request(Op.EXEC, ("import multipy._native as n\nresult = n.counters()",))


def counters(worker) -> tuple[dict, dict] | None:
    """The channel's counters in the host and in the interpreter (native channel only)."""
    if (not _channel.NATIVE or os.environ.get("MULTIPY_CHANNEL_COUNTS") != "1"
            or not hasattr(_channel._native_module, "counters")):
        return None
    from multipy import _native

    return _native.counters(), interpreter_counters(worker)


class CountingLock:
    """A lock that counts the acquisitions that had to wait (``--locks``)."""

    def __init__(self, lock) -> None:
        self.lock, self.waited = lock, 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self.lock.acquire(False):
            return True
        if not blocking:
            return False
        self.waited += 1
        return self.lock.acquire(True, timeout)

    def release(self) -> None:
        self.lock.release()

    def locked(self) -> bool:
        return self.lock.locked()

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.lock.release()


def drive(noop, threads: int, seconds: float, worker, what: str = "calls") -> None:
    pid = worker.pid
    counts = [0] * threads
    own = [(0, 0)] * threads
    go, stop = threading.Event(), threading.Event()

    def caller(i: int) -> None:
        go.wait()
        v0, i0 = own_switches()
        n = 0
        while not stop.is_set():
            noop()
            n += 1
        v1, i1 = own_switches()
        counts[i] = n
        own[i] = (v1 - v0, i1 - i0)

    workers = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    i0 = switches(pid)
    c0, ic0, t0 = time.process_time(), _cpu_seconds(pid), time.perf_counter()
    k0 = counters(worker)
    go.set()
    stop.wait(seconds)
    stop.set()
    for t in workers:
        t.join()
    elapsed = time.perf_counter() - t0
    i1 = switches(pid)
    h = (sum(o[0] for o in own), sum(o[1] for o in own))  # the callers' (they have ended)
    cpu, icpu = time.process_time() - c0, _cpu_seconds(pid) - ic0
    n = max(sum(counts), 1)
    print(f"{threads:>3} threads: {n / elapsed:9,.0f} {what}/s | host {cpu / n * 1e6:5.1f} µs CPU, "
          f"callers vol {h[0] / n:5.2f} invol {h[1] / n:5.2f} | "
          f"interpreter {icpu / n * 1e6:5.1f} µs CPU, vol {(i1[0] - i0[0]) / n:5.2f} "
          f"invol {(i1[1] - i0[1]) / n:5.2f}  (per call; load {open('/proc/loadavg').read().split()[0]})")
    if isinstance(worker.lock, CountingLock):
        print(f"      waits for a lock per call: worker lock {worker.lock.waited / n:.3f}, "
              f"reply lock {worker._rx.waited / n:.3f}")
        worker.lock.waited = worker._rx.waited = 0
    if k0 is not None:
        k1 = counters(worker)
        for side, a, b in (("host", k0[0], k1[0]), ("interpreter", k0[1], k1[1])):
            print(f"      {side} per call: " + ", ".join(
                f"{k} {(b[k] - a[k]) / n:.2f}" if k != "gil_ns" else f"gil µs {(b[k] - a[k]) / n / 1e3:.2f}"
                for k in b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--host-spin", type=float, default=None,
                        help="seconds a host caller may spin (default: the worker's setting)")
    parser.add_argument("--locks", action="store_true",
                        help="also count the waits for the worker lock and the reply lock")
    parser.add_argument("--model", default=None,
                        help="an example name or archive to call instead of the no-op (one_python)")
    args = parser.parse_args()
    print(f"channel: {_channel.NATIVE_WHY}")
    if args.model is not None:
        return drive_model(args)
    with InterpreterManager(1, backend="process", num_threads=1) as manager:
        manager.register_module_source(_NOOP_MODULE, _NOOP_SOURCE)
        with manager.acquire_one() as s:
            noop = s.create_movable(s.global_(_NOOP_MODULE, "Noop")())
        for _ in range(500):
            noop()
        worker = manager._workers[0]
        if args.host_spin is not None and worker._end is not None:
            worker._end.spin = args.host_spin
        if args.locks:
            worker.lock, worker._rx = CountingLock(worker.lock), CountingLock(worker._rx)
        for n in (int(x) for x in args.threads.split(",")):
            drive(noop, n, args.seconds, worker)


def drive_model(args) -> None:
    """The one_python strategy of ``multipy bench``: two interpreters, the first used."""
    from multipy.bench import _child
    from multipy.bench.strategies import Fixtures
    from multipy.bench.targets import resolve_target

    with Fixtures(resolve_target(args.model), max_interpreters=2) as fx:
        manager, model = fx.replicated(2)
        manager.debug_limit_interpreters(1)
        worker = manager._workers[0]
        item_args = fx.args
        for n in (int(x) for x in args.threads.split(",")):
            drive(lambda: _child.run_item(model, item_args), n, args.seconds, worker, "items")


if __name__ == "__main__":
    main()
