"""``multipy bench``: torch::deploy's deploy_benchmark, in Python, for any package.

``harness``     N host threads, a barrier, a fixed window -> :class:`Result`
``strategies``  limit, one_python, multi_python, jit, threads, process_pool
``runner``      the sweep over targets x thread counts x strategies
``report``      deploy's CSV, a rich table, a matplotlib plot
``overhead``    per-call dispatch cost over a direct call (``--overhead``)
``memory``      PSS of N interpreters of a 200 MB model (``--memory``)
``targets``     an archive path or an example name -> a :class:`Target`

Importing this package imports torch (the strategies run models in the host).

Example:
    >>> from multipy.bench import Strategy, run_sweep
    >>> sweep = run_sweep(["smallops"], [Strategy.THREADS, Strategy.MULTI_PYTHON], [1, 2],
    ...                   seconds=1.0, max_interpreters=2)      # doctest: +SKIP
    >>> [(r.strategy, r.n_threads) for r in sweep.rows]        # doctest: +SKIP
    [('multi_python', 1), ('multi_python', 2), ('threads', 1), ('threads', 2)]
"""

from .harness import Result, run_threads
from .report import CSV_COLUMNS, Row, plot, read_csv, table, write_csv
from .runner import DEFAULT_SWEEP, Sweep, run_rows, run_sweep, thread_counts
from .strategies import STRATEGIES, Fixtures, Skipped, Strategy
from .targets import Target, TargetError, example_archive, resolve_target

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_SWEEP",
    "STRATEGIES",
    "Fixtures",
    "Result",
    "Row",
    "Skipped",
    "Strategy",
    "Sweep",
    "Target",
    "TargetError",
    "example_archive",
    "plot",
    "read_csv",
    "resolve_target",
    "run_rows",
    "run_sweep",
    "run_threads",
    "table",
    "thread_counts",
    "write_csv",
]
