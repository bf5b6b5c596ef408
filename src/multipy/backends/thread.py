"""The ``thread`` backend: one interpreter per thread of the host process.

::

    host thread (caller)                        interpreter thread (_serve)
    --------------------                        ---------------------------
    Worker.request(op, args)   [worker lock]
      args ─▶ by_reference.to_interpreter      (Obj ─▶ the object itself,
              tensors by reference, containers copied, anything else pickled)
      requests.put((n, op, args, drop)) ──────▶ requests.get()
                                                InterpreterState.handle(op, args, drop)
                                                  under the caller's grad mode
                                                result ─▶ by_reference.to_host
      replies.get(timeout) ◀─────────────────── replies.put((n, value, error))
      value (tensors are the interpreter's own, not copies) / raise rebuilt error

**Actors.**  The *caller* is any host thread holding the worker lock (one
request in flight per interpreter).  The *interpreter thread* owns one
:class:`~multipy.interp.state.InterpreterState` (object table, one
``PackageImporter`` per package, registered modules) and is the only thread
that runs that interpreter's code; the caller never runs it.  A *channel* is one
generation of an interpreter: its thread and its two ``queue.SimpleQueue``
(C-level lock handoffs; no polling).  A restart makes a new channel; the old
one is abandoned.  Per call, on a 2-core GIL build: the bare handoff is about
13 µs (two thread switches), a 1x16 call through ``ReplicatedObj`` about 21 µs
over a direct call (``multipy bench --overhead --backend thread``).

**What one interpreter isolates.**  Its own ``PackageImporter`` per package (so
its own copy of every interned module: classes, module globals), its own copy
of every ``register_module_source`` module (see
:class:`~multipy.interp.modules.ThreadModules`: never in ``sys.modules``, served
by an import hook to that interpreter's thread only), its own object table, its
own ``multipy.interpreter_id()``, grad mode and torch intra-op thread count
(OpenMP builds: both are per thread).  *Shared*, by design, with the host and
the other interpreters: ``sys.modules`` (the standard library, torch, numpy,
everything imported from ``sys.path``; a :class:`~multipy.PathEnvironment`'s
directory is searched by interpreter threads only, but what they import from it
is then imported for the whole process), ``builtins``, ``torch.version``, the
process's file descriptors and environment.  ``id(None)`` is the same in every
interpreter.  Threads started by code inside an interpreter are host threads.

**What crosses, and how.**  Tensors cross by reference, never copied: a result
is the interpreter's own tensor (a weight returned by ``deref()`` is the
weight), an argument is the caller's tensor, so in-place writes on either side
are seen by the other.  Tensors that require grad are detached, as on the
``process`` backend.  Containers (tuple, list, dict) are rebuilt; any other
object is pickled and unpickled (its tensors still by reference), so values
keep the ``process`` backend's copy semantics and the same
:class:`~multipy.errors.TransportError` for what cannot cross.  A package's
weights are shared by reference between interpreters: every interpreter's
importer gets its storages from one process-wide mapping of the archive
(same ``data_ptr``), and ``create_movable`` keeps the tensors themselves.

Conjugate and negative views are resolved (a copy), as on the wire; results
made under ``inference_mode`` are inference tensors (the ``process`` backend
returns ordinary ones); CUDA tensors cross by reference too.

**Speed.**  The speed-up needs a free-threaded CPython (3.13t or 3.14t, where
``sys._is_gil_enabled()`` is False) with torch and numpy wheels built for it
(PyTorch publishes experimental cp313t wheels since 2.6; numpy since 2.1).
There the interpreter threads run Python in parallel and this is the fastest
backend: no copies, no pickling of tensors, no processes, so N interpreters are
expected to approach N x one interpreter for small-op models, as TorchScript
threads do (not measured here: free-threaded CPython cannot be installed on
these machines).  On a GIL build every interpreter takes the one GIL to run
Python: N interpreters are no faster than one for small-op models (GIL
contention; ``multipy bench --backend thread smallops`` on 2 cores gave 2
interpreters 0.28 and 0.81 of the limit in two runs, 1 interpreter 0.79-0.86),
and help only when the time goes to ops that release the GIL (large
convolutions and matmuls).  ``backend="auto"`` picks
``thread`` only on free-threaded builds.

**torch thread-safety.**  Concurrent calls into one module from several
threads are reads of shared parameters and are safe; grad mode and
``inference_mode`` are per thread.  In-place ops on shared tensors are not
safe: weights are shared by reference (a model that writes its parameters or
buffers while running, e.g. BatchNorm in training mode, races with the other
interpreters), and so are argument and result tensors.  PyTorch's free-threaded
wheels are experimental; an extension that does not declare free-threading
support re-enables the GIL at import (``sys._is_gil_enabled()`` then says so).

**Limits.**  A thread cannot be killed: a call past its timeout raises
:class:`~multipy.errors.CallTimeoutError` at once and the interpreter is
*abandoned* (its thread finishes the call in the background, then exits and
drops its objects) and replaced by a fresh one; a call that never returns keeps
its thread and memory until the process exits.  There is no crash isolation: a
segfault or ``os._exit()`` inside an interpreter ends the host process.
"""

