"""One request at a time with a gap: the awaited call's latency with and without
``expect_call`` (the interpreter poked awake before the request's own work).

A server at one connection posts a call every few hundred microseconds, after
its interpreter's spin (200 µs) ran out: the interpreter sleeps in FUTEX_WAIT and
the post pays its wake-up.  This models it in process, on one event loop: each
request idles ``--gap`` µs (the HTTP round trip, the client), then does ``--work``
µs of host work (reading and decoding the request, a busy loop here), then awaits
``model.acall(x)`` of the ``identity`` example.  ``expect`` rounds call
``model.expect_call()`` first, before the work; ``plain`` rounds do not.  Rounds
of ``--batch`` requests alternate, so both see the same machine load; it prints,
per mode, the p50 and p90 of the awaited call alone (post to result) and of work
plus call, the interpreters' CPU per request (from ``/proc``), and the load::

    PYTHONPATH=src python benchmarks/poke_latency.py [--requests 3000] [--gap 300] [--work 60]

With ``MULTIPY_CHANNEL_COUNTS=1`` (native channel) it also prints, per request,
the interpreters' sleeps (FUTEX_WAIT calls) and the waits a poke ended.
"""
import argparse
import asyncio
import os
import statistics
import time

import torch

from multipy.bench.dispatch import _cpu_seconds
from multipy.bench.targets import example_archive
from multipy.runtime import InterpreterManager
from multipy.transport import channel as _channel
from multipy.transport.messages import Op


def _counters(manager) -> dict | None:
    if not _channel.NATIVE or os.environ.get("MULTIPY_CHANNEL_COUNTS") != "1":
        return None
    out = [w.request(Op.EXEC, ("import multipy._native as n\nresult = n.counters()",))
           for w in manager._workers]
    return {k: sum(c[k] for c in out) for k in out[0]}


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="per mode")
    parser.add_argument("--gap", type=float, default=300.0, help="µs idle before each request")
    parser.add_argument("--work", type=float, default=60.0,
                        help="µs of host work between expect_call and the call")
    parser.add_argument("--batch", type=int, default=100, help="requests per round")
    parser.add_argument("--interpreters", type=int, default=2)
    args = parser.parse_args()
    archive = example_archive("identity")
    x = torch.ones(1, 16)
    gap, work = args.gap * 1e-6, args.work * 1e-6
    with InterpreterManager(args.interpreters, backend="process", num_threads=1) as manager:
        model = manager.load_package(archive).load_pickle("model", "model.pkl")
        pids = [w.pid for w in manager._workers]
        calls = {"plain": [], "expect": []}
        totals = {"plain": [], "expect": []}
        cpu = {"plain": 0.0, "expect": 0.0}
        counts = {"plain": {}, "expect": {}}

        async def rounds() -> None:
            for _ in range(200):  # warm up
                await model.acall(x)
            done = 0
            while done < args.requests:
                for mode in ("plain", "expect"):
                    before = _counters(manager)
                    c0 = sum(_cpu_seconds(p) for p in pids)
                    for _ in range(args.batch):
                        time.sleep(gap)  # blocks the loop, as an idle server's loop waits
                        t0 = time.perf_counter()
                        if mode == "expect":
                            model.expect_call()
                        _busy(work)
                        t1 = time.perf_counter()
                        await model.acall(x)
                        t2 = time.perf_counter()
                        calls[mode].append(t2 - t1)
                        totals[mode].append(t2 - t0)
                    cpu[mode] += sum(_cpu_seconds(p) for p in pids) - c0
                    after = _counters(manager)
                    if after is not None:
                        for k in after:
                            counts[mode][k] = counts[mode].get(k, 0) + after[k] - before[k]
                done += args.batch

        try:
            import uvloop
            uvloop.run(rounds())
        except ImportError:
            asyncio.run(rounds())
    print(f"identity, {args.interpreters} interpreters, gap {args.gap:.0f} µs, work "
          f"{args.work:.0f} µs, {args.requests} requests per mode in rounds of {args.batch} "
          f"(load {open('/proc/loadavg').read().split()[0]})")
    for mode in ("plain", "expect"):
        c, t = sorted(calls[mode]), sorted(totals[mode])
        n = len(c)
        line = (f"  {mode:6}: call p50 {c[n // 2] * 1e6:6.1f} µs, p90 {c[n * 9 // 10] * 1e6:6.1f}; "
                f"work+call p50 {t[n // 2] * 1e6:6.1f}, mean {statistics.fmean(t) * 1e6:6.1f}; "
                f"interpreters {cpu[mode] / n * 1e6:5.1f} µs CPU/request")
        if counts[mode]:
            line += (f"; sleeps {counts[mode]['sleeps'] / n:.2f}, "
                     f"pokes {counts[mode].get('pokes', 0) / n:.2f} per request")
        print(line)


if __name__ == "__main__":
    main()
