"""The worker protocol: what a backend implements so the manager never
branches on which backend it drives.

A :class:`Worker` is one interpreter seen from the host.  The base class
keeps the per-interpreter bookkeeping that is the same for every backend; a
backend subclass supplies the steps, in the shape of ``concurrent.futures``'
worker context: ``_launch`` (start the interpreter), ``_wait_ready``,
``_roundtrip`` (send one request, return the reply), ``_post`` / ``_collect``
/ ``_expire`` (the same, without a waiting thread) and ``_terminate``, plus
:meth:`Worker.adopt_movable` where its movables live in interpreter memory.

What the runtime (manager, sessions, replicated objects, the dispatcher) uses
of a worker, and nothing else:

* calls: :meth:`~Worker.request` (blocking, thread-safe), :meth:`~Worker.post`
  (answered through the manager's completions), :meth:`~Worker.drop`,
  :meth:`~Worker.add_startup`, :meth:`~Worker.adopt_movable`,
  :meth:`~Worker.launch`, :meth:`~Worker.ready`, :meth:`~Worker.close`;
* state it reads: ``index``, ``pid``, ``generation`` (a session's handles are
  valid in one generation only), ``available`` and ``dead_reason``,
  ``materialized`` (replicated ids loaded there), ``closed``, and the counters
  behind ``statistics()``: ``calls``, ``failures``, ``restarts``, ``latencies``;
* ``lock``, taken without blocking by the dispatcher to send a posted call,
  and ``on_free``, its wake-up when one frees; ``posted_depth`` (how many posted
  calls may be in flight there: more than 1 where they queue in the
  interpreter) and ``posted_in_flight``.

::

    caller ─▶ Worker.request ─▶ [lock] ─▶ _roundtrip ─▶ interpreter
                  ▲                          │
                  └──── value / raised ◀─────┘  (crash → InterpreterCrashedError)
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import pickle
import threading
import time
from typing import Any, Callable

from ..errors import (InterpreterCrashedError, InterpreterError, InterpreterStartError,
                      ManagerClosedError, RemoteTraceback)
from ..transport.messages import Op, RemoteException
from .completions import CLOSED as _CLOSED


#: One entry per host thread inside a blocking call of a backend with several calls
#: in flight (Worker._request_in_flight), whether it waits for the worker lock or
#: for its reply: ``len(in_calls)`` says whether a waiting caller is alone (append
#: and pop are atomic, unlike ``+=`` on a global).  Kept by workers whose
#: ``counts_callers`` is true (the process backend's on the pipes).
in_calls: collections.deque = collections.deque()


class RequestNotSent(Exception):
    """Raised by a backend's ``_roundtrip`` when the interpreter was already gone
    before the request reached it; ``error`` is what to raise if it cannot be
    sent to a replacement."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


#: What ``Worker._collect`` returns when the ready data was not its reply after all
#: (a reply left by a caller who gave up); it has re-armed the completion.  Also what
#: ``Worker._expire`` returns while it stops a call without waiting.
PENDING = object()

RESTART_BACKOFF = 0.1     # seconds before the 2nd start attempt, doubling after
MAX_START_FAILURES = 5    # failed starts in a row before an interpreter is given up
# Interpreters in a row a blocking call goes to while each dies before taking it (it
# never ran: each replacement gets it).  Bounded, so that a call never waits for
# ever on an interpreter that keeps dying before its turn.
MAX_SENDS = 5
_SENDS = tuple(range(MAX_SENDS))  # the attempts, without a range object per call
_clock = time.perf_counter
_CALLER_LEAVES = 5.0      # seconds close() waits for a stopped call's caller to return


class BackendKind(str, enum.Enum):
    """The kinds of interpreter multipy can run."""

    PROCESS = "process"
    THREAD = "thread"
    SUBINTERPRETER = "subinterpreter"


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """What every interpreter is started with."""

    index: int
    sys_path: tuple[str, ...]
    num_threads: int
    start_timeout: float = 300.0
    startup: tuple = ()          # (op, args) replayed on every (re)start
    # Modules imported once where interpreters start from, so that all of them share
    # those pages (the process backend's fork server); still imported by `startup`.
    shared_imports: tuple[str, ...] = ()
    # Seconds each side polls before sleeping on a reply or request.  It must outlast a
    # wake-up of the other side plus its work (~100 µs on a VM), or two sleeping
    # sides keep making each other's spins fail.
    spin: float = 200e-6
    # Seconds an interpreter of the process backend polls for its next request after
    # a reply before it sleeps (the host's waits keep ``spin``).  Longer than the gap
    # between two requests of one client of a server (~0.3-0.5 ms over HTTP on a VM),
    # so that the next request finds it awake instead of paying its wake-up; the poll
    # yields its core to any other runnable thread every 64 looks, and an idle pool
    # sleeps 1 ms after its last call.
    idle_spin: float = 1e-3


