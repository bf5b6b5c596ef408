"""Which models are served, and how one request reaches an interpreter.

::

    ModelRegistry(manager, {"name": "path[:package/resource]"}, options)
        └── ServedModel ── infer(args, deadline) ──▶ admission ──▶ batched(...).acall
              │                                        │ bounded queue: full ⇒ Overloaded (429)
              │                                        │ deadline while queued ⇒ dropped (504)
              └── counters the metrics read            └ slots: requests in interpreters at once

No HTTP here either: the Starlette app and a Ray Serve deployment both build a
registry and call :meth:`ServedModel.infer`.  A request waits for a *slot*: at
most ``interpreters × max_batch_size`` requests per model are in interpreters at
once, or without batching ``interpreters × depth``, where ``depth`` is how many
calls an interpreter queues (``MULTIPY_PIPELINE_DEPTH``, 2 by default on the
process backend's call channel): the next request then waits in the
interpreter's own queue and starts the moment the one before it ends, without a
round trip through the server.  Up to ``max_queue`` more wait in line, and a
request beyond that is refused at once with ``Retry-After``.  A waiting request
whose deadline passes, or whose caller gives up (the task is cancelled), leaves
the line, or the interpreter's queue, without running.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import (CallTimeoutError, InterpreterCrashedError, InterpreterStartError,
                      ManagerClosedError, TransportError)
from ..package import inspect_package
from ..runtime import InterpreterManager, ReplicatedObj
from ..runtime.dispatch import AWAITED
from ..transport.messages import GradMode
from .protocol import (DeadlineExceeded, InferenceError, ModelNotFound, Overloaded, Unavailable,
                       Unprocessable)

__all__ = ["ModelRegistry", "ModelSpec", "ServeOptions", "ServedModel"]

# Globals: an enum attribute costs a metaclass lookup per use.
_INFERENCE = int(GradMode.INFERENCE)
_NO_KWARGS: dict = {}


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """How the server treats requests; every field has the CLI option of the same name.

    >>> ServeOptions(max_queue=16, request_timeout=5.0).max_queue
    16
    """

    #: Most rows the library groups into one call (1: no batching).
    max_batch_size: int = 1
    #: Longest a batch waits for more rows while an interpreter is busy (ms).
    max_batch_delay_ms: float = 2.0
    #: Requests per model that may wait for an interpreter; more are refused (429).
    max_queue: int = 64
    #: Default deadline of a request (s); a request may ask for less.
    request_timeout: float = 30.0
    #: Largest request body accepted (413 beyond).
    max_request_bytes: int = 64 * 2**20
    #: What ``Retry-After`` says on 429 and 503 (s).
    retry_after: float = 1.0
    #: Interpreters one model may use at once (``None``: all of them).
    workers_per_model: int | None = None
    #: How long SIGTERM waits for requests in flight before exiting (s).
    drain_timeout: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_request_bytes"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be a whole number of at least 1, "
                                 f"got {getattr(self, name)!r}")
        for name in ("request_timeout", "retry_after", "drain_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be more than 0 seconds, got {getattr(self, name)!r}")
        if not self.max_batch_delay_ms >= 0:
            raise ValueError(f"max_batch_delay_ms must be 0 or more, got {self.max_batch_delay_ms!r}")
        if self.workers_per_model is not None and not self.workers_per_model >= 1:
            raise ValueError(f"workers_per_model must be at least 1, got {self.workers_per_model!r}")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where a served model comes from: a torch.package archive and the pickle in it.

    >>> ModelSpec.parse("resnet", "/models/resnet.pt:weights/net.pkl")
    ModelSpec(name='resnet', path='/models/resnet.pt', package='weights', resource='net.pkl')
    """

    name: str
    path: str
    package: str = "model"
    resource: str = "model.pkl"

    @classmethod
    def parse(cls, name: str, text: str) -> "ModelSpec":
        """``path`` or ``path:package/resource`` (the default is ``model/model.pkl``)."""
        if not name or "/" in name:
            raise ValueError(f"a model name must be non-empty and have no '/', got {name!r}")
        path, sep, where = text.rpartition(":")
        if sep and "/" in where and not os.path.exists(text):
            package, _, resource = where.rpartition("/")
            if not package or not resource:
                raise ValueError(f"model {name!r}: expected PATH:package/resource, got {text!r}")
            return cls(name, path, package.replace("/", "."), resource)
        return cls(name, text)


