"""``multipy bench --memory``: does N interpreters of a big model cost one copy of its weights?

Two managers of the same size are measured one after the other: one with a
model of ~200 MB of float32 weights (written on the fly, in a child process so
the host never holds the weights itself), one with the tiny ``smallops``
example.  Each model is called once on every interpreter so every
interpreter has loaded it; then the PSS (proportional set size: shared pages
split between the processes that map them) of the host and of every
interpreter is summed.  The figure is that sum's growth over the weight bytes: 1.0 means one
copy of the weights for all N interpreters.

Example:
    >>> report = measure_memory(interpreters=4)                 # doctest: +SKIP
    >>> round(report.ratio, 2)                                 # doctest: +SKIP
    1.0
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..package import inspect_package
from ..runtime import InterpreterManager
from . import _child
from .targets import example_archive

__all__ = ["MemoryReport", "measure_memory", "memory_lines"]

_MB = 1e6


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Summed PSS (bytes) of host + interpreters with each model loaded everywhere."""

    interpreters: int
    weight_bytes: int
    tiny_pss: int
    big_pss: int

    @property
    def extra_bytes(self) -> int:
        return self.big_pss - self.tiny_pss

    @property
    def ratio(self) -> float:
        return self.extra_bytes / self.weight_bytes


def _pss_of(pids: list[int]) -> int:
    import psutil

    return sum(psutil.Process(pid).memory_full_info().pss for pid in pids)


def _loaded_everywhere_pss(archive: Path, interpreters: int, backend: str) -> int:
    with InterpreterManager(interpreters, backend=backend, num_threads=1) as manager:
        package = manager.load_package(archive)
        model = package.load_pickle("model", "model.pkl")
        with package.acquire_session() as s:
            args = s.self.attr("load_pickle")("model", "example.pkl").deref()
        for interp in manager.all_instances():
            with model.acquire_session(interp) as session:
                session.self(*args)
        gc.collect()
        pids = [os.getpid()] + [i.pid for i in manager.statistics().interpreters
                                if i.pid is not None]
        return _pss_of(pids)


def measure_memory(*, interpreters: int = 4, weight_mb: float = 200.0, backend: str = "process",
                   on_status: Callable[[str], None] | None = None) -> MemoryReport:
    """Build the big model, then measure both managers; see the module docstring."""
    status = on_status or (lambda text: None)
    layers = 4
    width = int((weight_mb * _MB / 4 / layers) ** 0.5)
    with tempfile.TemporaryDirectory(prefix="multipy-bench-memory-") as tmp:
        big = Path(tmp) / "wide.pt"
        status(f"writing a {weight_mb:.0f} MB model ({layers} x Linear({width}, {width}))")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=_child.mp_context()) as pool:
            pool.submit(_child.write_wide_package, str(big), width, layers).result()
        weight_bytes = inspect_package(big).storage_bytes
        status(f"{interpreters} interpreters of the tiny model")
        tiny_pss = _loaded_everywhere_pss(example_archive("smallops"), interpreters, backend)
        status(f"{interpreters} interpreters of the {weight_mb:.0f} MB model")
        big_pss = _loaded_everywhere_pss(big, interpreters, backend)
    return MemoryReport(interpreters, weight_bytes, tiny_pss, big_pss)


def memory_lines(report: MemoryReport) -> list[str]:
    """The report as plain lines."""
    n = report.interpreters
    return [
        f"weights: {report.weight_bytes / _MB:.1f} MB (float32)",
        f"PSS, host + {n} interpreters, tiny model:  {report.tiny_pss / _MB:.1f} MB",
        f"PSS, host + {n} interpreters, big model:   {report.big_pss / _MB:.1f} MB",
        f"extra for the big model: {report.extra_bytes / _MB:.1f} MB = {report.ratio:.2f} x the "
        "weights",
    ]