class Worker:
    """One interpreter, seen from the host.  Subclasses implement the transport."""

    kind: BackendKind
    # A backend that keeps several requests in flight per interpreter sets
    # ``request = Worker._request_in_flight`` and implements ``_send_call`` (under
    # ``lock``) and ``_await_call`` (without it).

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.index = config.index
        self.generation = 0
        self.pid: int | None = None
        self.lock = threading.Lock()
        self.materialized: set[int] = set()
        self.drops: collections.deque = collections.deque()
        self.closed = False
        self.dead_reason: str | None = None   # why the interpreter is down, until restarted
        self.broken: str | None = None        # set after too many failed starts in a row
        self.start_failures = 0               # consecutive failed starts
        self.calls = 0
        self.failures = 0
        self.restarts = 0
        self.latencies: list[float] = []
        self._tally = threading.Lock()  # failures counted from threads without the lock
        self.posted_in_flight = 0       # posted requests sent and not ended (under _tally)
        self._started = False
        self._startup = list(config.startup)
        # Called (from any thread) after the lock is released at the end of a
        # request or a restart: the dispatcher of posted requests sends the next.
        self.on_free: Callable[[], None] | None = None

    @property
    def notes(self) -> tuple[str, ...]:
        """Plain-language remarks for ``statistics().notes`` (e.g. what is not shared)."""
        return ()

    # -- to implement ---------------------------------------------------
    def _launch(self) -> None:
        raise NotImplementedError

    def _wait_ready(self) -> None:
        raise NotImplementedError

    def _roundtrip(self, op: Op, args: tuple, drop: tuple, timeout: float | None, handles):
        """Send one request, return ``(value, RemoteException | None)``.

        ``handles`` is ``(Obj type, obj -> handle id)`` for the session the
        request belongs to (or ``None``): how to pass ``Obj`` arguments.
        """
        raise NotImplementedError

    def _terminate(self, *, kill: bool) -> None:
        raise NotImplementedError

    def _send_call(self, op: Op, args: tuple, drop: tuple, timeout: float | None, handles):
        """(Pipelined backends.)  Send one request under ``lock``; return a ticket
        for :meth:`_await_call`.  Raises :class:`RequestNotSent` as ``_roundtrip`` does."""
        raise NotImplementedError

    def _await_call(self, ticket, waited=None) -> tuple:
        """(Pipelined backends.)  Wait, without ``lock``, for the reply of a sent
        request: ``(value, RemoteException | None)``; raises as ``_roundtrip`` does.
        ``waited`` is ``None`` but for a call the extension sent (see ``_caller``)."""
        raise NotImplementedError

    def _drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the requests in flight outside ``lock`` to end."""
        return True

    #: (Pipelined backends.)  Id of the last request sent; read under ``lock``.
    _next_call = 0

    #: (Pipelined backends.)  The extension's ``Caller`` of this generation, or
    #: ``None``: where it is one, a replicated object's blocking call is made in one C
    #: call (``_native.call_replicated``), which hands anything but the common call
    #: back to :meth:`_request_in_flight` (its ``sent``) or to the manager.
    _caller = None

    #: Whether :meth:`_request_in_flight` counts its callers in :data:`in_calls`
    #: (a backend whose waits do not read it turns this off).
    counts_callers = True

    def _abandon(self, since: int) -> None:
        """(Pipelined backends.)  The calling thread left :meth:`_request_in_flight`
        by an exception: any request it sent after call id ``since`` that is still
        counted as awaited is given up (its reply, when it comes, reaches nobody)."""

    def _pipelines(self) -> bool:
        """Whether a posted request may leave ``lock`` once sent (several posted
        requests in flight, queued in the interpreter); else it holds ``lock``
        until its reply is read."""
        return False

    @property
    def posted_depth(self) -> int:
        """How many posted requests the dispatcher keeps in flight on this
        interpreter at once: 1 unless the backend queues requests in the
        interpreter (:meth:`_pipelines`)."""
        return 1

    def poke(self) -> bool:
        """A call is coming: wake the interpreter if it sleeps waiting for requests,
        so that it is awake (spinning) when the call is posted.  Posts nothing and
        never raises; ``False`` where there is nothing to wake (this backend's
        interpreters do not sleep on a request word, or the interpreter is down).

        >>> worker.poke()  # doctest: +SKIP
        False
        """
        return False

    def cancel_posted(self, posted) -> None:
        """The caller of a posted request gave up on it after it was sent
        (``posted`` is what :meth:`post` returned): a backend that queues requests
        may drop it unrun if it has not started.  Its ``done`` runs either way."""

    def _abandon_posted(self, posted) -> None:
        """A posted request will not be collected (the completion thread stopped):
        forget it, so that its reply, if one comes, is settled unread."""

    # -- lifecycle --------------------------------------------------------
    def launch(self) -> None:
        """Begin starting the interpreter (returns before it is ready)."""
        with self.lock:
            self._launch_locked()

    def _launch_locked(self) -> None:
        if self.closed:
            raise ManagerClosedError("the interpreter manager is closed")
        self.generation += 1
        self.materialized = set()
        self.drops.clear()
        self._launch()
        self._started = False

    def ready(self) -> None:
        """Wait until the interpreter serves requests; replay start-up requests."""
        with self.lock:
            self._ready_locked()

    def _ready_locked(self) -> None:
        if self._started:
            return
        try:
            self._wait_ready()
            for op, args in self._startup:
                self._checked(op, args, None)
        except BaseException as exc:
            self._terminate(kill=True)
            if isinstance(exc, (InterpreterStartError, ManagerClosedError)) or not isinstance(exc, Exception):
                raise
            raise no_start(self.index, str(exc)) from exc
        self._started = True

    def add_startup(self, op: Op, args: tuple) -> None:
        """Run ``op`` now and after every restart (module registrations)."""
        with self.lock:
            self._startup.append((op, args))
            if self._started:
                self._checked(op, args, None)

    def close(self, *, timeout: float = 10.0) -> None:
        """Stop the interpreter: wait up to ``timeout`` for the call in flight,
        then kill.  A call cut short raises :class:`ManagerClosedError`.

        What the caller in flight reads from is released only under the lock:
        the interpreter is first stopped through :meth:`_stop_in_flight`, which
        makes that caller return, and then terminated once it has."""
        self.closed = True  # new requests fail at once from here on
        deadline = time.monotonic() + timeout
        got = self.lock.acquire(timeout=timeout)
        helper = self.__dict__.pop("_helper", None)
        if helper is not None:
            helper.stop()
        # Calls sent before close() may still be in flight without the lock.
        stopped = not got or not self._drain(max(0.0, deadline - time.monotonic()))
        try:
            if stopped:
                self._stop_in_flight()
                got = got or self.lock.acquire(timeout=_CALLER_LEAVES)
            if got:
                self._terminate(kill=stopped)
            # else the caller still holds the lock; it terminates the interpreter itself
            # when it sees it gone (the process backend's _crashed).
        finally:
            if got:
                self.lock.release()

    def _stop_in_flight(self) -> None:
        """Make a call in flight end now (its caller raises ManagerClosedError),
        without closing anything that caller may be reading.  Called without the lock."""
        self._terminate(kill=True)

    @property
    def available(self) -> bool:
        """False while the interpreter is down (crashed, restarting or broken)."""
        return self.dead_reason is None and self.broken is None and not self.closed

    def _ensure_started_locked(self) -> None:
        if self._started:
            return
        if self.broken is not None:
            raise InterpreterStartError(self.broken)
        if self.start_failures:
            # Back off between failed starts: a broken environment must not spin a
            # restart loop.  Bounded, so a caller never waits long for a verdict.
            time.sleep(min(RESTART_BACKOFF * 2 ** (self.start_failures - 1), 2.0))
        try:
            if self.dead_reason is not None:
                self._launch_locked()
                self.restarts += 1
            self._ready_locked()
        except ManagerClosedError:
            raise
        except Exception as exc:
            self.start_failures += 1
            self.dead_reason = f"failed to start: {exc}"
            if self.start_failures >= MAX_START_FAILURES:
                self.broken = (f"interpreter {self.index} failed to start "
                               f"{self.start_failures} times in a row and will not be "
                               f"restarted again; last error: {exc}")
                raise InterpreterStartError(self.broken) from exc
            if isinstance(exc, InterpreterStartError):
                raise
            raise InterpreterStartError(
                f"interpreter {self.index} failed to start ({self.start_failures} time(s) "
                f"in a row): {exc}") from exc
        self.start_failures = 0
        self.dead_reason = None

    def revive_in_background(self) -> None:
        """Restart a dead interpreter now, so the next call finds it ready."""
        def revive():
            with self.lock:
                if not self.closed and not self._started:
                    try:
                        self._ensure_started_locked()
                    except Exception:
                        pass  # the next request reports it
            self._now_free()
        threading.Thread(target=revive, name=f"multipy-revive-{self.index}", daemon=True).start()

    # -- the hot path -------------------------------------------------------
    def request(self, op: Op, args: tuple = (), *, timeout: float | None = None,
                handles: tuple | None = None, materializes: int | None = None,
                recipe: tuple | None = None, resend: bool = True,
                unloads: int | None = None) -> Any:
        """Run one operation in the interpreter and return its value.

        Raises the interpreter's exception (rebuilt in the host), or
        :class:`InterpreterCrashedError` when the interpreter died.
        ``materializes`` names a replicated object the request uses there; its
        ``recipe`` is appended to ``args`` (as ``None`` when the interpreter
        already holds the object), decided under the lock so a restart in
        between cannot leave the interpreter without it; with a ``timeout``,
        the object is loaded first by a request of its own, so loading is
        never counted against the call's timeout.  When the interpreter
        turns out to have died before the request reached it, the request goes
        to its replacement if ``resend`` (False for requests naming objects of
        the dead one).  ``unloads`` names a replicated object the request drops
        there (``Op.UNLOAD``): it is marked not loaded in the same hold of the lock
        as the send (see :meth:`_forget_loaded`).

        A backend that keeps several requests in flight replaces this method with
        :meth:`_request_in_flight`: the lock is held only while the request is
        sent, and each caller waits for its own reply.
        """
        with self.lock:
            if self.closed:
                raise ManagerClosedError("the interpreter manager is closed")
            started = time.perf_counter()
            try:
                for attempt in _SENDS:
                    if not self._started:
                        self._ensure_started_locked()
                    try:
                        if (timeout is not None and materializes is not None
                                and materializes not in self.materialized
                                and op != Op.MATERIALIZE):
                            # Loading is not bounded by a call's timeout: load first.
                            self._checked(Op.MATERIALIZE, (materializes, recipe), None)
                            self.materialized.add(materializes)
                        full = args
                        if materializes is not None:
                            full = args + ((None if materializes in self.materialized else recipe),)
                        if unloads is not None:
                            self._forget_loaded(unloads)
                        value = self._checked(op, full, timeout, handles)
                    except RequestNotSent as not_sent:
                        if attempt == MAX_SENDS - 1 or not resend or self.closed:  # closed: its error says so
                            raise not_sent.error from None
                        continue
                    if materializes is not None:
                        self.materialized.add(materializes)
                    return value
            except BaseException:
                self.failures += 1
                raise
            finally:
                self.calls += 1  # _count, inlined (once per call)
                lat = self.latencies
                lat.append(time.perf_counter() - started)
                if len(lat) > 4096:
                    del lat[:2048]
        if self.on_free is not None:
            self._now_free()

    def _request_in_flight(self, op: Op, args: tuple = (), *, timeout: float | None = None,
                           handles: tuple | None = None, materializes: int | None = None,
                           recipe: tuple | None = None, resend: bool = True,
                           sent: tuple | None = None, unloads: int | None = None) -> Any:
        """:meth:`request` for a backend with several requests in flight: the lock
        only around the send.

        ``sent``: the first attempt was made by the extension's whole call
        (``_native.call_replicated``), which hands the rest over here:
        ``(started, since, materialized, ticket, waited)``, the call's start
        (``perf_counter``), ``since`` and ``materialized`` as read under the lock,
        ``ticket`` what :meth:`_send_call` would have returned (``None``: nothing
        was sent, ``waited`` is what taking the lock or sending raised), ``waited``
        what its wait said (an int of :class:`~multipy.transport.channel.Wait`, the
        exception it raised, or ``None``: not waited yet)."""
        started = _clock() if sent is None else sent[0]
        lock = self.lock
        since = None  # the last call id sent before this one (see _abandon)
        counted = self.counts_callers  # decided once: a restart may change it meanwhile
        if counted:
            in_calls.append(None)
        try:
            # A request the interpreter died before taking never ran: it goes to the
            # replacement, and to the next one while each dies before its turn.
            for attempt in _SENDS:
                try:
                    if sent is not None:  # the extension made this attempt (see above)
                        _, since, materialized, ticket, waited = sent
                        sent = None
                        if ticket is None:
                            raise waited
                    else:
                        with lock:  # not acquire() and try: a signal could land between them
                            if self.closed:
                                raise ManagerClosedError("the interpreter manager is closed")
                            if not attempt:
                                self.calls += 1  # counted under the lock: exact with many threads
                            if not self._started:
                                self._ensure_started_locked()
                            materialized = self.materialized  # this generation's
                            full = args
                            if materializes is not None:
                                if materializes not in materialized:
                                    if timeout is not None and op != Op.MATERIALIZE:
                                        # Loading is not bounded by a call's timeout: load first.
                                        self._checked(Op.MATERIALIZE, (materializes, recipe), None)
                                        materialized.add(materializes)
                                        full = args + (None,)
                                    else:
                                        # Every call carries the recipe until one has loaded it
                                        # (a call in flight may be loading it now).
                                        full = args + (recipe,)
                                else:
                                    full = args + (None,)
                            drop = drain(self.drops) if self.drops else ()
                            if unloads is not None:
                                self._forget_loaded(unloads)
                            since = self._next_call
                            try:
                                ticket = self._send_call(op, full, drop, timeout, handles)
                            except BaseException:
                                # Nothing or something was sent (a Ctrl-C as the send was
                                # entered or returned): dropping twice is harmless.
                                self.drops.extend(drop)
                                raise
                        hook = self.on_free  # _now_free, inlined (once per call)
                        if hook is not None:
                            hook()
                        waited = None
                    value, error = self._await_call(ticket, waited)
                except RequestNotSent as not_sent:
                    if attempt == MAX_SENDS - 1 or not resend or self.closed:  # closed: its error says so
                        raise not_sent.error from None
                    continue
                if error is not None:
                    raise rebuild_exception(error)
                if materializes is not None:
                    materialized.add(materializes)
                return value
        except BaseException:
            if since is not None:
                # Raised (e.g. Ctrl-C) anywhere between the send and the wait: a call
                # of this thread may still be counted as awaited.
                self._abandon(since)
            with self._tally:
                self.failures += 1
            raise
        finally:
            if counted:
                in_calls.pop()
            lat = self.latencies
            lat.append(_clock() - started)
            if len(lat) > 4096:
                del lat[:2048]

    def _forget_loaded(self, rid: int) -> None:
        """Mark replicated object ``rid`` not loaded here, under the lock, just before
        the request that unloads it is sent: every call sent after it carries the
        object's recipe (and loads it again if it runs after the unload), every call
        sent before it runs before it.  A fresh set, not a discard: a call sent
        before the unload adds its object to the set it was sent with when its reply
        comes, which must not mark ``rid`` loaded again after the unload."""
        self.materialized = self.materialized - {rid}

    def _count(self, started: float) -> None:
        self.calls += 1
        lat = self.latencies
        lat.append(time.perf_counter() - started)
        if len(lat) > 4096:
            del lat[:2048]

    def _checked(self, op: Op, args: tuple, timeout: float | None, handles=None) -> Any:
        drop = drain(self.drops) if self.drops else ()
        try:
            value, error = self._roundtrip(op, args, drop, timeout, handles)
        except BaseException:
            # Nothing or something was sent (or a Ctrl-C came while waiting for the
            # reply): dropping twice is harmless.
            self.drops.extend(drop)
            raise
        if error is not None:
            raise rebuild_exception(error)
        return value

    # -- posting: a request whose reply no host thread waits for ------------------
    def post(self, op: Op, args: tuple = (), *, completions, done: Callable[[Any, BaseException | None], None],
             timeout: float | None = None, handles: tuple | None = None,
             materializes: int | None = None, recipe: tuple | None = None):
        """Send one request and return at once (futures, ``acall``, batches);
        returns a handle for :meth:`cancel_posted` (or ``None``).

        The caller holds ``self.lock``, taken without blocking; from here the
        request owns it.  A backend that queues requests in the interpreter
        (:meth:`_pipelines`) releases it as soon as the request is sent, so
        the next one can follow it (up to :attr:`posted_depth`, the
        dispatcher's count); otherwise the request holds it until the call
        ends.  ``done(value, error)`` runs once on ``completions``' thread (the
        :class:`~multipy.backends.completions.Completions` of the manager),
        after the lock was released.  A request found never taken by an
        interpreter that died ends with ``error`` a :class:`RequestNotSent`
        (its sender may send it again).
        ``timeout`` is enforced by a timer on that thread, the backend's way
        (``_expire``).  ``on_free`` is not called when a posted request ends:
        ``done`` is where its sender learns the interpreter is free.  When nothing could be sent, the lock is released and
        the error raised here instead: :class:`RequestNotSent` when the
        interpreter was found dead (the request may go to another one).
        """
        try:
            if self.closed or not self._started:
                raise (ManagerClosedError("the interpreter manager is closed") if self.closed
                       else RequestNotSent(InterpreterCrashedError(
                           f"interpreter {self.index} is restarting", index=self.index)))
            if (timeout is not None and materializes is not None
                    and materializes not in self.materialized and op != Op.MATERIALIZE):
                # Loading is not bounded by a call's timeout (as in request): the object is
                # loaded first by a posted request of its own, then the call is sent from
                # the completion thread, the interpreter still held.
                # (It holds the lock until the call is sent: nothing else may load it meanwhile.)
                load = _PostedCall(self, done, materializes, None)
                load.then = lambda: self._send_posted(op, args + (None,), completions, done,
                                                      timeout, handles, materializes, load.started)
                self._send_posted(Op.MATERIALIZE, (materializes, recipe), completions, done, None,
                                  None, materializes, None, call=load)
                return None
            if materializes is not None:
                args = args + ((None if materializes in self.materialized else recipe),)
            return self._send_posted(op, args, completions, done, timeout, handles, materializes,
                                     None)
        except BaseException as exc:
            if not hasattr(exc, "multipy_sent"):  # nothing sent, the lock not given back yet
                exc.multipy_sent = False
                self.lock.release()
            raise

    def let_go_after(self, error: BaseException) -> bool:
        """After :meth:`post` raised ``error``: whether the request was sent anyway
        (then it ends through its ``done``, as any sent call: its sender must not
        end it as well); if not, the lock is given back here unless post did.

        CPython raises a Ctrl-C (``KeyboardInterrupt``) right after any call
        returns and as a Python function is entered: as :meth:`post` is entered,
        it can do nothing about the lock its caller handed it; from there on, it
        marks what it raises."""
        sent = getattr(error, "multipy_sent", None)
        if sent is None:
            error.multipy_sent = False
            self.lock.release()
        return bool(sent)

    def _send_posted(self, op: Op, full: tuple, completions, done, timeout, handles, materializes,
                     started: float | None, call: "_PostedCall | None" = None):
        """The sending half of :meth:`post` (the lock held): on failure the lock is
        released and the error raised.  A call queued in the interpreter
        (:meth:`_pipelines`) releases the lock once sent.  Returns what the
        backend's ``_post`` returned (for :meth:`cancel_posted`)."""
        drop = ()
        try:
            if call is None:
                call = _PostedCall(self, done, materializes, timeout)
                if started is not None:
                    call.started = started  # the call's latency counts from its load
                call.holds = not self._pipelines()
            # A call queued behind others may be dropped unrun at its deadline: it must
            # not carry the releases of other objects (they would be lost with it).
            if self.drops and (call.holds or timeout is None):
                drop = drain(self.drops)
            # Counted before the send (its completion may run before _post returns);
            # `counted` first: no signal is handled between it and the count.
            call.counted = True
            with self._tally:
                self.posted_in_flight += 1
            if timeout is not None and type(self)._post is not Worker._post:
                # Armed before the send, so that nothing is left to arm once it is sent
                # (the generic _post's round trip enforces the timeout itself).
                call.completions = completions
                call.timer = completions.call_at(time.monotonic() + timeout, call.expire)
            posted = self._post(op, full, drop, timeout, handles, completions, call.finish)
        except BaseException as exc:
            posted = getattr(exc, "multipy_posted", None)
            if posted is not None:
                # Sent by the backend, then interrupted inside _post (a Ctrl-C as its
                # send returned): it ends through call.finish, as below.
                with call.lock:
                    call.posted = posted
                completions.call_soon(call.replay)  # (a no-op unless a completion fired early)
                if not call.holds:
                    self.lock.release()
                    completions.call_soon(self._now_free)
                exc.multipy_sent = True
                raise
            if call is not None:
                # Its timer, and a completion it registered before failing, must not run.
                call.finished = True
                if call.timer is not None:
                    call.timer[2] = None  # Completions.cancel: nothing kept until the deadline
                if call.counted:
                    call.counted = False
                    with self._tally:
                        self.posted_in_flight -= 1
            self.drops.extend(drop)  # nothing or something was sent: dropping twice is harmless
            self.failures += 1
            exc.multipy_sent = False  # (the lock given back: see post)
            self.lock.release()
            self._now_free()
            raise
        # Sent: the call ends once, through call.finish, whatever is raised below (a
        # Ctrl-C, which CPython raises right after any call returns; an error of the
        # on_free hook, which sends the next request).
        released = False
        try:
            with call.lock:  # a completion may already have fired: see _PostedCall.finish
                call.posted = posted
                early = call.early
            if early is not None:
                completions.call_soon(call.replay)
            if not call.holds:
                released = True  # (no signal is handled between here and the release)
                self.lock.release()  # the next request may follow it into the interpreter
                hook = self.on_free  # _now_free, written out
                if hook is not None:
                    hook()
        except BaseException as exc:
            # What is left is done now, and the exception goes on marked as sent: its
            # sender must not end the call as well (see let_go_after).
            with call.lock:
                call.posted = posted
            completions.call_soon(call.replay)  # (a no-op unless a completion fired early)
            if not call.holds:
                if not released:
                    self.lock.release()
                completions.call_soon(self._now_free)
            exc.multipy_sent = True
            raise
        return posted

    def _post(self, op: Op, args: tuple, drop: tuple, timeout: float | None, handles,
              completions, finish: Callable[[str], None]):
        """Send one request without waiting for its reply, and arrange for
        ``finish(event)`` to run on the completion thread once the reply can be
        read without blocking: ``completions.watch(reply_fd, finish)``, or
        ``wake = completions.expect(finish)`` and ``wake()`` from the thread that
        learns of the reply.  Returns what :meth:`_collect` needs.

        The generic version, for a backend that only has ``_roundtrip``: the
        round trip runs on one helper thread per interpreter (not per call).
        """
        fallback = _Fallback()
        wake = completions.expect(finish)

        def run() -> None:
            try:
                fallback.value = self._roundtrip(op, args, drop, timeout, handles)
            except BaseException as exc:  # delivered to the caller by _collect
                fallback.error = exc
            wake()

        helper = self.__dict__.get("_helper")
        if helper is None:
            helper = self._helper = _Helper(f"multipy-post-{self.index}")
        helper.run(run)
        return fallback

    def _collect(self, posted) -> tuple:
        """The reply of a posted request, ``(value, RemoteException | None)``;
        called once :meth:`_post`'s ``finish`` ran.  Raises as ``_roundtrip`` does."""
        if posted.error is not None:
            raise posted.error
        return posted.value

    def _expire(self, posted, timeout: float) -> BaseException:
        """A posted request ran past ``timeout``: stop it the way ``_roundtrip``
        does on a timeout (kill, abandon or interrupt) and return the error (a
        request still queued in the interpreter may be dropped unrun instead).
        A float means "cannot tell yet, ask again in that many seconds".

        Runs on the completion thread, so it must never wait: a backend that
        needs time to stop the call (an interrupt given a grace period) returns
        :data:`PENDING` and has ``finish`` run once it knows, for :meth:`_collect`
        to raise the error then."""
        raise NotImplementedError

    def _now_free(self) -> None:
        hook = self.on_free
        if hook is not None:
            hook()

    def mark_dead(self, reason: str) -> None:
        """Record that the interpreter died (caller holds the lock) and restart it
        in the background; requests queued behind the lock wait for the restart."""
        self.dead_reason = reason
        self._started = False
        self.materialized = set()
        if not self.closed:
            self.revive_in_background()

    def adopt_movable(self, payload):
        """Make a movable just pickled out of this interpreter independent of it.

        Returns ``(payload, fd)``: the payload to load it from anywhere, and a
        descriptor the host keeps open as long as the movable lives (``None``
        when nothing needs one).  Backends whose movables keep their tensors in
        memory the interpreter owns override this; the default has nothing to do.
        """
        return payload, None

    def drop(self, item) -> None:
        """Queue the release of an object in this interpreter (any thread)."""
        self.drops.append(item)


