"""Memory of N interpreters holding a model, against N eager processes.

::

    this process ──spawns──▶ host: InterpreterManager(n, preload=...)   ─┐
                                   fork server(s), n interpreters        ├─ summed PSS
                 ──spawns──▶ n eager processes, each holding the model ─┘   (psutil)

Every figure is PSS (proportional set size: a page shared by k processes
counts 1/k in each), summed over all the processes of one side, taken from
outside once each side has loaded the model and called it once, so that both
sides are measured the same way.  The multipy side counts its host (which
imports torch and multipy but never the model), its fork servers and its
interpreters; the eager side is n plain Python processes that each unpickle
the archive with torch.package and call the model.

Example:
    >>> rows = compare_memory("minilm.pt", (1, 2), preload=("transformers",))  # doctest: +SKIP
    >>> rows[1].multipy_bytes / rows[0].eager_bytes                          # doctest: +SKIP
    1.21
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence

__all__ = ["MemoryRow", "compare_memory", "memory_table_lines"]

_MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class MemoryRow:
    """Summed PSS (bytes) of n interpreters (with their host and fork servers) and
    of n eager processes holding the same model."""

    n: int
    multipy_bytes: int
    eager_bytes: int


def _pss(pids: Sequence[int]) -> int:
    import psutil

    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_full_info().pss
        except psutil.NoSuchProcess:
            pass
    return total


def _tree(pid: int) -> list[int]:
    import psutil

    return [pid] + [p.pid for p in psutil.Process(pid).children(recursive=True)]


def _spawn(args: dict) -> subprocess.Popen:
    code = "from multipy.bench.pss import _child; _child()"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, text=True)
    return proc


def _wait_ready(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"a memory-measurement process failed (exit {proc.returncode}); "
                           "its error is above")


def _finish(procs: Sequence[subprocess.Popen]) -> None:
    for proc in procs:
        try:
            proc.stdin.close()
        except OSError:
            pass
    for proc in procs:
        proc.wait(60)


def compare_memory(archive: str | os.PathLike, counts: Sequence[int], *,
                   preload: tuple[str, ...] = (), backend: str = "process",
                   on_status: Callable[[str], None] | None = None) -> list[MemoryRow]:
    """One :class:`MemoryRow` per n in ``counts``; see the module docstring."""
    status = on_status or (lambda text: None)
    archive = os.path.abspath(os.fspath(archive))
    rows = []
    for n in counts:
        status(f"{n} interpreter(s) holding the model")
        host = _spawn({"side": "multipy", "archive": archive, "n": n, "preload": list(preload),
                       "backend": backend})
        try:
            _wait_ready(host)
            multipy_bytes = _pss(_tree(host.pid))
        finally:
            _finish([host])
        status(f"{n} eager process(es) holding the model")
        eager = [_spawn({"side": "eager", "archive": archive}) for _ in range(n)]
        try:
            for proc in eager:
                _wait_ready(proc)
            eager_bytes = _pss([p.pid for p in eager])
        finally:
            _finish(eager)
        rows.append(MemoryRow(n, multipy_bytes, eager_bytes))
    return rows


def memory_table_lines(rows: Sequence[MemoryRow]) -> list[str]:
    """The rows as plain lines, with each side against one eager process."""
    one = next((r.eager_bytes for r in rows if r.n == 1), None)
    if one is None:
        one = rows[0].eager_bytes / rows[0].n
    lines = [f"{'n':>3}  {'multipy PSS':>12}  {'n eager processes':>17}  "
             f"{'multipy / one eager':>19}  {'multipy / n eager':>17}"]
    for r in rows:
        lines.append(f"{r.n:>3}  {r.multipy_bytes / _MIB:>8.0f} MiB  {r.eager_bytes / _MIB:>13.0f} MiB"
                     f"  {r.multipy_bytes / one:>18.2f}x  {r.multipy_bytes / r.eager_bytes:>16.2f}x")
    return lines


def _child() -> None:
    """One side of the measurement, in a fresh process: load, call once, say
    ``ready``, and hold everything until stdin closes."""
    args = json.loads(sys.argv[1])
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if args["side"] == "eager":
        from ._child import load_from_archive

        model = load_from_archive(args["archive"], "model.pkl")
        inputs = load_from_archive(args["archive"], "example.pkl")
        with torch.inference_mode():
            model(*inputs)
        print("ready", flush=True)
        sys.stdin.read()
        return
    from ..runtime import InterpreterManager

    with InterpreterManager(args["n"], backend=args["backend"], num_threads=1,
                            preload=tuple(args["preload"])) as manager:
        package = manager.load_package(args["archive"])
        model = package.load_pickle("model", "model.pkl").load_everywhere()
        with package.acquire_session() as s:
            inputs = s.self.attr("load_pickle")("model", "example.pkl").deref()
        with torch.inference_mode():
            for interp in manager.all_instances():
                with model.acquire_session(interp) as session:
                    session.self(*inputs)
        del inputs
        print("ready", flush=True)
        sys.stdin.read()