from __future__ import annotations

import queue
import sys
import threading
import time

from .._current import set_thread_interpreter
from ..errors import CallTimeoutError, ManagerClosedError, TransportError
from ..interp.modules import ThreadModules
from ..interp.state import InterpreterState, capture_exception
from . import _by_reference as by_reference
from .base import Backend, BackendKind, Worker, WorkerConfig, no_start

_READY = "ready"
_CLOSED = "closed"


class _Channel:
    """One generation of an interpreter: its thread, its queues and its state.

    Requests are ``(sequence, op, args, drop)`` and replies ``(sequence, value,
    error)``: a caller interrupted while waiting (Ctrl-C) leaves a reply behind,
    which the next caller recognises as not its own and skips.
    """

    __slots__ = ("requests", "replies", "thread", "state", "abandoned", "sequence", "wake")

    def __init__(self, config: WorkerConfig) -> None:
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.replies: queue.SimpleQueue = queue.SimpleQueue()
        self.state: InterpreterState | None = None
        self.abandoned = False
        self.sequence = 0
        self.wake = None  # (sequence, wake) of a posted request: woken once its reply is queued
        self.thread = threading.Thread(target=_serve, args=(self, config),
                                       name=f"multipy-interpreter-{config.index}", daemon=True)


class ThreadWorker(Worker):
    """One interpreter driven by its own thread of the host process."""

    kind = BackendKind.THREAD

    def __init__(self, config: WorkerConfig) -> None:
        super().__init__(config)
        self._channel: _Channel | None = None

    def _launch(self) -> None:
        self._terminate(kill=True)
        channel = _Channel(self.config)
        channel.thread.start()
        self._channel = channel

    def _wait_ready(self) -> None:
        channel = self._channel
        timeout = self.config.start_timeout
        try:
            ready = channel.replies.get(timeout=timeout)
        except queue.Empty:
            why = f"its thread did not finish starting within {timeout:g} s"
            raise no_start(self.index, why) from None
        if ready is not _READY:
            raise no_start(self.index, f"{ready.type_name}: {ready.message}\n{ready.traceback}")

    def _roundtrip(self, op, args, drop, timeout, handles):
        channel, sequence = self._send(op, args, drop, handles, None)
        return self._receive(channel, sequence, op, timeout)

    # -- posted requests (Worker.post): the interpreter thread wakes the completion thread
    def _post(self, op, args, drop, timeout, handles, completions, finish):
        channel, sequence = self._send(op, args, drop, handles, completions.expect(finish))
        return channel, sequence, op

    def _collect(self, posted):
        channel, sequence, op = posted
        return self._receive(channel, sequence, op, None)  # the reply is there: no wait

    def _expire(self, posted, timeout):
        return self._abandon_for_timeout(timeout, posted[0])

    def _send(self, op, args, drop, handles, wake):
        channel = self._channel
        if channel is None:
            raise ManagerClosedError("the interpreter manager is closed")
        if args:
            args = by_reference.to_interpreter(op, args, handles, channel.state.objects)
        sequence = channel.sequence = channel.sequence + 1
        channel.wake = None if wake is None else (sequence, wake)
        channel.requests.put((sequence, op, args, drop))
        return channel, sequence

    def _receive(self, channel, sequence, op, timeout):
        _, value, error = self._wait(channel, sequence, timeout)
        if type(value) is by_reference.Pickled:
            try:
                value = value.load()
            except Exception as exc:
                raise TransportError(
                    f"the result of {op.name.lower()} in interpreter {self.index} could not be "
                    f"rebuilt in the host: {exc}. Types defined inside a package or a registered "
                    "module exist only in the interpreters; return plain values or tensors, or "
                    "keep an Obj handle.") from exc
        return value, error

    def _wait(self, channel: _Channel, sequence: int, timeout: float | None) -> tuple:
        get = channel.replies.get
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                reply = get() if deadline is None else get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise self._abandon_for_timeout(timeout, channel) from None
            if reply is _CLOSED:
                raise ManagerClosedError(
                    f"the manager was closed while interpreter {self.index} was running this call")
            if reply[0] == sequence:
                return reply

    def _abandon_for_timeout(self, timeout: float, channel: _Channel) -> CallTimeoutError:
        self._terminate(kill=True)
        self.mark_dead("timed out")
        return CallTimeoutError(
            f"call on interpreter {self.index} ({channel.thread.name}) ran past its timeout of "
            f"{timeout:g} s; a thread cannot be killed, so the interpreter was abandoned (its "
            "thread finishes the call in the background, then exits) and a fresh one replaces "
            "it; objects created in it are gone. Raise call_timeout= (manager) or timeout= (per "
            "call) if the work is expected to take longer.")

    def _terminate(self, *, kill: bool) -> None:
        channel, self._channel = self._channel, None
        if channel is None:
            return
        if kill:
            channel.abandoned = True       # the thread exits after the call it is running
            channel.replies.put(_CLOSED)   # and a caller waiting on it wakes up
            _wake(channel)
        channel.requests.put(None)
        if not kill:
            channel.thread.join(5)