class ServedModel:
    """One served model: its replicated object, what it declares, and its line.

    ``infer`` is the only way requests reach the model.  The counters
    (``waiting``, ``running``) are what the metrics report; ``running`` counts
    the requests sent to interpreters, ``slots`` of them at most, of which up to
    ``interpreters`` run and the rest wait in the interpreters' own queues.
    """

    def __init__(self, spec: ModelSpec, obj: ReplicatedObj, options: ServeOptions, *,
                 slots: int, interpreters: int | None = None,
                 input_names: tuple[str, ...] = (),
                 output_names: tuple[str, ...] = ()) -> None:
        self.spec = spec
        self.name = spec.name
        self.obj = obj
        self.options = options
        self.input_names = input_names
        self.output_names = output_names
        self.waiting = 0
        self.running = 0
        #: Requests that may be in interpreters at once (running or queued there).
        self.slots = slots
        # Requests that start at once (one per interpreter); the slots beyond them
        # queue in an interpreter behind a running call.  Batched calls never queue
        # there (the library holds a batch until an interpreter is free).
        self._starts = slots if interpreters is None or options.max_batch_size > 1 \
            else interpreters
        # The library batches (no timer while an interpreter is idle, grouping by
        # shape); with max_batch_size 1 every call runs alone, as a plain acall does,
        # with no batching bookkeeping per request.
        self._batched = (obj.batched(max_batch_size=options.max_batch_size,
                                     max_delay_ms=options.max_batch_delay_ms)
                         if options.max_batch_size > 1 else None)
        self._answered = 0  # calls of the model that ended, when they are not batched
        self._manager = obj._manager
        self._dispatcher = obj._manager._dispatcher
        # Admission: `_free` slots left; the requests waiting for one, oldest first,
        # each a future its slot is handed to (a semaphore, with no lock and no
        # timeout object per waiting request).
        self._free = slots
        self._line: collections.deque[asyncio.Future] = collections.deque()
        # The running requests' deadlines, on the loop of the latest request.
        self._deadlines: _Deadlines | None = None

    def metadata(self, *, backend: str) -> dict[str, Any]:
        """The protocol's model metadata: what is known without running the model."""
        return {"name": self.name, "versions": ["1"], "platform": f"multipy_{backend}",
                "inputs": [{"name": n, "datatype": "", "shape": []} for n in self.input_names],
                "outputs": [{"name": n, "datatype": "", "shape": []} for n in self.output_names]}

    async def infer(self, args: tuple, *, deadline: float | None = None) -> Any:
        """Run the model on ``args`` and return its result.

        ``deadline`` is a ``time.monotonic()`` instant.  Raises
        :class:`Overloaded` when the line is full, :class:`DeadlineExceeded`
        when the deadline passes (the request is dropped if it had not
        started), :class:`Unavailable` when its interpreter crashed, and
        :class:`Unprocessable` when the model raised.

        >>> await model.infer((torch.ones(1, 4),), deadline=time.monotonic() + 5)  # doctest: +SKIP
        """
        if self._free > 0:
            self._free -= 1
        elif self.waiting >= self.options.max_queue:
            raise Overloaded(f"model {self.name!r} has {self.waiting} requests waiting, the most "
                             "--max-queue allows; retry later",
                             retry_after=self.options.retry_after)
        else:
            await self._wait_in_line(deadline)
        self.running += 1
        try:
            if deadline is None:
                result = await self._call(args)
            else:
                # Past the deadline the call is cancelled: dropped if the library has not
                # sent it yet, else it finishes in its interpreter and its result is
                # dropped.  (_Deadlines.run, written out: one coroutine less per request.)
                task = asyncio.current_task()
                deadlines = self._deadlines
                if deadlines is None or deadlines.loop is not task.get_loop():
                    deadlines = self._deadlines = _Deadlines(task.get_loop())
                deadlines.enter(task, deadline)
                try:
                    result = await self._call(args)
                except asyncio.CancelledError:
                    deadlines.cancelled(task)  # TimeoutError when the deadline cancelled it
                    raise
                finally:
                    deadlines.leave(task)
            self._answered += 1
            return result
        except TimeoutError:
            raise DeadlineExceeded("the deadline passed before the model's answer; the request "
                                   "was dropped") from None
        except InferenceError:
            raise
        except (InterpreterCrashedError, InterpreterStartError) as exc:
            raise Unavailable(f"{exc}; retry", retry_after=self.options.retry_after) from None
        except ManagerClosedError:
            raise Unavailable("the server is shutting down", retry_after=self.options.retry_after
                              ) from None
        except CallTimeoutError as exc:
            raise DeadlineExceeded(str(exc)) from None
        except TransportError as exc:
            raise InferenceError(f"the model's result cannot be sent back: {exc}") from None
        except Exception as exc:
            self._answered += 1
            raise Unprocessable(f"the model raised {type(exc).__name__}: {exc}") from None
        finally:
            self.running -= 1
            self._release()

    async def _wait_in_line(self, deadline: float | None) -> None:
        """Wait until a slot is handed to this request, at most until ``deadline``
        (then :class:`DeadlineExceeded`).  A request cancelled meanwhile (its client
        left) leaves the line, passing on a slot handed to it already."""
        loop = asyncio.get_running_loop()
        turn = loop.create_future()
        self._line.append(turn)
        self.waiting += 1
        timer = (None if deadline is None else
                 loop.call_at(loop.time() + _remaining(deadline), _expire, turn))
        try:
            await turn
        except TimeoutError:
            raise DeadlineExceeded(f"the deadline passed while the request waited for an "
                                   f"interpreter ({self.waiting - 1} others waiting); it "
                                   "was not run") from None
        except BaseException:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self._release()  # handed a slot, then cancelled before it resumed
            raise
        finally:
            self.waiting -= 1
            if timer is not None:
                timer.cancel()

    def _release(self) -> None:
        """A slot is free: hand it to the oldest request still waiting, or keep it."""
        line = self._line
        while line:
            turn = line.popleft()
            if not turn.done():  # not cancelled, not past its deadline
                turn.set_result(None)
                return
        self._free += 1

    def _call(self, args: tuple):
        """The model's call on ``args``, awaitable: what ``acall`` does, with the request
        made in inference mode.  A request carries the autograd mode of the thread that
        makes it, and the event loop's thread is in grad mode: a model would record
        autograd graphs no server reads (1.7x the interpreter's time on 40 small
        layers).  Made here, not by entering the mode around an ``await``: the mode is
        the thread's, and other requests' tasks run on it while this one waits."""
        if self._batched is None:  # a plain acall's request, made in inference mode
            request = self._manager._replicated_request(self.obj, None, args, _NO_KWARGS, None,
                                                        future=AWAITED, grad_mode=_INFERENCE)
        else:
            with torch.inference_mode():
                request = self._batched._request(args, {}, future=AWAITED)
        # on_loop: the server's loop reads the reply itself, with no hop through the
        # completion thread; it runs for as long as requests are in flight.
        return self._dispatcher.submit_async(request, on_loop=True)

    def busy(self) -> bool:
        """True when a new request would not start at once: it would wait in line,
        or in an interpreter's queue behind a running call."""
        return self._free <= 0 or self.running >= self._starts

    def batch_sizes(self) -> dict[int, int]:
        """How many calls of the model carried each number of requests (unbatched:
        the calls that ended with the model's answer or its error)."""
        if self._batched is None:
            return {1: self._answered} if self._answered else {}
        return dict(self._batched.statistics().batch_sizes)


