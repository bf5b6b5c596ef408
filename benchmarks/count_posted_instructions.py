"""Host instructions per posted call (``acall`` or ``submit``), under callgrind.

N posted calls of the ``identity`` example (1x16 tensor) on ``--interpreters``
process interpreters (default 1), with ``--concurrency`` of them in flight at
any time (default 1).  Callgrind counts only the host process (every thread of
it: the caller, the completion thread), and only while the N calls run::

    valgrind --tool=callgrind --trace-children=no --instr-atstart=no \\
        --callgrind-out-file=/tmp/cg.%p python benchmarks/count_posted_instructions.py 300 \\
        [--mode acall|submit] [--concurrency 64]

prints "N instructions per posted call (host)".  ``--calls`` runs without
callgrind and prints the Python function calls per posted call instead (cProfile
on the calling thread and on the manager's completion thread: counts, not times)::

    python benchmarks/count_posted_instructions.py 2000 --calls [--mode ...] [--top 20]

* ``acall``: one asyncio event loop, ``--concurrency`` tasks each awaiting
  ``model.acall(x)`` in turn (uvloop when installed, as ``multipy serve`` runs);
* ``submit``: one thread keeps ``--concurrency`` ``model.submit(x)`` futures in
  flight, waiting for the oldest before it submits the next.

Instruction counts do not depend on machine load; wall time under callgrind means
nothing.  They leave out the kernel, and the wait for the interpreter.
"""
import argparse
import asyncio
import collections
import cProfile
import pstats
import threading

import torch

from _callgrind import collect, instructions
from multipy.bench.targets import example_archive
from multipy.runtime import InterpreterManager


def _loop(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("n", type=int, nargs="?", default=300)
    parser.add_argument("--mode", choices=("acall", "submit"), default="acall")
    parser.add_argument("--concurrency", type=int, default=1, help="posted calls in flight at once")
    parser.add_argument("--interpreters", type=int, default=1)
    parser.add_argument("--calls", action="store_true",
                        help="count Python function calls per posted call (no callgrind)")
    parser.add_argument("--top", type=int, default=0, help="with --calls: the K most called")
    args = parser.parse_args()
    profiles = {"caller": cProfile.Profile(), "completion": cProfile.Profile()}

    def measure(on: bool) -> None:
        """Start (stop) counting: callgrind, or the two threads' profiles."""
        if not args.calls:
            if not on:
                counts.append(instructions())
            collect(on)
            return
        switched = threading.Event()
        completion = profiles["completion"]
        manager._completions.call_soon(
            lambda: ((completion.enable() if on else completion.disable()), switched.set()))
        switched.wait()
        if on:
            profiles["caller"].enable()
        else:
            profiles["caller"].disable()

    x = torch.randn(1, 16)
    counts: list[int] = []
    with InterpreterManager(args.interpreters, backend="process", num_threads=1,
                            start_timeout=600) as manager:
        model = manager.load_package(example_archive("identity")).load_pickle("model", "model.pkl")

        if args.mode == "acall":
            async def many(n: int) -> None:
                left = [n]

                async def task() -> None:
                    while left[0] > 0:
                        left[0] -= 1
                        out = await model.acall(x)
                        assert out.shape == x.shape

                await asyncio.gather(*(task() for _ in range(args.concurrency)))

            async def run() -> None:
                await many(100)  # warm-up: every path taken once
                measure(True)
                await many(args.n)
                measure(False)

            _loop(run())
        else:
            def many(n: int) -> None:
                window: collections.deque = collections.deque()
                for _ in range(n):
                    if len(window) >= args.concurrency:
                        assert window.popleft().result().shape == x.shape
                    window.append(model.submit(x))
                for future in window:
                    assert future.result().shape == x.shape

            many(100)
            measure(True)
            many(args.n)
            measure(False)
    if args.calls:
        for name, profile in profiles.items():
            stats = pstats.Stats(profile)
            print(f"{name} thread: {stats.total_calls / args.n:.1f} Python calls per posted call")
            rows = sorted(((v[1], f) for f, v in stats.stats.items()), reverse=True)[:args.top]
            for c, f in rows:
                print(f"  {c / args.n:6.2f} {f[0].split('multipy/')[-1]}:{f[1]} {f[2]}")
        return
    print(f"{counts[0] / args.n:,.0f} instructions per posted call (host; {args.mode}, "
          f"{args.concurrency} in flight, {args.interpreters} interpreter(s))")


if __name__ == "__main__":
    main()
