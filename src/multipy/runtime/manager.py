"""InterpreterManager: owns N interpreters and balances work over them.

::

    InterpreterManager ──▶ LoadBalancer (free first, else least loaded)
          │                      │ index
          ├── Package ──▶ ReplicatedObj ──call──▶ Worker[index].request(...)
          │                  ├── submit / acall / batched ──▶ Dispatcher ──▶ Worker[index].post(...)
          │                  │                                  (replies: the Completions thread)
          └── acquire_one ──▶ InterpreterSession ──▶ Obj ──▶ Worker[index].request(...)

The manager talks to its interpreters only through the worker protocol of
:mod:`multipy.backends.base`; it never branches on the backend.  Blocking
calls and posted ones (futures, asyncio, batches: :mod:`.dispatch`) share the
balancer and each interpreter's lock, so they mix freely.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import weakref
from typing import Any, Callable

from ..backends.base import WorkerConfig
from ..backends.capabilities import resolve_backend
from ..backends.completions import Completions
from ..errors import ManagerClosedError
from ..transport.messages import Op, Recipe
from .balancer import LoadBalancer, give_back, take_turn
from .dispatch import Dispatcher, Request
from .environment import Environment, NoopEnvironment
from .package import Package
from .replicated import ReplicatedObj
from .session import InterpreterSession, Obj, caller_grad_mode
from .stats import InterpreterStatistics, ManagerStatistics, quantile
from .timeouts import NO_TIMEOUT, check_timeout, effective

_CALL_REPLICATED = Op.CALL_REPLICATED  # a global: an enum attribute costs ~0.7 µs per lookup


class Interpreter:
    """One interpreter of a manager (``manager.all_instances()``)."""

    def __init__(self, manager: "InterpreterManager", index: int) -> None:
        self._manager = manager
        self.index = index

    @property
    def pid(self) -> int | None:
        """The interpreter's process id (``None`` for in-process backends)."""
        return self._manager._workers[self.index].pid

    def acquire_session(self) -> InterpreterSession:
        """A session on this interpreter (bypasses the load balancer's choice).

        >>> for interp in manager.all_instances():          # doctest: +SKIP
        ...     with interp.acquire_session() as s:
        ...         s.global_("builtins", "print")("hello")
        """
        self._manager._check_open()
        return InterpreterSession(self._manager, self.index, balanced=False)

    def __repr__(self) -> str:
        return f"<Interpreter {self.index} pid={self.pid}>"


