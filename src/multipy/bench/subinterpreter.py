"""Benchmark of the ``subinterpreter`` backend: per-call latency, and N
subinterpreters against N independent processes on CPU-bound pure Python.

::

    python3.13 -m multipy.bench.subinterpreter [--calls 200] [--max-n 2] [--rounds 3]

The *limit* is N ``spawn`` processes each calling the same function directly
(no multipy, no transport): what N cores can do.  The ratio is subinterpreter
throughput over that limit, measured in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import threading
import time

from .harness import percentile_ms

#: A tokenizer-like loop over a string: pure Python, CPU-bound, a few ms a call.
WORK = '''
def tokenize(text):
    words, word = [], []
    for ch in text:
        if ch.isalnum():
            word.append(ch)
        elif word:
            words.append("".join(word).lower())
            word = []
    if word:
        words.append("".join(word).lower())
    return words

def work(text):
    counts = {}
    for w in tokenize(text):
        counts[w] = counts.get(w, 0) + 1
    return len(counts)

def add1(x):
    return x + 1
'''
TEXT = " ".join(f"Word{i % 997}, other-{i % 13}; x{i}" for i in range(4000))


def _namespace() -> dict:
    namespace: dict = {"__name__": "bench_work"}
    exec(compile(WORK, "<bench_work>", "exec"), namespace)
    return namespace


def _process_main(calls: int, barrier, results) -> None:
    work = _namespace()["work"]
    work(TEXT)  # warm
    barrier.wait()
    start = time.monotonic()
    for _ in range(calls):
        work(TEXT)
    results.put((start, time.monotonic()))


def processes(n: int, calls: int) -> float:
    """Calls per second of ``n`` spawn processes running ``work`` directly."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [ctx.Process(target=_process_main, args=(calls, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    spans = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return n * calls / (max(e for _, e in spans) - min(s for s, _ in spans))


def subinterpreters(manager, n: int, calls: int) -> float:
    """Calls per second of ``n`` host threads, each driving one subinterpreter."""
    barrier = threading.Barrier(n)
    spans: list = []

    def drive(index: int) -> None:
        with manager.all_instances()[index].acquire_session() as s:
            work = s.global_("bench_work", "work")
            work.call_value(TEXT)  # warm
            barrier.wait()
            start = time.monotonic()
            for _ in range(calls):
                work.call_value(TEXT)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return n * calls / (max(e for _, e in spans) - min(s for s, _ in spans))


def latency(manager, calls: int = 5000) -> tuple[float, float]:
    """p50 and p99 (µs) of a call with small arguments (``add1(1)``)."""
    with manager.all_instances()[0].acquire_session() as s:
        add1 = s.global_("bench_work", "add1")
        for _ in range(500):
            add1.call_value(1)
        times = []
        for i in range(calls):
            t = time.perf_counter()
            add1.call_value(i)
            times.append(time.perf_counter() - t)
    times.sort()
    return percentile_ms(times, 0.5) * 1e3, percentile_ms(times, 0.99) * 1e3


def run(*, calls: int = 200, max_n: int | None = None, rounds: int = 3) -> dict:
    """Measure everything; returns the numbers ``main`` prints."""
    from multipy import InterpreterManager

    max_n = max_n or min(2, os.cpu_count() or 1)
    work = _namespace()["work"]
    t = time.perf_counter()
    for _ in range(20):
        work(TEXT)
    one_call_ms = (time.perf_counter() - t) / 20 * 1e3
    with InterpreterManager(max_n, backend="subinterpreter") as manager:
        manager.register_module_source("bench_work", WORK)
        p50, p99 = latency(manager)
        rows = []
        for n in range(1, max_n + 1):
            # Alternate the two and keep each one's best round: on a busy machine the
            # best round is the one least disturbed by others.
            sub = proc = 0.0
            for _ in range(rounds):
                sub = max(sub, subinterpreters(manager, n, calls))
                proc = max(proc, processes(n, calls))
            rows.append((n, sub, proc, sub / proc))
    return {"p50_us": p50, "p99_us": p99, "work_ms": one_call_ms, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    """Print the latency line and the throughput table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per interpreter (default 200)")
    parser.add_argument("--max-n", type=int, default=None, help="largest N (default: min(2, cores))")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per N, best kept (default 3)")
    args = parser.parse_args(argv)
    out = run(calls=args.calls, max_n=args.max_n, rounds=args.rounds)
    print(f"subinterpreter backend, Python {sys.version.split()[0]}, {os.cpu_count()} cores")
    print(f"per call, small arguments (add1(1)): p50 {out['p50_us']:.1f} µs   "
          f"p99 {out['p99_us']:.1f} µs")
    print(f"work(): tokenizer loop over {len(TEXT)} chars, {out['work_ms']:.2f} ms per call in the host")
    print()
    print(f"best of {args.rounds} alternating rounds, {args.calls} calls per interpreter per round")
    print(f"{'N':>3} {'subinterpreters calls/s':>24} {'N processes calls/s':>20} {'ratio':>7}")
    for n, sub, proc, ratio in out["rows"]:
        print(f"{n:>3} {sub:>24.1f} {proc:>20.1f} {ratio:>7.2f}")


if __name__ == "__main__":
    main()
