"""The benchmark's strategies: multipy, its ceiling, and what users would do instead.

=============  ==========================================================  ============
strategy       one work item runs                                          n means
=============  ==========================================================  ============
limit          directly in one of n independent processes (the ceiling)    processes
one_python     on a manager limited to one interpreter                     host threads
multi_python   on a manager of n interpreters (capped at the maximum)      host threads
jit            on the TorchScript reference, in the host                   host threads
threads        on one eager model in the host, under its GIL               host threads
process_pool   on a stdlib ProcessPoolExecutor(n), tensors pickled         host threads
=============  ==========================================================  ============

Every item copies its inputs first (as deploy's benchmark did) and runs under
``torch.inference_mode``.  Host-side models run with
``torch.set_num_threads(1)`` (the runner sets it) and interpreters are created
with ``num_threads=1``, so n workers use at most n cores.

Inputs are the archive's example inputs (``model/example.pkl``), every tensor
repeated along dim 0 to ``batch`` rows (:func:`batch_inputs`) and moved to the
device.  On CUDA (``device="cuda"``):

* ``threads``: the eager model moved to the GPU (``.to(device)``), shared by n
  host threads on the default stream: what plain Python users do.
* ``jit``: the TorchScript reference loaded with ``map_location=device``.
* ``one_python``/``multi_python``: ``load_pickle(..., map_location=device)``:
  the host uploads the weights once and every interpreter maps them by CUDA
  IPC; arguments cross by CUDA IPC and results come back as host-owned device
  tensors.  Each host thread has a CUDA stream of its own, so one thread's
  wait never includes another thread's work.
* ``limit``, ``process_pool``: skipped (they measure the CPU).

An item on CUDA ends with ``torch.cuda.current_stream().synchronize()`` on the
thread that ran it, so latency and throughput count finished work: for the
multipy strategies the host's copy of the result waits (on the host thread's
stream) for the interpreter's event, so syncing that stream waits for the
interpreter's kernels too.  A work item is one call, ``batch`` inputs.

Example:
    >>> with Fixtures(target, max_interpreters=2) as fx:       # doctest: +SKIP
    ...     STRATEGIES[Strategy.MULTI_PYTHON](fx, 2, 1.0).work_items_per_second
"""

from __future__ import annotations

import array
import concurrent.futures
import enum
import queue
import time
from collections.abc import Callable
from typing import Any

import torch

from ..runtime import InterpreterManager
from . import _child
from ._child import batch_inputs, inputs_to
from .harness import Result, run_threads
from .targets import Target

__all__ = ["STRATEGIES", "Fixtures", "Skipped", "Strategy", "batch_inputs", "benchmark_name"]

Tick = Callable[[float], None]


class Strategy(str, enum.Enum):
    """The strategies, in the order rows are reported."""

    LIMIT = "limit"
    ONE_PYTHON = "one_python"
    MULTI_PYTHON = "multi_python"
    JIT = "jit"
    THREADS = "threads"
    PROCESS_POOL = "process_pool"


class Skipped(Exception):
    """A strategy that cannot run on this target (e.g. no TorchScript reference)."""


def benchmark_name(name: str, batch: int = 1, /) -> str:
    """The CSV ``benchmark`` of a target at a batch size: ``resnet``, ``resnet@b8``.

    Example:
        >>> benchmark_name("resnet", 1), benchmark_name("resnet", 8)
        ('resnet', 'resnet@b8')
    """
    return name if batch == 1 else f"{name}@b{batch}"