class InterpreterManager:
    """N independent interpreters and a load balancer over them.

    >>> from multipy import InterpreterManager
    >>> with InterpreterManager(2) as manager:               # doctest: +SKIP
    ...     model = manager.load_package("simple.pt").load_pickle("model", "model.pkl")
    ...     out = model(torch.rand(10, 20))

    ``env`` says where interpreters find extern modules (default: the host's
    ``sys.path``).  ``backend`` is ``"process"``, ``"thread"``,
    ``"subinterpreter"`` or ``"auto"``.  ``num_threads`` is torch's intra-op
    thread count per interpreter (default: cores // n, at least 1).
    ``call_timeout`` (seconds; ``None`` or ``inf``: none) bounds every call; a
    call past it kills and restarts its interpreter (process backend).  Loading
    an object (``load_pickle``, the first use in each interpreter),
    ``ReplicatedObj.hasattr`` and ``unload`` are not bounded by it.  ``preload`` names modules every interpreter
    imports before it serves (after every restart too); one that cannot be
    imported fails the start with :class:`~multipy.errors.InterpreterStartError`
    naming it (a single name may be given as a str).  ``n`` is capped at
    :data:`MAX_INTERPRETERS` (256) unless the environment variable
    ``MULTIPY_MAX_INTERPRETERS`` allows more.  The process backend imports the
    ``preload`` modules once in the fork server the interpreters are forked from,
    so their memory is shared; one that cannot be imported before a fork (it starts
    threads or initialises CUDA) is imported in each interpreter instead, and
    ``statistics().notes`` says so.  All interpreters start at the same time.
    """

    def __init__(self, n: int, /, env: Environment | None = None, *, backend: str = "process",
                 num_threads: int | None = None, call_timeout: float | None = None,
                 start_timeout: float = 300.0, preload: tuple[str, ...] | str = ()) -> None:
        preload = _check_options(n, env, preload)
        check_timeout(call_timeout, "call_timeout")
        self._closed = True
        self._packages: weakref.WeakValueDictionary[int, Package] = weakref.WeakValueDictionary()
        self._backend, self.backend_choice = resolve_backend(backend)
        self.backend = self._backend.kind.value
        self.env = env if env is not None else NoopEnvironment()
        self._call_timeout = check_timeout(call_timeout, "call_timeout")
        threads = num_threads if num_threads is not None else max(1, (os.cpu_count() or 1) // n)
        self._workers = [
            self._backend.create_worker(WorkerConfig(
                i, self.env.sys_path(), threads, start_timeout,
                startup=tuple((Op.IMPORT, (name,)) for name in preload),
                shared_imports=tuple(preload)))
            for i in range(n)]
        self._balancer = LoadBalancer(n)
        self._completions = Completions()   # its thread starts with the first posted call
        # What the finalizer holds must not refer back to the manager (no bound
        # methods), or a manager dropped without close() is never collected.
        workers = self._workers
        self._dispatcher = Dispatcher(workers, self._balancer, self._completions,
                                      lambda index: workers[index].available)
        self._interpreters = [Interpreter(self, i) for i in range(n)]
        self._closed = False
        self._finalizer = weakref.finalize(self, _close_workers, self._workers, self._backend,
                                           self._dispatcher, self._completions)
        try:
            _start_all(self._workers)
        except BaseException:
            self.close()
            raise

    # -- the deploy API -------------------------------------------------------
    def __len__(self) -> int:
        return len(self._workers)

    def all_instances(self) -> list[Interpreter]:
        """Every interpreter, e.g. to load or unload eagerly on each."""
        return list(self._interpreters)

    def acquire_one(self) -> InterpreterSession:
        """A session on the best interpreter now: a free one, else the least loaded."""
        self._check_open()
        return InterpreterSession(self, self._balancer.acquire(), balanced=True)

    def debug_limit_interpreters(self, k: int, /) -> None:
        """Balance over the first ``k`` interpreters only (benchmarks: one vs many)."""
        self._balancer.set_limit(k)

    def load_package(self, path: str | os.PathLike, /) -> Package:
        """Open a torch.package archive; raises a clear error for a missing or non-zip path."""
        self._check_open()
        return Package(self, os.fspath(path))

    def register_module_source(self, name: str, source: str, /) -> None:
        """Make module ``name`` (from ``source``) importable in every interpreter,
        now and after any restart.  Each interpreter has its own copy.

        ``name`` is a module name (``"helpers"``, ``"pkg.helpers"``), ``source``
        its Python source text; a syntax error is raised here, in the host.

        >>> manager.register_module_source("helpers", "SCALE = 2")  # doctest: +SKIP
        """
        if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
            raise TypeError(f"register_module_source(name, source): name is a module name such as "
                            f"'helpers' or 'pkg.helpers', got {type(name).__name__} {name!r}")
        if not isinstance(source, str):
            raise TypeError(f"register_module_source({name!r}, source): source is the module's Python "
                            f"source text, a str, got {type(source).__name__} {source!r:.80}")
        compile(source, f"<registered module {name}>", "exec")
        self._check_open()
        for worker in self._workers:
            worker.add_startup(Op.REGISTER_MODULE, (name, source))

    def create_movable(self, obj: Obj, session: InterpreterSession, /) -> ReplicatedObj:
        """Pickle ``obj`` out of ``session`` as a :class:`ReplicatedObj`.

        Its tensors go once into shared memory; every interpreter that loads it
        maps them instead of copying.
        """
        if not session.is_owner(obj):
            owner = obj._session.interpreter_index if isinstance(obj, Obj) else None
            raise _ownership(obj, owner, session.interpreter_index)
        payload, used = session._request(Op.MAKE_MOVABLE, (obj,))
        payload, fd = self._workers[session.interpreter_index].adopt_movable(payload)
        uses = tuple(self._packages[package_id] for package_id in used)
        packages = tuple((package._id, package.path) for package in uses)
        return ReplicatedObj(self, (int(Recipe.MOVABLE), payload, packages), segment_fd=fd, uses=uses)

    def statistics(self) -> ManagerStatistics:
        """A frozen snapshot of per-interpreter counters and latency percentiles."""
        out = []
        for w in self._workers:
            latencies = sorted(w.latencies)
            p50, p95, p99 = (quantile(latencies, q) for q in (0.5, 0.95, 0.99))
            out.append(InterpreterStatistics(
                index=w.index, pid=w.pid, generation=w.generation, calls=w.calls,
                in_flight=self._balancer.in_flight(w.index), failures=w.failures,
                restarts=w.restarts, p50_latency=p50, p95_latency=p95, p99_latency=p99,
                available=w.available))
        notes = tuple(dict.fromkeys(note for w in self._workers for note in w.notes))
        return ManagerStatistics(self.backend, tuple(out), notes)

    # -- lifetime --------------------------------------------------------------
    def close(self, *, timeout: float = 10.0) -> None:
        """Stop every interpreter.  Idempotent; ``with`` calls it.

        Calls in flight get up to ``timeout`` seconds to finish; then their
        interpreters are killed and those calls raise
        :class:`~multipy.errors.ManagerClosedError`, as does every later call.
        """
        self._closed = True
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            args = finalizer.detach()  # None once closed: close runs once
            if args is not None:
                _close_workers(*args[2], timeout=timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "InterpreterManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<InterpreterManager {len(self)} x {self.backend} ({state})>"

    # -- internals ---------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ManagerClosedError("this InterpreterManager is closed")

    def _available(self, index: int) -> bool:
        return self._workers[index].available

    def _acquire(self) -> int:
        """The balancer's choice, skipping interpreters that are down (crashed and
        restarting) -- checked after the fact so the usual case costs nothing."""
        balancer = self._balancer
        index = balancer.acquire()
        if not self._workers[index].available:
            balancer.release(index)
            index = balancer.acquire(usable=self._available)
        return index

    def _with_worker(self, fn: Callable[[Any], Any]) -> Any:
        self._check_open()
        index = self._acquire()
        try:
            return fn(self._workers[index])
        finally:
            self._balancer.release(index)

    def _replicated_request(self, replicated: ReplicatedObj, method: str | None, args: tuple,
                            kwargs: dict, timeout: float | None, future=None,
                            grad_mode: int | None = None) -> Request:
        """A posted call of ``replicated`` (see :mod:`.dispatch`), made in the caller's
        thread so that it runs under the caller's autograd mode (or ``grad_mode``, a
        :class:`~multipy.transport.messages.GradMode`, when given); ``future`` as for
        :class:`~.dispatch.Request`."""
        if self._closed:  # _check_open and timeouts.effective, written out (once per call)
            raise ManagerClosedError("this InterpreterManager is closed")
        if grad_mode is None:
            grad_mode = caller_grad_mode()
        if timeout is None:
            timeout = self._call_timeout
        elif timeout == NO_TIMEOUT:
            timeout = None
        return Request(_CALL_REPLICATED, (replicated._id, method, args, kwargs, grad_mode),
                       timeout=timeout,
                       materializes=replicated._id, recipe=replicated._recipe, future=future,
                       owner=replicated)

    def _call_replicated(self, replicated: ReplicatedObj, method: str | None, args: tuple,
                         kwargs: dict, timeout: float | None, index: int | None = None) -> Any:
        """A blocking call; on interpreter ``index`` when the caller already holds it
        in the balancer (released here, whatever happens).  Runs once per call: the
        helpers it needs (``_check_open``, ``_acquire``, ``Worker.available``,
        ``timeouts.effective``) are written out here."""
        balancer = self._balancer
        if index is None:
            if self._closed:
                raise ManagerClosedError("this InterpreterManager is closed")
            # take_turn runs from C inside the list display: CPython raises a Ctrl-C
            # right after a call returns, and `index = take_turn(balancer)` would drop
            # the index with its count taken; here nothing runs between the two.
            index = [*map(take_turn, (balancer,))][0] if take_turn is not None else None
            if index is None:  # the balancer's lock is held: its own method
                index = balancer.acquire()
            chosen = True
        else:
            chosen = False
        # From here the count of `index` is this call's: given back in the finally,
        # whatever is raised (a Ctrl-C included).
        try:
            worker = self._workers[index]
            if chosen:
                if worker.dead_reason is not None or worker.broken is not None or worker.closed:
                    # Down (crashed, restarting): another one if any.  release is all
                    # or nothing (on a raise the count is still this call's).
                    balancer.release(index, notify=False)
                    index = None
                    index = balancer.acquire(usable=self._available)
                    worker = self._workers[index]
            elif self._closed:  # closed after the caller took the interpreter: give it back
                raise ManagerClosedError("this InterpreterManager is closed")
            if timeout is None:
                timeout = self._call_timeout
            elif timeout == NO_TIMEOUT:
                timeout = None
            return worker.request(
                _CALL_REPLICATED, (replicated._id, method, args, kwargs, caller_grad_mode()),
                timeout=timeout, materializes=replicated._id, recipe=replicated._recipe)
        finally:
            if index is not None:
                gave = False
                try:
                    if give_back is not None:  # from C inside the display, as take_turn
                        gave = [*map(give_back, (balancer,), (index,))][0]
                finally:
                    if not gave:  # declined (its lock busy), or a Ctrl-C before it ran
                        try:
                            balancer.release(index, notify=False)
                        except BaseException:
                            # A Ctrl-C as release was entered: nothing was given back
                            # (release is all or nothing), so once more, then it goes on.
                            balancer.release(index, notify=False)
                            raise
                if balancer.on_release is not None:  # release's hook, as it would run it
                    balancer.on_release()


MAX_INTERPRETERS = 256
"""The most interpreters one manager starts, unless ``MULTIPY_MAX_INTERPRETERS`` says
otherwise: a guard against a mistyped count starting processes without limit."""


def _check_options(n, env, preload) -> tuple[str, ...]:
    """Refuse wrong-typed or absurd constructor arguments before anything starts;
    returns ``preload`` as a tuple of module names."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"InterpreterManager(n): n is the number of interpreters, an int, "
                        f"got {type(n).__name__} {n!r}")
    if n < 1:
        raise ValueError(f"an InterpreterManager needs at least one interpreter, got {n!r}")
    limit = int(os.environ.get("MULTIPY_MAX_INTERPRETERS", MAX_INTERPRETERS))
    if n > limit:
        raise ValueError(
            f"InterpreterManager({n}) would start {n} interpreters, more than the limit of "
            f"{limit} (each is a process or thread with its own copy of the model's modules). "
            f"Set the environment variable MULTIPY_MAX_INTERPRETERS={n} if you mean it.")
    if env is not None and not isinstance(env, Environment):
        hint = (f" (for a site-packages directory: env=PathEnvironment({env!r}))"
                if isinstance(env, (str, os.PathLike)) else "")
        raise TypeError(f"env must be a multipy Environment{hint}, got {type(env).__name__} {env!r}")
    if isinstance(preload, str):
        preload = (preload,)  # one module name, not its letters
    try:
        names = tuple(preload)
    except TypeError:
        raise TypeError(f"preload names modules to import: a str or a sequence of str, got "
                        f"{type(preload).__name__} {preload!r}") from None
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"preload names modules to import (e.g. preload=('numpy', 'mymodels')), "
                            f"got {name!r} in {preload!r}")
    return names


def _ownership(obj, owner, here):
    from ..errors import OwnershipError

    if owner is None:
        return OwnershipError(f"create_movable needs an Obj of the session, got {type(obj).__name__}")
    return OwnershipError(f"{obj!r} lives in a different session (interpreter {owner}) than the "
                          f"session passed to create_movable (interpreter {here})")


def _start_all(workers) -> None:
    """Start every interpreter at the same time, each with its start-up steps
    (imports, registered modules); raise the first failure once all are done."""
    def start(worker):
        worker.launch()
        worker.ready()

    if len(workers) == 1:
        start(workers[0])
        return
    with concurrent.futures.ThreadPoolExecutor(len(workers), thread_name_prefix="multipy-start") as pool:
        futures = [pool.submit(start, w) for w in workers]
    for future in futures:
        future.result()


def _close_workers(workers, backend, dispatcher, completions, timeout: float = 10.0) -> None:
    """Close every worker at once: each waits up to ``timeout`` for its call in flight.
    Posted calls not sent yet fail; those in flight finish (or are cut short) first."""
    dispatcher.close()
    for worker in workers:
        worker.closed = True
    closers = [threading.Thread(target=_close_quietly, args=(w, timeout), daemon=True)
               for w in workers]
    for t in closers:
        t.start()
    for t in closers:
        t.join()
    completions.close()
    backend.close()


def _close_quietly(worker, timeout: float) -> None:
    try:
        worker.close(timeout=timeout)
    except Exception:
        pass
