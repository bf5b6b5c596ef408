"""``multipy bench``: torch::deploy's deploy_benchmark, in Python, for any package.

``harness``     N host threads, a barrier, a fixed window -> :class:`Result`
``strategies``  limit, one_python, multi_python, jit, threads, process_pool
``runner``      the sweep over targets x thread counts x strategies
``report``      deploy's CSV, a rich table, a matplotlib plot
``overhead``    per-call dispatch cost over a direct call (``--overhead``)
``memory``      PSS of N interpreters of a 200 MB model (``--memory``)
``targets``     an archive path or an example name -> a :class:`Target`
``errors``      :class:`TargetError`, :class:`BenchError`
``subinterpreter``  the subinterpreter backend's own benchmark (``python3.13 -m``)

Names are loaded on first use, so importing this package (or its torch-free
``errors``/``targets``/``harness`` modules) does not import torch.

Example:
    >>> from multipy.bench import Strategy, run_sweep
    >>> sweep = run_sweep(["smallops"], [Strategy.THREADS, Strategy.MULTI_PYTHON], [1, 2],
    ...                   seconds=1.0, max_interpreters=2)      # doctest: +SKIP
    >>> [(r.strategy, r.n_threads) for r in sweep.rows]        # doctest: +SKIP
    [('multi_python', 1), ('multi_python', 2), ('threads', 1), ('threads', 2)]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import BenchError, TargetError
    from .harness import Result, run_threads
    from .report import CSV_COLUMNS, Row, plot, read_csv, table, write_csv
    from .runner import DEFAULT_SWEEP, Sweep, run_rows, run_sweep, thread_counts
    from .strategies import STRATEGIES, Fixtures, Skipped, Strategy
    from .targets import Target, example_archive, resolve_target

_HOMES = {
    "errors": ("BenchError", "TargetError"),
    "harness": ("Result", "run_threads"),
    "report": ("CSV_COLUMNS", "Row", "plot", "read_csv", "table", "write_csv"),
    "runner": ("DEFAULT_SWEEP", "Sweep", "run_rows", "run_sweep", "thread_counts"),
    "strategies": ("STRATEGIES", "Fixtures", "Skipped", "Strategy"),
    "targets": ("Target", "example_archive", "resolve_target"),
}
_WHERE = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
