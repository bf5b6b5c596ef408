"""Python function calls per dispatched call, host side and interpreter side.

Counts (not times) the Python-level function calls that cProfile sees for N
sequential calls of the ``identity`` example with a 1x16 tensor on one process
interpreter, divided by N.  Counts do not depend on machine load.

    PYTHONPATH=src python benchmarks/count_calls.py [N] [--top K]
"""
import cProfile
import pstats
import sys

import torch

from multipy.bench.targets import example_archive
from multipy.runtime import InterpreterManager
from multipy.transport.messages import Op

_START = """
import cProfile, sys
sys.modules['__multipy_prof__'] = p = cProfile.Profile()
p.enable()
"""
_STOP = """
import sys, io, pstats
p = sys.modules.pop('__multipy_prof__')
p.disable()
s = pstats.Stats(p)
result = (s.total_calls, s.prim_calls, [(f, v[1]) for f, v in s.stats.items()])
"""


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 2000
    top = int(sys.argv[sys.argv.index("--top") + 1]) if "--top" in sys.argv else 0
    x = torch.randn(1, 16)
    with InterpreterManager(1, backend="process", num_threads=1) as manager:
        model = manager.load_package(example_archive("identity")).load_pickle("model", "model.pkl")
        worker = manager._workers[0]
        for _ in range(200):
            model(x)
        worker.request(Op.EXEC, (_START,))
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            model(x)
        prof.disable()
        total, _, items = worker.request(Op.EXEC, (_STOP,))
        host = pstats.Stats(prof)
        print(f"host:        {host.total_calls / n:.1f} Python calls per call ({n} calls)")
        print(f"interpreter: {total / n:.1f} Python calls per call "
              f"(incl. 2 exec requests)")
        if top:
            rows = sorted(((v[1], f) for f, v in host.stats.items()), reverse=True)[:top]
            print("-- host, calls per call:")
            for c, f in rows:
                print(f"  {c / n:6.2f} {f[0].split('multipy/')[-1]}:{f[1]} {f[2]}")
            print("-- interpreter, calls per call:")
            for f, c in sorted(items, key=lambda i: -i[1])[:top]:
                print(f"  {c / n:6.2f} {f[0].split('multipy/')[-1]}:{f[1]} {f[2]}")


if __name__ == "__main__":
    main()
