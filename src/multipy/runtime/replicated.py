"""ReplicatedObj: one object that exists (lazily) in every interpreter.

Its *recipe* says how an interpreter builds its copy: unpickle a resource of a
package, or load a movable (an object pickled out of another interpreter with
its tensors in a shared segment).  Either way the tensor bytes are shared, not
copied: the package file or the segment is mapped copy-on-write.  The host
remembers which interpreters hold a copy, so the recipe travels only with the
first call on each.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import weakref
from typing import TYPE_CHECKING, Any

from ..transport.channel import _native_module
from ..transport.messages import Drop, Op, Recipe
from .dispatch import AWAITED
from .session import InterpreterSession
from .timeouts import NO_TIMEOUT, check_timeout

if TYPE_CHECKING:
    import concurrent.futures

    from .batching import BatchedObj
    from .manager import Interpreter, InterpreterManager

_ids = itertools.count(1)
_REPLICATED = int(Drop.REPLICATED)
_CALL = Op.CALL_REPLICATED
#: ``call_replicated(obj, args, kwargs, op)``: :meth:`ReplicatedObj.__call__` in one C
#: call (the manager's ``_call_replicated`` and the worker's request, in their common
#: case; the rest handed back to them); ``None`` without the extension.
_call_replicated = getattr(_native_module, "call_replicated", None)


def _release(workers, rid: int, fd: int | None) -> None:
    # Released in every interpreter, not only where the host records it loaded: a
    # first call's reply read while another object's unload was in flight marks its
    # object loaded in the set that unload replaced (Worker._forget_loaded), so the
    # record can miss a copy.  No call of it is in flight here (a posted call keeps
    # its object alive until it ends, a blocking one holds its handle); the release
    # goes with a later request, and releasing what an interpreter never loaded
    # does nothing.
    for worker in workers:
        worker.materialized.discard(rid)
        worker.drop((_REPLICATED, rid))
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


class ReplicatedObj:
    """A handle to an object replicated across the manager's interpreters.

    Calling it runs on a free interpreter and returns a host value::

        model = package.load_pickle("model", "model.pkl")
        out = model(torch.ones(1, 3, 224, 224))
        out = model(x, scale=2.0)            # keyword arguments
        model.hasattr("forward")             # True
        future = model.submit(x)             # concurrent.futures.Future
        out = await model.acall(x)           # asyncio
        out = model.batched()(x)             # batched with concurrent calls

    The object is unloaded from every interpreter when the last handle is dropped.
    """

    def __init__(self, manager: "InterpreterManager", recipe: tuple, *, segment_fd: int | None = None,
                 uses: tuple = ()) -> None:
        self._manager = manager
        self._uses = uses  # the packages its recipe loads from, kept open while it lives
        self._id = next(_ids)
        self._recipe = recipe
        self._finalizer = weakref.finalize(self, _release, manager._workers, self._id, segment_fd)

    if _call_replicated is not None:
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return _call_replicated(self, args, kwargs, _CALL)
    else:
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return self._manager._call_replicated(self, None, args, kwargs, None)

    def submit(self, *args: Any, **kwargs: Any) -> "concurrent.futures.Future":
        """Call the object without waiting: a :class:`concurrent.futures.Future`
        of the result.  No thread waits for it: the call is sent as soon as an
        interpreter is free (queued until then) and the manager's completion
        thread delivers the reply.

        Cancelling the future before the call was sent means it is never sent;
        once sent (``future.running()``), it runs to its end and the result is
        dropped.  Errors are raised by ``result()`` as for a blocking call: the
        interpreter's exception type with its traceback as ``__cause__``.

        >>> futures = [model.submit(x) for x in inputs]        # doctest: +SKIP
        >>> outs = [f.result() for f in futures]  # doctest: +SKIP
        """
        return self._manager._dispatcher.submit(
            self._manager._replicated_request(self, None, args, kwargs, None))

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        """``await`` a call from asyncio: one event-loop thread can keep every
        interpreter busy.

        A task cancelled before its call was sent (``asyncio.wait_for``,
        ``asyncio.timeout``, ``task.cancel()``) means the call is never sent;
        one cancelled after it was sent lets it run to its end on the
        interpreter and drops the result.  Exceptions keep their type and the
        interpreter-side traceback, as for blocking calls.

        >>> out = await model.acall(torch.ones(1, 16))         # doctest: +SKIP
        >>> out = await asyncio.wait_for(model.acall(x), 0.5)  # doctest: +SKIP
        """
        manager = self._manager
        return await manager._dispatcher.submit_async(
            manager._replicated_request(self, None, args, kwargs, None, future=AWAITED))

    def expect_call(self) -> int | None:
        """Say that a posted call (:meth:`submit`, :meth:`acall`, a batched call) is
        coming: the interpreter it will most likely run on is woken now if it
        sleeps waiting for requests, and spins for the call instead.  Worth it
        when the caller has work to do first (reading and decoding a request):
        the interpreter's wake-up overlaps that work instead of following the
        post.  Nothing is sent; calling it without a call following only costs
        the interpreter a short spin.  Returns the interpreter's index, or
        ``None`` when none is idle (the call would wait anyway).  On the thread
        backend and without the C extension it wakes nothing.

        >>> model.expect_call()                 # doctest: +SKIP
        0
        >>> x = decode(body)                    # doctest: +SKIP
        >>> out = await model.acall(x)          # doctest: +SKIP
        """
        return self._manager._dispatcher.expect()

    def batched(self, *, max_batch_size: int = 32, max_delay_ms: float = 2.0,
                method: str | None = None) -> "BatchedObj":
        """This object with dynamic batching: concurrent calls whose tensors agree
        on every dimension but the first run as one call, split back by rows.

        Nothing waits a timer while an interpreter is idle; ``max_delay_ms``
        bounds how long a request waits for its batch while all are busy.
        ``method`` batches calls of ``obj.method(...)`` instead of ``obj(...)``.
        Only for objects whose rows are independent (see
        :mod:`multipy.runtime.batching`).

        >>> fast = model.batched(max_batch_size=32)            # doctest: +SKIP
        >>> out = await fast.acall(torch.rand(1, 16))          # doctest: +SKIP
        >>> fast.statistics().mean_batch_size                  # doctest: +SKIP
        """
        from .batching import BatchedObj

        return BatchedObj(self, max_batch_size=max_batch_size, max_delay_ms=max_delay_ms,
                          method=method)

    def call_method(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call ``obj.name(*args, **kwargs)`` on a free interpreter.

        >>> model.call_method("make_prediction", [(a, b)])   # doctest: +SKIP
        """
        return self._manager._call_replicated(self, name, args, kwargs, None)

    def with_timeout(self, timeout: float | None, /):
        """A callable that calls this object with a per-call ``timeout`` (seconds;
        ``None`` or ``inf``: none, whatever the manager's ``call_timeout``).

        A bad value (``0``, ``-1``, ``nan``, ``"1"``) raises ``ValueError`` or
        ``TypeError`` here, before anything is sent.  Loading the object in an
        interpreter that does not hold it yet is not counted against it.

        >>> model.with_timeout(0.5)(x)                         # doctest: +SKIP
        """
        seconds = check_timeout(timeout, "with_timeout's timeout")
        if seconds is None:
            seconds = NO_TIMEOUT
        return lambda *args, **kwargs: self._manager._call_replicated(self, None, args, kwargs, seconds)

    def hasattr(self, name: str, /) -> bool:
        """``hasattr`` on the object (asked of one interpreter)."""
        return self._manager._with_worker(
            lambda worker: self._run(worker, Op.HASATTR_REPLICATED, (self._id, name)))

    def _run(self, worker, op: Op, args: tuple):
        # hasattr may load the object there first: not bounded by call_timeout
        return worker.request(op, args, materializes=self._id, recipe=self._recipe)

    def acquire_session(self, interpreter: "Interpreter | None" = None) -> InterpreterSession:
        """A session on one interpreter whose ``self`` is this object there.

        >>> with model.acquire_session() as s:                 # doctest: +SKIP
        ...     batch = s.self.attr("make_batch")(inputs, {"max_bs": "8"})
        """
        session = (self._own(interpreter).acquire_session() if interpreter is not None
                   else self._manager.acquire_one())
        try:
            session.self = session.from_movable(self)
        except BaseException:
            session.close()
            raise
        return session

    def load_everywhere(self) -> "ReplicatedObj":
        """Load the object in every interpreter now, all at once; returns ``self``.

        Without it each interpreter loads its copy on its first call, and that
        call pays for the imports and the unpickling.  Use it to warm a pool up
        before serving.  Raises the first interpreter's error, if any.

        >>> model = package.load_pickle("model", "model.pkl").load_everywhere()  # doctest: +SKIP
        >>> model.loaded_in()                                                   # doctest: +SKIP
        [0, 1]
        """
        manager = self._manager
        manager._check_open()
        missing = [w for w in manager._workers if self._id not in w.materialized]

        def load(worker):
            worker.request(Op.MATERIALIZE, (self._id,),  # loads: unbounded
                           materializes=self._id, recipe=self._recipe)

        if len(missing) == 1:
            load(missing[0])
        elif missing:
            with concurrent.futures.ThreadPoolExecutor(
                    len(missing), thread_name_prefix="multipy-load") as pool:
                futures = [pool.submit(load, w) for w in missing]
            for future in futures:
                future.result()
        return self

    def unload(self, interpreter: "Interpreter | None" = None) -> None:
        """Drop the object from one interpreter, or from all of them.

        Calls already sent to an interpreter run before the unload there and
        return their results; calls sent during or after it carry the object's
        recipe and load it again where they run, as a first call does.  So
        ``unload()`` never makes a call fail; an object that keeps being called
        is loaded again by those calls.

        >>> model.unload(manager.all_instances()[0])   # doctest: +SKIP
        >>> model.loaded_in()                          # doctest: +SKIP
        [1]
        """
        workers = ([self._manager._workers[self._own(interpreter).index]]
                   if interpreter is not None else self._manager._workers)
        for worker in workers:
            if self._id in worker.materialized:
                # Marked not loaded under the worker's lock as the request is sent
                # (not after its reply: a call sent in between would go without the
                # recipe and find the object gone).
                worker.request(Op.UNLOAD, (self._id,), unloads=self._id)

    def _own(self, interpreter: "Interpreter") -> "Interpreter":
        """``interpreter``, checked to be one of this object's manager."""
        from .manager import Interpreter

        if not isinstance(interpreter, Interpreter):
            raise TypeError(f"expected an Interpreter of manager.all_instances() (or None for "
                            f"all of them), got {type(interpreter).__name__} {interpreter!r}")
        if interpreter._manager is not self._manager:
            raise ValueError(f"{interpreter!r} belongs to another InterpreterManager than "
                             f"{self!r}; pass one of this manager's all_instances()")
        return interpreter

    def loaded_in(self) -> list[int]:
        """Indices of the interpreters that hold a copy now."""
        return [w.index for w in self._manager._workers if self._id in w.materialized]

    def __repr__(self) -> str:
        return f"<ReplicatedObj {self._id} {Recipe(self._recipe[0]).name.lower()} loaded in {self.loaded_in()}>"