class Backend:
    """Creates workers of one kind.  ``name`` is what ``manager.backend`` says."""

    kind: BackendKind

    def create_worker(self, config: WorkerConfig) -> Worker:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend shares between its workers."""


def drain(queue: collections.deque) -> tuple:
    """Take everything from ``queue`` (appended to from any thread).

    A Ctrl-C takes nothing: CPython raises it right after a call returns (and at
    a loop's jump back), so ``out.append(queue.popleft())`` in a loop could take
    items and drop them with the exception.  Here ``popleft`` runs from C, inside
    the list's ``+=`` (an operator, not a call: no signal handler runs there),
    and nothing after it calls anything before the items are returned.

    >>> q = collections.deque([1, 2]); drain(q), q
    ((1, 2), deque([]))
    """
    out = []
    try:
        out += iter(queue.popleft, _NOTHING)
    except IndexError:  # emptied (its last popleft)
        pass
    return (*out,)


_NOTHING = object()  # never queued: the sentinel of drain's iter


def rebuild_exception(error: RemoteException) -> BaseException:
    """The host-side exception for an interpreter-side one.

    The original type when it can be unpickled here (with the remote traceback
    as ``__cause__``), else :class:`InterpreterError`.
    """
    exc: BaseException | None = None
    if error.pickled is not None:
        try:
            exc = pickle.loads(error.pickled)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = InterpreterError(error.type_name, error.message, error.traceback)
    elif not isinstance(exc, Exception):
        # SystemExit, KeyboardInterrupt, GeneratorExit raised by the model: raised as
        # themselves here they would end the host program or pass for its own Ctrl-C.
        exc = InterpreterError(
            error.type_name, f"{error.message} (raised by the code in the interpreter; the "
            "interpreter keeps serving. It is not raised as itself in the host, where it "
            "would stop the program or look like its own interrupt)", error.traceback)
    exc.__cause__ = RemoteTraceback(error.traceback)
    return exc


def describe_exit(index: int, pid: int | None, exitcode: int | None, while_: str) -> InterpreterCrashedError:
    """An :class:`InterpreterCrashedError` naming the signal and the likely cause."""
    import signal as _signal

    if exitcode is None:
        how, cause = "stopped answering", "its process is gone but its exit status is unknown"
    elif exitcode < 0:
        try:
            name = _signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        how = f"was killed by {name}({exitcode})"
        cause = _SIGNAL_CAUSES.get(name, "a signal sent to the process")
    else:
        how = f"exited with code {exitcode}"
        cause = "the code it ran called os._exit() or sys.exit(), or the interpreter aborted"
    return InterpreterCrashedError(
        f"interpreter {index} (pid {pid}) {how} {while_}; likely cause: {cause}. "
        "It will be restarted for later calls; objects created in it are gone.",
        index=index, pid=pid, exitcode=exitcode)


_SIGNAL_CAUSES = {
    "SIGSEGV": "a segmentation fault in native code (an extension bug or an out-of-bounds access)",
    "SIGBUS": "a bus error: memory-mapped data vanished or /dev/shm is full",
    "SIGABRT": "an abort (os.abort(), a failed C assertion or a fatal error in an extension)",
    "SIGKILL": "the kernel's OOM killer (check `dmesg`) or an external `kill -9`, or a call timeout",
    "SIGTERM": "an external request to terminate",
    "SIGFPE": "a fatal arithmetic error in native code",
    "SIGILL": "an illegal instruction (a binary built for another CPU)",
}


def no_start(index: int, why: str) -> InterpreterStartError:
    return InterpreterStartError(f"interpreter {index} failed to start: {why}")



class _PostedCall:
    """A posted request until its reply is read.  ``holds``: it holds the worker's
    lock until then (one posted request at a time on that interpreter)."""

    __slots__ = ("worker", "done", "materializes", "timeout", "posted", "timer", "finished",
                 "started", "lock", "early", "then", "holds", "completions", "counted",
                 "materialized")

    def __init__(self, worker: Worker, done, materializes, timeout) -> None:
        self.worker = worker
        self.done = done
        self.materializes = materializes
        # The replicated ids loaded in the generation it is sent to (made under the
        # worker's lock): a reply read after a restart must not mark the object
        # loaded in the replacement, which would then get calls without its recipe.
        self.materialized = worker.materialized
        self.timeout = timeout
        self.posted = None
        self.timer = None
        self.finished = False
        self.started = time.perf_counter()
        # A fast reply can fire before post() has stored what _post returned: the
        # event is kept in `early` and post() replays it.  (Its own lock: one shared
        # with the worker's counters made the sender wait for the completion thread
        # more often, which then found the reply before post() had stored its handle.)
        self.lock = threading.Lock()
        self.early = None
        # A first load's: sends the call itself once the load succeeded (lock still held).
        self.then = None
        self.holds = True
        self.completions = None  # where its deadline's timer runs
        self.counted = False     # in its worker's posted_in_flight

    def finish(self, event: str) -> None:
        """On the completion thread: read the reply, free the interpreter, tell the caller."""
        if self.finished:
            return
        with self.lock:
            if self.posted is None:
                self.early = event
                return
        worker = self.worker
        if event == _CLOSED:
            worker._abandon_posted(self.posted)
            self._end(None, ManagerClosedError(
                f"the manager was closed while interpreter {worker.index} was running this call"))
            return
        try:
            outcome = worker._collect(self.posted)
            if outcome is PENDING:
                return
            value, error = outcome
            if error is not None:
                raise rebuild_exception(error)
            if self.materializes is not None:
                self.materialized.add(self.materializes)
        except BaseException as exc:
            self._end(None, exc)
        else:
            self._end(value, None)

    def replay(self) -> None:
        """On the completion thread: run the completion that fired before post()
        stored what _post returned (``early``), once; nothing otherwise."""
        with self.lock:
            event, self.early = self.early, None
        if event is not None:
            self.finish(event)

    def expire(self) -> None:
        """On the completion thread, at the deadline: stop the call."""
        if self.finished:
            return
        if self.posted is None:  # armed before the send, which has not stored its handle yet
            self.timer = self.completions.call_at(time.monotonic() + 0.005, self.expire)
            return
        try:
            error = self.worker._expire(self.posted, self.timeout)
        except BaseException as exc:
            error = exc
        self.timer = None
        if error is PENDING:
            return  # the backend is stopping the call: finish() ends it, through _collect
        if type(error) is float:  # the backend cannot tell yet: look again then
            self.timer = self.completions.call_at(time.monotonic() + error, self.expire)
            return
        self._end(None, error)

    def _end(self, value, error) -> None:
        self.finished = True
        if self.timer is not None:
            self.timer[2] = None  # Completions.cancel: the deadline no longer applies
            self.timer = None
        worker = self.worker
        if self.counted:
            self.counted = False
            with worker._tally:
                worker.posted_in_flight -= 1
        if error is None and self.then is not None:  # loaded: now the call, under its timeout
            then, self.then, self.posted = self.then, None, None
            try:
                then()
            except BaseException as exc:
                # Sent anyway (a Ctrl-C or an on_free error after the send): the call
                # ends once, through its own finish.  Not sent: the lock given back
                # (by _send_posted, or here when it raised before that ran).  The
                # interpreter found dead after the load (RequestNotSent): the call
                # never ran, and its sender may send it to the replacement.
                if worker.let_go_after(exc):
                    raise
                self.done(None, exc)
            return
        try:
            if error is not None:
                with worker._tally:
                    worker.failures += 1
            worker._count(self.started)
        except Exception as exc:  # (no memory left to count it): the call ends with that
            if error is None:     # error, the interpreter given back all the same (an
                value, error = None, exc  # error of its own comes first)
                try:
                    with worker._tally:
                        worker.failures += 1
                except Exception:  # noqa: BLE001 (the caller gets the first error)
                    pass
        self.posted = None
        if self.holds:
            worker.lock.release()
        # Let go of the caller's done before calling it: what it holds (the
        # dispatcher's request, whose ``sent`` names this call) must not keep a
        # reference cycle, and the result in it, alive until a collection.
        done, self.done = self.done, None
        done(value, error)  # the dispatcher sends the next request from here

class _Fallback:
    """The outcome of a posted round trip run by :class:`_Helper`."""

    __slots__ = ("value", "error")

    def __init__(self) -> None:
        self.value = None
        self.error = None


class _Helper:
    """One thread per interpreter that runs posted round trips for a backend
    without a ``_post`` of its own; it exits when its worker is collected."""

    def __init__(self, name: str) -> None:
        import queue

        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=_helper_loop, args=(self._jobs,), name=name,
                                        daemon=True)
        self._thread.start()

    def run(self, job) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        self._jobs.put(None)

    __del__ = stop


def _helper_loop(jobs) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        job()
        job = None