class Fixtures:
    """What the strategies share for one target: its inputs, host-side models
    loaded once, and one manager at a time (kept while the thread count that
    needs its size is being measured, so one_python and multi_python reuse it).

    Loading the archive in the host runs its code, as loading it anywhere does.
    ``device`` is ``"cpu"`` or a CUDA device (``"cuda"``, ``"cuda:1"``);
    ``batch`` repeats the example inputs to that many rows (:func:`batch_inputs`).
    ``preload`` is handed to the interpreter manager (modules its interpreters share).
    """

    def __init__(self, target: Target, /, *, max_interpreters: int, backend: str = "process",
                 device: str = "cpu", batch: int = 1, preload: tuple[str, ...] = ()) -> None:
        self.target = target
        self.preload = tuple(preload)
        self.max_interpreters = max_interpreters
        self.backend = backend
        self.on_status: Callable[[str], None] = lambda text: None  # the runner sets its own
        #: The device as asked for (``"cuda"``): the CSV ``device`` column.
        self.device = str(device)
        placement = torch.device(self.device)
        self.cuda = placement.type == "cuda"
        if self.cuda and placement.index is None:
            placement = torch.device("cuda", torch.cuda.current_device())
        #: Where models and inputs are placed (``"cuda:0"`` for ``"cuda"``).
        self.placement = str(placement)
        self.batch = batch
        #: The ``benchmark`` column of this target's rows (``resnet@b8`` at batch 8).
        self.name = benchmark_name(target.name, batch)
        args = batch_inputs(_child.load_from_archive(str(target.archive), "example.pkl"), batch)
        if self.cuda:
            args = inputs_to(args, self.placement)
            torch.cuda.synchronize(self.placement)
        self.args: tuple = args
        self._eager = None
        self._jit = None
        self._manager: InterpreterManager | None = None
        self._model = None
        self.mp_context = _child.mp_context()

    # -- shared models -------------------------------------------------------
    def eager(self):
        """The eager model, loaded into the host once."""
        if self._eager is None:
            eager = _child.load_from_archive(str(self.target.archive), "model.pkl")
            if self.cuda:
                eager = eager.to(self.placement)
            self._eager = eager
        return self._eager

    def jit(self):
        """The TorchScript reference, or :class:`Skipped` when the target has none."""
        if self.target.jit is None:
            raise Skipped(f"no TorchScript reference {self.target.name}_jit.pt next to the archive")
        if self._jit is None:
            self._jit = (torch.jit.load(str(self.target.jit), map_location=self.placement)
                         if self.cuda else torch.jit.load(str(self.target.jit)))
        return self._jit

    def replicated(self, interpreters: int):
        """``(manager, model)`` with ``interpreters`` interpreters, the model loaded on each."""
        if self._manager is not None and len(self._manager) != interpreters:
            self.close()
        if self._manager is None:
            self.on_status(f"starting {interpreters} interpreter(s)")
            manager = InterpreterManager(interpreters, backend=self.backend, num_threads=1,
                                         preload=self.preload)
            try:
                location = self.placement if self.cuda else None
                model = manager.load_package(self.target.archive).load_pickle(
                    "model", "model.pkl", map_location=location).load_everywhere()
                self._warm_up(model, manager.all_instances())
            except BaseException:
                manager.close()
                raise
            self._manager, self._model = manager, model
        self._manager.debug_limit_interpreters(interpreters)
        return self._manager, self._model

    def _warm_up(self, model, interpreters) -> None:
        """One call on every interpreter (in parallel: on CUDA each one creates its
        context and loads its kernels here, before any clock starts)."""
        def warm(interp) -> None:
            with model.acquire_session(interp) as session, torch.inference_mode():
                session.self(*_child.clone_args(self.args))
            if self.cuda:
                torch.cuda.current_stream().synchronize()

        interpreters = list(interpreters)
        if len(interpreters) == 1:
            warm(interpreters[0])
            return
        with concurrent.futures.ThreadPoolExecutor(len(interpreters),
                                                   thread_name_prefix="bench-warm") as pool:
            for future in [pool.submit(warm, interp) for interp in interpreters]:
                future.result()

    def item(self, model, *, own_stream: bool = False) -> Callable[[], Any]:
        """One work item on ``model``: fresh input copies, inference mode and, on
        CUDA, a sync of the calling thread's current stream so the item is finished.

        Call it on the thread that will run the items: with ``own_stream`` (CUDA)
        that thread gets a stream of its own first.
        """
        args = self.args
        if not self.cuda:
            return lambda: _child.run_item(model, args)
        if own_stream:
            torch.cuda.set_stream(torch.cuda.Stream(self.placement))

        def item() -> Any:
            out = _child.run_item(model, args)
            torch.cuda.current_stream().synchronize()
            return out
        return item

    def cpu_only(self, strategy: "Strategy") -> None:
        """Raise :class:`Skipped` for a strategy that measures the CPU, on CUDA."""
        if self.cuda:
            raise Skipped(f"{strategy.value} runs on the CPU only; not measured with "
                          f"--device {self.device}")

    # -- lifetime ------------------------------------------------------------------
    def close(self) -> None:
        """Close the manager held now (idempotent)."""
        manager, self._manager, self._model = self._manager, None, None
        if manager is not None:
            manager.close()

    def __enter__(self) -> "Fixtures":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _host_threads(fx: Fixtures, model, n: int, seconds: float, on_tick: Tick | None, *,
                  own_stream: bool = False) -> Result:
    return run_threads(lambda i: fx.item(model, own_stream=own_stream), n, seconds,
                       on_tick=on_tick)