def _expire(turn: asyncio.Future) -> None:
    if not turn.done():
        turn.set_exception(TimeoutError())


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class _Deadlines:
    """The deadlines of the requests one model runs on one event loop, watched by
    one loop timer for the earliest of them, as ``asyncio.timeout`` would watch
    each with a timer of its own: a request past its deadline has its task
    cancelled, and :meth:`run` turns that cancellation into ``TimeoutError``.

    A timer per request (made, pushed on the loop's heap, cancelled) cost each
    request several µs; here a request costs a dict entry.  The timer fires at the
    earliest deadline it was set for, cancels every request past its own, and is
    set again for the earliest left; a request with an earlier deadline than the
    timer's sets it earlier.

    >>> async def main():
    ...     deadlines = _Deadlines(asyncio.get_running_loop())
    ...     try:
    ...         await deadlines.run(asyncio.sleep(10), time.monotonic() + 0.01)
    ...     except TimeoutError:
    ...         return "past its deadline"
    >>> asyncio.run(main())
    'past its deadline'
    """

    __slots__ = ("loop", "running", "expired", "timer", "timer_at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.running: dict[asyncio.Task, float] = {}  # task -> deadline, on the loop's clock
        self.expired: dict[asyncio.Task, int] = {}    # task -> its cancelling() before ours
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = math.inf

    async def run(self, awaitable, deadline: float | None):
        """``await awaitable`` in this task (on :attr:`loop`), raising
        ``TimeoutError`` at ``deadline`` (a ``time.monotonic()`` instant; ``None``:
        none)."""
        if deadline is None:
            return await awaitable
        task = asyncio.current_task()
        self.enter(task, deadline)
        try:
            return await awaitable
        except asyncio.CancelledError:
            self.cancelled(task)
            raise
        finally:
            self.leave(task)

    def enter(self, task: asyncio.Task, deadline: float) -> None:
        """Watch ``task`` (running on :attr:`loop`) until :meth:`leave`: it is
        cancelled at ``deadline`` (a ``time.monotonic()`` instant)."""
        at = self.loop.time() + _remaining(deadline)
        self.running[task] = at
        if at < self.timer_at:
            self._arm(at)

    def cancelled(self, task: asyncio.Task) -> None:
        """``task`` was cancelled while watched: raises ``TimeoutError`` when the
        deadline alone cancelled it (else the caller re-raises the cancellation)."""
        before = self.expired.pop(task, None)
        if before is None:
            return  # not by the deadline
        if hasattr(task, "uncancel") and task.uncancel() > before:  # Python 3.11+
            return  # cancelled from elsewhere too
        raise TimeoutError from None

    def leave(self, task: asyncio.Task) -> None:
        """Stop watching ``task``."""
        del self.running[task]
        if self.expired:  # cancelled by the deadline, yet it ended otherwise
            self.expired.pop(task, None)

    def _arm(self, at: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer, self.timer_at = self.loop.call_at(at, self._fire), at

    def _fire(self) -> None:
        """Cancel the requests past their deadline; set the timer for the earliest
        deadline left."""
        self.timer, self.timer_at = None, math.inf
        now, earliest = self.loop.time(), math.inf
        for task, at in self.running.items():
            if at > now:
                earliest = min(earliest, at)
            elif task not in self.expired and not task.done():
                self.expired[task] = task.cancelling() if hasattr(task, "cancelling") else 0
                task.cancel()
        if earliest < math.inf:
            self._arm(earliest)


class ModelRegistry:
    """The served models, loaded from one :class:`~multipy.InterpreterManager`.

    ``models`` maps a name to ``"path[:package/resource]"`` (or a
    :class:`ModelSpec`).  The caller owns the manager unless ``owns_manager``:
    then :meth:`close` closes it too.

    >>> with InterpreterManager(2) as manager:                    # doctest: +SKIP
    ...     registry = ModelRegistry(manager, {"simple": "simple.pt"})
    ...     app = build_app(registry)
    """

    def __init__(self, manager: InterpreterManager, models: Mapping[str, str | ModelSpec],
                 options: ServeOptions | None = None, *, owns_manager: bool = False) -> None:
        if not models:
            raise ValueError("serve at least one model")
        self.manager = manager
        self.options = options or ServeOptions()
        self.owns_manager = owns_manager
        self.draining = False
        self._models: dict[str, ServedModel] = {}
        interpreters = min(len(manager), self.options.workers_per_model or len(manager))
        slots = interpreters * (self.options.max_batch_size if self.options.max_batch_size > 1
                                else _depth(manager))
        for name, spec in models.items():
            if not isinstance(spec, ModelSpec):
                spec = ModelSpec.parse(name, spec)
            package = manager.load_package(spec.path)
            obj = package.load_pickle(spec.package, spec.resource)
            for interpreter in manager.all_instances():  # load it everywhere before ready
                with obj.acquire_session(interpreter):
                    pass
            inputs, outputs = _declared(obj)
            self._models[name] = ServedModel(spec, obj, self.options, slots=slots,
                                             interpreters=interpreters,
                                             input_names=inputs, output_names=outputs)
        #: Tensor bytes of each model's package: mapped once, shared by every interpreter.
        self.weights_bytes = {name: inspect_package(m.spec.path).storage_bytes
                              for name, m in self._models.items()}

    @classmethod
    def open(cls, models: Mapping[str, str | ModelSpec], options: ServeOptions | None = None, *,
             interpreters: int = 2, backend: str = "process") -> "ModelRegistry":
        """A registry with its own manager of ``interpreters`` (closed with it).

        >>> registry = ModelRegistry.open({"simple": "simple.pt"}, interpreters=2)  # doctest: +SKIP
        """
        manager = InterpreterManager(interpreters, backend=backend)
        try:
            return cls(manager, models, options, owns_manager=True)
        except BaseException:
            manager.close()
            raise

    def get(self, name: str) -> ServedModel:
        """The model called ``name``; raises :class:`ModelNotFound` (404)."""
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFound(f"no model {name!r} is served here; the models are "
                                f"{', '.join(map(repr, self._models))}") from None

    def __iter__(self):
        return iter(self._models.values())

    def __contains__(self, name: object) -> bool:
        """Whether a model called ``name`` is served here."""
        return name in self._models

    def names(self) -> list[str]:
        return list(self._models)

    def interpreters_up(self) -> int:
        """Interpreters serving now (not crashed, restarting or broken)."""
        return sum(1 for i in self.manager.statistics().interpreters if i.available)

    def ready(self) -> bool:
        """True when requests can be served now: not draining, and at least one
        interpreter up."""
        return not self.draining and not self.manager.closed and self.interpreters_up() > 0

    def close(self) -> None:
        """Stop serving; closes the manager only when the registry owns it.  Idempotent."""
        self.draining = True
        if self.owns_manager:
            self.manager.close()

    def __enter__(self) -> "ModelRegistry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _depth(manager: InterpreterManager) -> int:
    """Calls each interpreter of ``manager`` queues (1: the next is sent only once
    the one before it ended).  An interpreter with a request queued behind a running
    one starts it as soon as that one ends: measured on 2 process interpreters,
    64 requests in flight, the small-op model, an interpreter found its queue empty
    after 0.66-0.83 calls in 1 with one slot per interpreter and 0.32-0.36 with two
    (benchmarks/count_serve_instructions.py --waits)."""
    return max(1, min(worker.posted_depth for worker in manager._workers))


def _declared(obj: ReplicatedObj) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The ``input_names`` / ``output_names`` a model declares (as attributes), if any."""
    names = []
    for attr in ("input_names", "output_names"):
        value = ()
        if obj.hasattr(attr):
            with obj.acquire_session() as s:
                value = s.self.attr(attr).deref()
        names.append(tuple(str(v) for v in value) if isinstance(value, (list, tuple)) else ())
    return names[0], names[1]
