"""``multipy bench --startup``: how long until N interpreters can all serve.

Measured in one run on one machine:

* the yardstick: a fresh ``python -c "import torch"``, timed as a whole process;
* a fresh host process that has imported torch and multipy (as any host of a
  torch model has) times ``InterpreterManager(n)`` + ``load_package`` + one
  call on every interpreter, until the last one has answered.

The fork server imports torch once and forks every interpreter from it, so N
interpreters cost about one ``import torch``, not N.  Best of ``repeat`` runs.

:func:`measure_ready` times ``InterpreterManager(n, preload=...)`` alone for
several n, to compare N interpreters with one: interpreters start at the same
time and share the ``preload`` imports of their fork server.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

_SERVE = """
import sys, time, torch, multipy
started = time.perf_counter()
with multipy.InterpreterManager({n}) as m:
    model = m.load_package(sys.argv[1]).load_pickle("model", "model.pkl")
    x = torch.zeros(1, 16)
    for interp in m.all_instances():
        with model.acquire_session(interp) as s:
            s.self(x)
    print(time.perf_counter() - started)
"""


_READY = """
import sys, time, torch, multipy
started = time.perf_counter()
with multipy.InterpreterManager({n}, preload={preload!r}):
    print(time.perf_counter() - started)
"""


@dataclasses.dataclass(frozen=True)
class StartupResult:
    """Seconds for ``import torch`` and for ``n`` interpreters ready to serve."""

    interpreters: int
    import_torch: float
    manager_ready: float

    @property
    def ratio(self) -> float:
        return self.manager_ready / self.import_torch


def _import_torch() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, capture_output=True)
    return time.perf_counter() - started


def _manager_ready(archive: str, n: int) -> float:
    out = subprocess.run([sys.executable, "-c", _SERVE.format(n=n), archive], check=True,
                         capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure_startup(archive: str, *, interpreters: int = 4, repeat: int = 3) -> StartupResult:
    """Both figures ``repeat`` times, interleaved, keeping the best of each.

    ``archive`` must take a ``(1, 16)`` input (the ``smallops`` or ``identity`` example).
    """
    torch_s = ready_s = float("inf")
    for _ in range(repeat):
        torch_s = min(torch_s, _import_torch())
        ready_s = min(ready_s, _manager_ready(archive, interpreters))
    return StartupResult(interpreters, torch_s, ready_s)


def measure_ready(counts: tuple[int, ...] = (1, 2), *, preload: tuple[str, ...] = (),
                  repeat: int = 3) -> dict[int, float]:
    """Seconds until ``InterpreterManager(n, preload=preload)`` returns (every
    interpreter started and its preload imported), for each n in ``counts``, in a
    fresh host that imported torch and multipy; best of ``repeat``, interleaved.

    >>> measure_ready((1, 2), preload=("transformers",))        # doctest: +SKIP
    {1: 3.1, 2: 3.3}
    """
    best = {n: float("inf") for n in counts}
    for _ in range(repeat):
        for n in counts:
            out = subprocess.run([sys.executable, "-c", _READY.format(n=n, preload=tuple(preload))],
                                 check=True, capture_output=True, text=True)
            best[n] = min(best[n], float(out.stdout.strip().splitlines()[-1]))
    return best
