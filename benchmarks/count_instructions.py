"""Instructions per dispatched call, host and interpreter, under callgrind.

Run the whole host under callgrind (children too: the fork server and the
interpreters it forks), with collection off; this script switches it on for
exactly N calls of the ``identity`` example (1x16 tensor, one process
interpreter) in the host and in the interpreter, then off::

    valgrind --tool=callgrind --trace-children=yes --trace-children-skip='*perl*' \\
        --instr-atstart=no --callgrind-out-file=/tmp/cg.%p \\
        python benchmarks/count_instructions.py 200 [--int]
    python benchmarks/count_instructions.py --report /tmp/cg.HOSTPID.1 /tmp/cg.HOSTPID.2 200

The first dump of a process holds N calls, the second 2N; instructions per call are
(second - first) / N.

``--host``: count the host only, its interpreters running outside valgrind (a few
times faster; run valgrind without ``--trace-children``)::

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/cg.%p \
        python benchmarks/count_instructions.py 200 --host

Instruction counts do not depend on machine load; wall time under callgrind means nothing.
"""
import dataclasses
import os
import subprocess
import sys

import torch

from multipy.bench.targets import example_archive
from multipy.runtime import InterpreterManager


def _toggle(on: bool, *pids: int) -> None:
    for pid in pids:
        subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(pid)],
                       check=True, stdout=subprocess.DEVNULL)


def _report(first: str, second: str, n: int) -> None:
    totals = []
    for path in (first, second):
        with open(path) as f:
            totals.append(next(int(line.split()[1]) for line in f if line.startswith("totals:")))
    print(f"{(totals[1] - totals[0]) / n:,.0f} instructions per call")


def main() -> None:
    if sys.argv[1:2] == ["--report"]:
        _report(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    x = 3 if "--int" in sys.argv else torch.randn(1, 16)  # --int: the same call with an int
    with InterpreterManager(1, backend="process", num_threads=1, start_timeout=600,
                            call_timeout=600) as manager:
        model = manager.load_package(example_archive("identity")).load_pickle("model", "model.pkl")
        # No spinning on either side: a spin's instructions depend on how long the
        # peer takes, which the load decides.  Restart the interpreter with spin 0.
        worker = manager._workers[0]
        worker.config = dataclasses.replace(worker.config, spin=0.0)
        model(x)
        worker._out_of_step("restarted without spinning, to count instructions")
        for _ in range(50):
            model(x)
        worker._end.spin = 0.0
        pids = (os.getpid(),) if "--host" in sys.argv else (os.getpid(), worker.pid)
        for calls in (n, 2 * n):  # two windows: their difference leaves out the toggling
            _toggle(True, *pids)
            for _ in range(calls):
                model(x)
            _toggle(False, *pids)
            for pid in pids:
                subprocess.run(["callgrind_control", "-d", str(pid)], check=True,
                               stdout=subprocess.DEVNULL)
        print(f"host pid {pids[0]}, interpreter pid {worker.pid}: windows of {n} and {2 * n} calls")


if __name__ == "__main__":
    main()