def _serve(channel: _Channel, config: WorkerConfig) -> None:
    """The interpreter thread: start the interpreter, then serve requests."""
    replies = channel.replies
    try:
        state = _start(config)
    except BaseException as exc:
        replies.put(capture_exception(exc))
        return
    channel.state = state
    replies.put(_READY)
    try:
        _loop(channel, state)
    finally:
        state.close()


def _start(config: WorkerConfig) -> InterpreterState:
    set_thread_interpreter(config.index)
    modules = ThreadModules(tuple(p for p in config.sys_path if p not in sys.path))
    try:
        state = InterpreterState(config.index, finder=modules,
                                 importer_factory=by_reference.open_package_shared,
                                 movables=(by_reference.make_movable, by_reference.load_movable))
        state.activate_for_thread()
        try:
            import torch
        except ImportError:
            return state
        _set_num_threads(torch, config.num_threads)
    except BaseException:
        modules.close()
        raise
    return state


def _set_num_threads(torch, n: int) -> None:
    """Give this thread ``n`` intra-op threads without changing the host's.

    With OpenMP (torch's Linux and Windows wheels) the count is per thread, but
    ``set_num_threads`` also changes the default for threads started later,
    the host's included: a throwaway thread puts that default back.  With a
    native thread pool the count is process-wide and is left alone.
    """
    default = torch.get_num_threads()  # a new thread starts from the process default
    if default == n or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return
    torch.set_num_threads(n)
    restore = threading.Thread(target=torch.set_num_threads, args=(default,),
                               name="multipy-restore-num-threads")
    restore.start()
    restore.join()


def _loop(channel: _Channel, state: InterpreterState) -> None:
    get = channel.requests.get
    put = channel.replies.put
    handle = state.handle
    to_host = by_reference.to_host
    pickled = by_reference.Pickled
    while True:
        request = get()
        if request is None:
            return
        sequence, op, args, drop = request
        try:
            if type(args) is pickled:
                state.release(drop)  # even when the arguments cannot be rebuilt
                drop = ()
                args = args.load(state.objects)
            result = handle(op, args, drop)
            value = None if result is None else to_host(result)
            error = None
        except BaseException as exc:  # every failure goes back to the caller
            value, error = None, capture_exception(exc)
        request = args = result = None  # hold nothing between requests
        if channel.abandoned:
            return
        put((sequence, value, error))
        value = None
        posted = channel.wake
        if posted is not None and posted[0] == sequence:
            _wake(channel)


def _wake(channel: _Channel) -> None:
    posted, channel.wake = channel.wake, None
    if posted is not None:
        try:
            posted[1]()
        except Exception:
            pass  # the completion thread is closed: its waiters were told so


class ThreadBackend(Backend):
    """Creates :class:`ThreadWorker` interpreters."""

    kind = BackendKind.THREAD

    def create_worker(self, config: WorkerConfig) -> Worker:
        return ThreadWorker(config)


def create_backend() -> ThreadBackend:
    """The ``thread`` backend (``capabilities`` calls this for ``backend="thread"``)."""
    return ThreadBackend()