# ------------------------------------------------------------------ strategies
def run_limit(fx: Fixtures, n: int, seconds: float, on_tick: Tick | None = None) -> Result:
    """n independent processes, each running the model directly, started together."""
    fx.cpu_only(Strategy.LIMIT)
    n = min(n, fx.max_interpreters)
    ctx = fx.mp_context
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [ctx.Process(target=_child.limit_worker, name=f"multipy-bench-limit-{i}",
                         args=(str(fx.target.archive), seconds, barrier, results, fx.batch),
                         daemon=True)
             for i in range(n)]
    for p in procs:
        p.start()
    try:
        outcomes, begun = [], time.perf_counter()
        while len(outcomes) < n:
            try:
                outcomes.append(results.get(timeout=0.1))
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    codes = [p.exitcode for p in procs]
                    raise RuntimeError(f"limit processes exited without a result (exit codes {codes})")
            if on_tick is not None:
                on_tick(min(1.0, (time.perf_counter() - begun) / seconds))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [o[1] for o in outcomes if o[0] == "error"]
    if errors:
        raise RuntimeError(f"a limit process failed: {errors[0]}")
    latencies: list[float] = []
    for _, _, raw in outcomes:
        latencies.extend(array.array("d", raw))
    wall = max(o[1] for o in outcomes)
    return Result.from_latencies(n, latencies, wall)


def run_one_python(fx: Fixtures, n: int, seconds: float, on_tick: Tick | None = None) -> Result:
    """n host threads on a manager limited to its first interpreter."""
    manager, model = fx.replicated(min(n, fx.max_interpreters))
    manager.debug_limit_interpreters(1)
    try:
        return _host_threads(fx, model, n, seconds, on_tick, own_stream=True)
    finally:
        manager.debug_limit_interpreters(len(manager))


def run_multi_python(fx: Fixtures, n: int, seconds: float, on_tick: Tick | None = None) -> Result:
    """n host threads on min(n, max_interpreters) interpreters."""
    _, model = fx.replicated(min(n, fx.max_interpreters))
    return _host_threads(fx, model, n, seconds, on_tick, own_stream=True)


def run_jit(fx: Fixtures, n: int, seconds: float, on_tick: Tick | None = None) -> Result:
    """n host threads sharing the TorchScript reference (TorchScript releases the GIL)."""
    return _host_threads(fx, fx.jit(), n, seconds, on_tick)


def run_threads_baseline(fx: Fixtures, n: int, seconds: float,
                         on_tick: Tick | None = None) -> Result:
    """n host threads sharing one eager model: what plain Python gives, under one GIL."""
    return _host_threads(fx, fx.eager(), n, seconds, on_tick)


def run_process_pool(fx: Fixtures, n: int, seconds: float, on_tick: Tick | None = None) -> Result:
    """n host threads, each submitting one item at a time to ProcessPoolExecutor(n).

    Arguments and results cross as the stdlib pool sends them (pickled through
    its pipes; torch's own reducers move tensor storages via shared-memory
    file descriptors).
    """
    fx.cpu_only(Strategy.PROCESS_POOL)
    archive = str(fx.target.archive)
    with concurrent.futures.ProcessPoolExecutor(
            n, mp_context=fx.mp_context, initializer=_child.pool_init,
            initargs=(archive,)) as pool:
        # Start every worker (the pool spawns lazily) before the clock does.
        list(pool.map(_child.pool_call, [fx.args] * (2 * n)))

        def factory(i: int) -> Callable[[], Any]:
            return lambda: pool.submit(_child.pool_call, _child.clone_args(fx.args)).result()

        return run_threads(factory, n, seconds, on_tick=on_tick)


STRATEGIES: dict[Strategy, Callable[[Fixtures, int, float, Tick | None], Result]] = {
    Strategy.LIMIT: run_limit,
    Strategy.ONE_PYTHON: run_one_python,
    Strategy.MULTI_PYTHON: run_multi_python,
    Strategy.JIT: run_jit,
    Strategy.THREADS: run_threads_baseline,
    Strategy.PROCESS_POOL: run_process_pool,
}

#: Strategies whose n is a number of processes, so never above ``max_interpreters``.
CAPPED = frozenset({Strategy.LIMIT})
