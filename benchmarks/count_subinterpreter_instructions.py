"""Instructions per dispatched call on the subinterpreter backend, under callgrind.

One host thread calls a replicated no-op in one subinterpreter (CPython 3.13+, no
torch).  Both sides run in this process, so one count covers the host's side and the
subinterpreter's.  Neither side spins (a spin's instructions depend on how long the
peer takes, which the load decides).  Collection is switched on for exactly N calls,
then the counts are dumped, twice; the second dump is reported::

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/cg.%p \\
        .venv313/bin/python benchmarks/count_subinterpreter_instructions.py 300 [ARGS...]
    python benchmarks/count_subinterpreter_instructions.py --report /tmp/cg.PID.2 300

``ARGS``: integers passed to every call (none: a call without arguments).
Instruction counts do not depend on machine load; wall time under callgrind means nothing.
"""
import dataclasses
import os
import subprocess
import sys

from multipy.backends import subinterpreter
from multipy.runtime import InterpreterManager

NOOP = "class Noop:\n    def __call__(self, *args):\n        return None\n"


def _callgrind(*args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(os.getpid())], check=True,
                   stdout=subprocess.DEVNULL)


def _report(path: str, n: int) -> None:
    with open(path) as f:
        total = next(int(line.split()[1]) for line in f if line.startswith("totals:"))
    print(f"{total / n:,.0f} instructions per call (host + subinterpreter)")


def main() -> None:
    if sys.argv[1:2] == ["--report"]:
        _report(sys.argv[2], int(sys.argv[3]))
        return
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    args = tuple(int(a) for a in sys.argv[2:])
    create = subinterpreter.SubinterpreterWorker.__init__
    subinterpreter.SubinterpreterWorker.__init__ = (
        lambda self, config: create(self, dataclasses.replace(config, spin=0.0)))
    with InterpreterManager(1, backend="subinterpreter", num_threads=1) as manager:
        manager.register_module_source("multipy_count_noop", NOOP)
        with manager.acquire_one() as s:
            noop = s.create_movable(s.global_("multipy_count_noop", "Noop")())
        for _ in range(50):
            noop(*args)
        for _ in range(2):  # the first round warms up what the second measures
            _callgrind("-i", "on")
            for _ in range(n):
                noop(*args)
            _callgrind("-i", "off")
            _callgrind("-d")


if __name__ == "__main__":
    main()
