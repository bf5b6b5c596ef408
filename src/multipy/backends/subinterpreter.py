"""The ``subinterpreter`` backend: one CPython own-GIL subinterpreter per interpreter.

::

    caller thread (host)                driver thread (host)     subinterpreter (own GIL)
    --------------------                --------------------     ------------------------
                                        create(); exec(boot)
                                        exec("_multipy_loop()") ─▶ loop: read request pipe
    request(op, args)
      pickle (protocol 5) ─── request pipe ──────────────────────▶ unpickle, state.handle
      read reply pipe     ◀── reply pipe ───────────────────────── pickle, write
      unpickle (big buffers from the arena)
                                        ◀── WantBuffers/WantArena: re-enter with
                                            exec(loop, shared=...)  (big arguments,
                                            big results only)
    close: end-of-file on the request pipe ─────────────────────▶ loop returns
                                        destroy()

Where the C extension runs, the request and reply pipes above are the
shared-memory call channel of :mod:`multipy.transport.channel` instead (an
anonymous mapping shared into the subinterpreter as a ``memoryview``): each
side spins briefly, then sleeps in ``FUTEX_WAIT`` with its GIL released, and
the pipes carry only what does not fit, the bell of posted calls and the end
of the loop.  There several calls are in flight at once: the worker's lock is
held only to post a request, each caller waits on its own reply slot, and the
subinterpreter serves the requests in order.  The common call (a replicated
object, scalar arguments and result) crosses in the codec's binary forms, not
pickled.  Without the extension, one call at a time: each side spins briefly on
its pipe, then sleeps in ``poll`` (:class:`~multipy.transport.frames.Waiter`):
two pipe wake-ups a call.

Each subinterpreter runs on its own OS thread (the *driver*), which enters it
once with ``_interpreters.exec`` and stays there, waiting for requests with
the subinterpreter's GIL released while the caller waits with the main GIL
released.  While N driver threads run code in N subinterpreters, none of them
holds the main GIL: pure-Python work runs in parallel inside one process.
The driver thread only comes back to the host (``exec`` returns) to pick up
cross-interpreter buffer views of large arguments or a bigger result arena.

What runs here and what does not:

* **Pure Python only.**  torch and numpy cannot be imported in an isolated
  subinterpreter today (their C extensions are single-phase); loading a
  torch.package archive fails at once with
  :class:`~multipy.errors.BackendUnavailableError` saying so, and
  ``import torch`` inside raises ``ModuleNotFoundError`` with the reason.
  Use ``backend="process"`` for torch models.
* **No crash isolation.**  A segfault or ``os._exit`` in a subinterpreter ends
  the whole host process: crash isolation is the ``process`` backend's alone.
* **Timeouts interrupt, they do not kill.**  A call past its timeout gets
  :class:`~multipy.backends._subinterp_main.CallInterrupted` raised inside it (between
  bytecodes) and the caller a :class:`~multipy.errors.CallTimeoutError`; the
  interpreter and its objects are kept.  Code stuck in native code that does
  not return within a grace second is abandoned: a new subinterpreter serves
  later calls and the old one is destroyed when its code returns.
* **Copies.**  See :mod:`multipy.transport.subinterp_wire`: large ``memoryview``
  arguments cross with no copy, ``bytes``/``bytearray`` arguments with one,
  large results with two; small values are pickled through the pipe.
* stdout/stderr of the subinterpreter go straight to the process's file
  descriptors 1 and 2 (pytest's ``capfd`` sees them, ``capsys`` does not).

Needs CPython 3.13+ (``_interpreters``; 3.14 also offers it under
``concurrent.interpreters``).  3.12 and older are unsupported.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
import time
import weakref

from ..errors import (CallTimeoutError, InterpreterCrashedError, ManagerClosedError, MultipyError,
                      OwnershipError, TransportError)
from ..transport import channel as _channel
from ..transport.codec import FAST_VALUE, Decoder, Encoder
from ..transport.frames import FrameReader, Waiter, block_readable
from ..transport.messages import Handle, Op
from ..transport import subinterp_wire as wire
from .base import PENDING, Backend, BackendKind, RequestNotSent, Worker, WorkerConfig, no_start
from .process import PIPELINE_DEPTH
from .completions import CLOSED, READY, Completions

INTERRUPT_GRACE = 1.0     # seconds an interrupted call gets to unwind
_NOTHING = object()       # _Call.frame: no reply taken off the channel yet
_TIMEOUT = _channel.Wait.TIMEOUT
START_ARENA = 1 << 20     # the result arena grows on demand
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_BOOT = """\
import sys
_index, _path, _fds, _root, _spin = _multipy_boot
sys.path[:] = list(_path)
if _root not in sys.path:
    sys.path.append(_root)
import _interpreters  # must be loaded before buffer views can be shared in
from multipy.backends import _subinterp_main
_subinterp_main.start(_index, _fds, _spin)
_multipy_loop = _subinterp_main.loop
_multipy_shutdown = _subinterp_main.shutdown
del _index, _path, _fds, _root, _spin, _multipy_boot
"""
_LOOP = "_multipy_loop()"
_SHUTDOWN = "_multipy_shutdown()"


def _interpreters():
    import _interpreters as module  # 3.13+; absent on 3.12 and older

    return module


class _Driver:
    """One subinterpreter and the host thread that runs it.

    File descriptors: the host ends (``req_w``, ``intr_w``, ``rep_r``; with the
    channel ``bell_r`` and ``alive_r``) are
    closed by :meth:`stop` when no caller uses them; the subinterpreter's ends
    by the driver thread once the loop has returned.
    """

    def __init__(self, config: WorkerConfig) -> None:
        self.index = config.index
        req_r, self.req_w = os.pipe()
        self.rep_r, rep_w = os.pipe()
        self.waiter = Waiter(self.rep_r, config.spin)
        intr_r, self.intr_w = os.pipe()
        # The call channel (where the C extension runs): requests and replies in
        # shared memory, the pipes only for what does not fit and for liveness.
        self.end: _channel.HostEnd | None = None
        self.memory = None
        self.answered = 0      # the last call number whose reply was taken (a spin hint)
        self._spills: dict = {}  # call number -> a spilled reply read by another caller
        self._spill_lock = threading.Lock()
        bell_w = -1
        if _channel.NATIVE:
            import mmap

            # One reply slot per call in flight: as many as the process backend's.
            slots = _channel.SLOTS
            self.memory = mmap.mmap(-1, _channel.size(_channel.RING_BYTES, slots,
                                                      _channel.SLOT_BYTES))
            _channel.prepare(self.memory, ring_bytes=_channel.RING_BYTES, slots=slots,
                             slot_bytes=_channel.SLOT_BYTES)
            bell_r, bell_w = os.pipe()  # rung after a posted call's reply
            os.set_blocking(bell_r, False)
            # Liveness for callers asleep on the channel: end-of-file once the loop
            # ended (the reply pipe will not do: it is readable whenever a spilled
            # reply of another call in flight is on its way).
            self.alive_r, self._alive_w = os.pipe()
            # Spilled replies can queue in the reply pipe (each caller reads them in
            # order, under _spill_lock): a reader that keeps what one read brought in
            # beyond a frame, not read_frame's one-frame-at-a-time read.
            self._reader = FrameReader(self.rep_r)
            self.end = _channel.HostEnd(_channel.Channel(self.memory), self.req_w,
                                        self._reader.read, self.alive_r,
                                        config.spin, bell_r, self.memory)
            self.end.reply_fd, self.end.drain = self.rep_r, self.drain_spills
        self._sub_fds = (req_r, rep_w, intr_r, bell_w)
        self._boot = (config.index, tuple(config.sys_path), self._sub_fds, _ROOT, config.spin)
        self.arena = bytearray(START_ARENA)
        # Call number -> the shared buffers of its big arguments, until the loop takes
        # them (WantBuffers names the call): never waited for by a sender, which may
        # be the completion thread the subinterpreter waits on.
        self.pending_in: dict = {}
        self.arena_free = threading.Event()  # set after the host read a reply's arena buffers
        self.failure: str | None = None
        self.started = threading.Event()
        self.finished = threading.Event()
        self._mutex = threading.Lock()
        self._idle = threading.Condition(self._mutex)
        self._busy = 0            # calls in flight (entered, not yet left)
        self._waiting = 0         # threads in wait_idle (notify only then)
        self._stopping = False
        self._host_open = True
        self.abandoned: str | None = None  # why the worker gave this subinterpreter up
        # Posted calls on the channel (several in flight, queued in the ring) share
        # the bell: one watch at a time hands each reply to its call (its hand-over
        # set by the worker: SubinterpreterWorker._hand_over).
        self.bells = None if self.end is None else _channel.BellWatch(
            self.end, lambda posted: posted.call.slot, SubinterpreterWorker._hand_over)
        # call number -> _Posted, until its reply is taken (the bell watch's, on the channel)
        self.posted: dict = {} if self.bells is None else self.bells.posted
        self.posting = 0           # posts between want_bell() and their entry in `posted`
        self.watch_lock = threading.Lock() if self.bells is None else self.bells.lock
        # Blocking calls dropped unrun at their deadline (skipped while queued behind
        # others): their skip replies are taken, unread, by the next send.
        self.left: list = []
        self.thread = threading.Thread(target=self._run, name=f"multipy-subinterpreter-{self.index}",
                                       daemon=True)
        _watch_exit()
        _live.add(self)
        self.thread.start()

    # -- the driver thread --------------------------------------------------
    def _run(self) -> None:
        interpreters = _interpreters()
        iid = None
        try:
            iid = interpreters.create()  # the "isolated" config: its own GIL
            excinfo = interpreters.exec(iid, _BOOT, {"_multipy_boot": self._boot})
            if excinfo is not None:
                self.failure = _describe(excinfo)
                return
            self.started.set()
            shared = {"_multipy_arena": memoryview(self.arena)}
            if self.memory is not None:
                shared["_multipy_channel"] = memoryview(self.memory)
            while True:
                excinfo = interpreters.exec(iid, _LOOP, shared)
                if excinfo is None:
                    break  # the host closed the request pipe
                name = excinfo.type.__name__
                if name == "WantBuffers":
                    shared = {"_multipy_in": self.pending_in.pop(int(excinfo.msg), None)}
                elif name == "WantArena":
                    if not self._arena_read():
                        break  # stopping: nobody reads replies any more
                    need = int(excinfo.msg)
                    if need > len(self.arena):
                        self.arena = bytearray(max(need, 2 * len(self.arena)))
                    shared = {"_multipy_arena": memoryview(self.arena)}
                else:
                    self.failure = _describe(excinfo)
                    break
        except BaseException as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
        finally:
            req_r, rep_w, intr_r, bell_w = self._sub_fds
            _close(rep_w)  # a caller waiting on the reply pipe sees end-of-file
            if self.end is not None:
                _close(self._alive_w)  # and one asleep on the channel
            _close(req_r)
            if bell_w >= 0:
                _close(bell_w)  # and a posted call's completion, end-of-file on the bell
            if iid is not None:
                try:
                    # The watchdog thread inside still selects on intr_r: stop it
                    # before that descriptor is closed (and its number reused).
                    interpreters.exec(iid, _SHUTDOWN)
                    _close(intr_r)
                    interpreters.destroy(iid)
                except Exception as exc:
                    print(f"multipy: subinterpreter {self.index} could not be destroyed: {exc}",
                          file=sys.stderr)
            else:
                _close(intr_r)
            self.started.set()
            self.finished.set()
            with self._mutex:
                self._idle.notify_all()  # waiters (wait_idle) look again
            _live.discard(self)

    def _arena_read(self) -> bool:
        """Wait until the host read the buffers of the last reply placed in the arena
        (its first byte cleared); False when the driver stops first."""
        while True:
            self.arena_free.clear()
            if self._stopping:
                return False
            if not self.arena[0]:
                return True
            self.arena_free.wait()

    def arena_read(self, arena: bytearray) -> None:
        """The host copied the buffers of a reply out of ``arena``: it may be reused."""
        arena[0] = 0
        self.arena_free.set()

    # -- used by the worker ---------------------------------------------------
    def enter(self) -> None:
        """A call goes in flight (each :meth:`enter` is matched by one :meth:`leave`)."""
        with self._mutex:
            if self._stopping:  # only closing the manager stops a driver still in use
                raise ManagerClosedError(
                    f"the manager was closed before interpreter {self.index} got this call")
            self._busy += 1

    def leave(self) -> None:
        with self._mutex:
            self._busy -= 1
            if not self._busy:
                if self._waiting:
                    self._idle.notify_all()
                if self._stopping:
                    self._close_host_ends()

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for every call in flight to leave."""
        with self._idle:
            self._waiting += 1
            try:
                return self._idle.wait_for(lambda: not self._busy, timeout)
            finally:
                self._waiting -= 1

    # -- the call channel: several calls in flight, each reply in a slot of its own --------
    def next_frame(self, call: "_Call", timeout: float | None):
        """The reply of ``call`` (bytes), waiting for it; ``None`` when the loop ended
        (or the channel closed) first; ``Wait.TIMEOUT``.  Only the caller next in line
        spins (see HostEnd.wait)."""
        if self.end.wait(call.slot, timeout, call.seq == self.answered + 1) == _TIMEOUT:
            return _TIMEOUT
        return self.take_frame(call)  # None after DEAD or CLOSED, unless the reply came first

    def take_frame(self, call: "_Call"):
        """The reply of ``call`` if it is there (bytes), else ``None``."""
        got = self.end.take(call.slot)
        if got is None:
            return None
        if call.seq > self.answered:
            self.answered = call.seq
        tag, payload = got
        return self._spilled(call.seq) if tag & _channel.SPILLED else payload

    def _spilled(self, seq: int):
        """The spilled reply of call ``seq`` from the reply pipe.  Spilled replies are
        written in call order, and each is announced in its slot only once the ones
        before it were written: a caller reading another call's reply first keeps it
        for that call's caller."""
        with self._spill_lock:
            return self.end.spilled(seq, self._spills, _answers)

    def take_left(self) -> None:
        """Take and discard the replies that came for blocking calls dropped unrun
        at their deadline (``left``, see ``SubinterpreterWorker._timed_out``):
        their reply slots are free again.  Before a send (under the worker lock),
        and while a send waits for a slot."""
        end = self.end
        with self.watch_lock:
            left = self.left
            i = 0
            while i < len(left):
                call = left[i]
                try:
                    there = end.ready(call.slot)
                except ValueError:  # detached: the loop ended, the slots with it
                    return
                if not there:
                    i += 1
                    continue
                # Out of the list before the slot is freed: a slot taken twice could
                # take the reply of the next call given that slot.
                del left[i]
                self.take_frame(call)

    def drain_spills(self) -> bool:
        """Read the spilled replies waiting in the reply pipe, kept for their callers
        (``HostEnd.drain``: a send waiting for the subinterpreter runs it, since the
        subinterpreter, blocked writing one, takes no request until it is read);
        False at end-of-file (the loop ended)."""
        with self._spill_lock:
            while self._reader.buffered or block_readable(self.waiter.poller, 0):
                frame = self.end.read_spilled()
                if frame is None:
                    return False
                self._spills[_answers(frame)] = frame
        return True

    def interrupt(self, seq: int) -> None:
        try:
            os.write(self.intr_w, wire.SEQ.pack(seq))
        except OSError:
            pass

    def stop(self, *, wait: float) -> None:
        """Close the request pipe (the loop returns, the interpreter is
        destroyed); interrupt a call still running and those queued behind it,
        and wake every caller waiting on the channel.  Idempotent."""
        with self._mutex:
            if self._host_open and self._busy:
                self.interrupt(0)
                if self.end is not None:
                    self.end.stop()
            self._stopping = True
            self.arena_free.set()  # a driver thread waiting for the arena stops waiting
            if not self._busy:
                self._close_host_ends()
        if wait:
            self.finished.wait(wait)

    def _close_host_ends(self) -> None:
        if self._host_open:
            self._host_open = False
            end = self.end
            if end is not None:
                end.close()  # the loop waiting on the channel returns at once
                bell, end.bell_r = end.bell_r, -1
                _close(bell)
                _close(self.alive_r)
            for fd in (self.req_w, self.intr_w, self.rep_r):
                _close(fd)


def _answers(frame) -> int:
    """The call number a reply frame answers."""
    return wire.REPLY.unpack_from(frame)[1]


def _describe(excinfo) -> str:
    """The text of an exception that escaped ``_interpreters.exec``."""
    return (getattr(excinfo, "errdisplay", None) or getattr(excinfo, "formatted", None)
            or str(excinfo))


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class SubinterpreterWorker(Worker):
    """One interpreter as an own-GIL subinterpreter of this process.

    On the call channel several calls are in flight at once (as on the process
    backend): the worker's lock is held only while a request is sent, and each
    caller waits for the reply in its own slot while the subinterpreter serves
    the requests in order.  On the pipes, one call at a time.
    """

    kind = BackendKind.SUBINTERPRETER

    def __init__(self, config: WorkerConfig) -> None:
        super().__init__(config)
        self._driver: _Driver | None = None
        self._seq = 0
        self._handle_of = None
        self._dumpers: dict = {}  # Obj type (or None) -> wire.Dumper with its reducer
        self._encoder = Encoder(None)  # the binary forms of the common call
        self._decoder = Decoder(None)
        self._swap = threading.Lock()  # gives a driver up once, from any caller's thread
        self._unawaited: dict = {}  # thread ident -> its call sent but not yet awaited
        if _channel.NATIVE:
            self.request = self._request_in_flight  # see Worker._request_in_flight

    def _launch(self) -> None:
        self._terminate(kill=True)
        self._driver = _Driver(self.config)
        self.pid = None

    def _wait_ready(self) -> None:
        driver = self._driver
        if not driver.started.wait(self.config.start_timeout):
            raise no_start(self.index, f"the subinterpreter did not start within "
                                       f"{self.config.start_timeout:g} s")
        if driver.failure is not None:
            raise no_start(self.index, f"its start-up code failed:\n{driver.failure}")
        self._finish(self._send(driver, Op.PING, (), (), None), self.config.start_timeout)

    def _roundtrip(self, op, args, drop, timeout, handles):
        return self._finish(self._send(self._running(), op, args, drop, handles,
                                       timeout is not None), timeout)

    def _send_call(self, op, args, drop, timeout, handles):
        try:
            driver = self._running()
        except InterpreterCrashedError as exc:  # given up by a caller that has not restarted it yet
            raise RequestNotSent(exc) from None
        call = self._send(driver, op, args, drop, handles, timeout is not None)
        self._unawaited[threading.get_ident()] = call
        return call, timeout

    def _await_call(self, ticket, waited=None):
        call, timeout = ticket
        del self._unawaited[threading.get_ident()]
        return self._finish(call, timeout)

    def _abandon(self, since: int) -> None:
        # Worker._request_in_flight: this thread left by an exception.  A call it sent
        # but never waited for (a Ctrl-C in between) would hold its reply slot and the
        # subinterpreter for good: it is given up, as when a caller leaves its wait.
        call = self._unawaited.pop(threading.get_ident(), None)
        if call is not None:
            self._give_up(call.driver, "interrupted")
            call.driver.leave()

    def _drain(self, timeout: float) -> bool:
        driver = self._driver
        return driver is None or driver.wait_idle(timeout)

    def _pipelines(self) -> bool:
        # On the channel the subinterpreter takes requests in order from its ring:
        # a posted call may follow the one it runs (as on the process backend).
        driver = self._driver
        return PIPELINE_DEPTH > 1 and driver is not None and driver.end is not None

    @property
    def posted_depth(self) -> int:
        return PIPELINE_DEPTH if self._pipelines() else 1

    def poke(self) -> bool:
        """Wake the subinterpreter if it sleeps waiting for requests
        (``Channel.poke``); ``False`` without the channel or a running driver.

        >>> manager._workers[0].poke()  # doctest: +SKIP
        True
        """
        driver = self._driver
        end = None if driver is None else driver.end
        return end is not None and end.channel.poke()

    def cancel_posted(self, posted) -> None:
        """An ``acall`` cancelled after its call was sent: skipped unrun if it is
        still queued behind others (one compare-and-swap against its start); its
        reply comes either way and is dropped."""
        if isinstance(posted, _Posted):
            self._cancel(posted.call, interrupt=False)

    def _running(self) -> _Driver:
        driver = self._driver
        if driver is None:
            raise InterpreterCrashedError(f"subinterpreter {self.index} is not running",
                                          index=self.index)
        return driver

    def _terminate(self, *, kill: bool) -> None:
        driver, self._driver = self._driver, None
        if driver is not None:
            if driver.abandoned is None:
                driver.abandoned = "stopped"
            driver.stop(wait=0.5 if kill else 10.0)

    # -- one call -------------------------------------------------------------
    def _dumper(self, handles) -> wire.Dumper:
        kind = handles[0] if handles is not None else None
        self._handle_of = handles[1] if handles is not None else None
        dumper = self._dumpers.get(kind)
        if dumper is None:
            table = wire.dispatch_table(results=False)
            if kind is not None:
                table[kind] = self._reduce_obj
            dumper = self._dumpers[kind] = wire.Dumper(table)
        return dumper

    def _reduce_obj(self, obj):
        handle_of = self._handle_of
        if handle_of is None:
            raise OwnershipError(f"{obj!r} can only be passed to calls of the session it belongs to")
        return (Handle, (handle_of(obj),))

    def _finish(self, call: "_Call", timeout):
        """Wait for the reply of a sent call and read it; the call leaves its driver."""
        driver = call.driver
        try:
            if not self._await(call, timeout):
                self._timed_out(call, timeout)
            value, error = self._read_reply(call)
        except BaseException as exc:
            if not isinstance(exc, (CallTimeoutError, TransportError, InterpreterCrashedError,
                                    RequestNotSent, ManagerClosedError)):
                self._give_up(driver, "interrupted")  # a KeyboardInterrupt: the reply never read
            raise
        finally:
            driver.leave()
        return self._checked_reply(call, value, error)

    # -- posted requests (Worker.post): the completion thread reads the reply ----
    def _post(self, op, args, drop, timeout, handles, completions, finish):
        driver = self._running()
        end = driver.end
        if end is None:  # the pipes: one call at a time, its reply pipe watched
            call = self._send(driver, op, args, drop, handles, timeout is not None)
            posted = _Posted(call, completions, _left_on_close(driver, finish))
            try:
                completions.watch(driver.rep_r, posted.finish)
            except BaseException:
                self._give_up(driver, "interrupted")  # the reply would never be read
                driver.leave()
                raise
            return posted
        with driver.watch_lock:  # against _forget clearing the bell meanwhile
            driver.posting += 1
            end.want_bell()  # before the request is published: its reply rings
        try:
            # Armed, all of them: one queued behind others may be dropped unrun at its
            # deadline, or when its acall is cancelled (cancel_posted).
            call = self._send(driver, op, args, drop, handles, True)
        except BaseException:
            self._forget(driver, None)
            raise
        posted = _Posted(call, completions, _left_on_close(driver, finish, self, call))
        with driver.watch_lock:
            driver.posting -= 1
            driver.posted[call.seq] = posted
        try:
            driver.bells.watch()
        except BaseException:  # (the completions closed): the reply would never be read
            self._forget(driver, call)
            self._give_up(driver, "interrupted")
            driver.leave()
            raise
        return posted

    @staticmethod
    def _forget(driver: _Driver, call: "_Call | None") -> None:
        """``call``'s reply was taken (or, for ``None``, a post failed to send):
        the bell is cleared once no posted call is in flight (a blocking caller
        waits on its slot; rings would cost the subinterpreter a system call)."""
        with driver.watch_lock:
            if call is None:
                driver.posting -= 1
            else:
                driver.posted.pop(call.seq, None)
            if not driver.posted and not driver.posting and driver.end is not None:
                driver.end.want_bell(False)

    @staticmethod
    def _hand_over(posted: "_Posted", completions, event: str, gone: bool) -> None:
        """The bell watch's hand-over (transport.channel.BellWatch): a call dropped at
        its deadline has its reply taken and discarded here, the others go to their
        finish."""
        if posted.dropped:
            SubinterpreterWorker._settle_dropped(posted, gone)
        elif posted.completions is completions:
            posted.finish(event)
        else:
            posted.completions.call_soon(lambda finish=posted.finish: finish(READY))

    @staticmethod
    def _settle_dropped(posted: "_Posted", gone: bool) -> None:
        """Take and discard the reply of a posted call whose caller was told at
        its deadline that it was dropped unrun (see :meth:`_expire`)."""
        call = posted.call
        driver = call.driver
        try:
            try:
                if driver.take_frame(call) is None and not gone and not driver.end.bell_closed:
                    posted.handed = False  # not there after all: watched again
                    driver.bells.watch()
                    return
            except (ValueError, TransportError):  # detached, or the streams broke: over
                pass
            SubinterpreterWorker._forget(driver, call)
            driver.leave()
        except BaseException:
            driver.leave()
            raise

    def _collect(self, posted):
        call = posted.call
        driver = call.driver
        end = driver.end
        if end is not None and not posted.abandoned:
            frame = driver.take_frame(call)  # never waits
            if frame is None:
                end.drain_bell()
                if not end.bell_closed and not end.channel.closed:
                    posted.handed = False  # not there yet: watched again
                    driver.bells.watch()
                    return PENDING
            self._forget(driver, call)
            call.frame = frame  # None: the interpreter's loop ended
        try:
            if posted.abandoned:
                raise self._not_stopped(posted.timeout)
            if posted.timeout is not None:  # interrupted in time: its reply is dropped
                Completions.cancel(posted.grace)
                self._drop_reply(call)
                raise (self._dropped if call.skipped else self._interrupted)(posted.timeout)
            value, error = self._read_reply(call)
        finally:
            driver.leave()
        return self._checked_reply(call, value, error)

    def _expire(self, posted, timeout):
        # On the completion thread, which never waits.  A call still queued behind
        # others on the channel is skipped unrun and its caller told now: the
        # subinterpreter keeps running, and the bell watch takes and discards its
        # reply when it comes.  A call that started is interrupted and given its
        # grace period by a timer; its reply (or the timer) finishes it.
        call = posted.call
        end = call.driver.end
        if end is not None:
            if posted.handed:
                return PENDING  # its finish is on its way
            try:
                if end.ready(call.slot):
                    return PENDING  # answered in time: the bell watch hands it over
            except ValueError:  # detached: the driver stopped; finish() says how
                return PENDING
            if self._cancel(call, interrupt=False):
                posted.dropped = True
                return self._dropped(timeout)
        posted.timeout = timeout
        self._cancel(call)
        posted.grace = posted.completions.call_at(time.monotonic() + INTERRUPT_GRACE,
                                                  lambda: self._grace_over(posted))
        return PENDING

    def _grace_over(self, posted) -> None:
        """An interrupted posted call did not stop within its grace period."""
        driver = posted.call.driver
        if driver.end is None:
            posted.completions.unwatch(driver.rep_r)
        else:
            with driver.watch_lock:  # the bell watch no longer hands it over
                posted.handed = True
                driver.posted.pop(posted.call.seq, None)
        posted.abandoned = True
        self._give_up(driver, "timed out")
        posted.finish(READY)

    def _send(self, driver: _Driver, op, args, drop, handles, armed: bool = False) -> "_Call":
        """Write the request; the driver is entered until the reply is read.  An
        ``armed`` one (it has a timeout) can still be skipped unrun while it waits
        behind other calls (see :meth:`_cancel`)."""
        payload = wire.fast_request(self._encoder, op, args, drop)
        buffers = ()
        try:
            if payload is None:
                dumper = self._dumper(handles)
                payload, buffers = dumper.dumps((int(op), args, drop))
        except MultipyError:
            raise
        except Exception as exc:  # nothing was sent
            from ..transport.codec import describe_request

            table = dumper.table

            def crosses(part) -> bool:
                try:
                    wire.dumps(part, table)
                    return True
                except Exception:
                    return False

            raise TransportError(
                f"{describe_request((int(op), args), exc, probe=crosses)} (It cannot cross to "
                f"interpreter {self.index}: numbers, str, bytes, containers and memoryview "
                "can.)") from exc
        finally:
            self._handle_of = None
        self._seq += 1
        call = _Call(driver, self._seq, op)
        views = tuple(memoryview(b) for b in buffers) if buffers else ()
        if driver.finished.is_set():  # its loop ended while idle: a replacement can take the call
            raise RequestNotSent(self._lost(driver, "while idle, before this call was sent"))
        driver.enter()
        try:
            if views:
                # Fetched by the driver thread when the loop asks for this call's (no
                # wait here: a sender waiting for the loop to reach an earlier call's
                # buffers could be the completion thread, which that loop may wait on
                # to read an earlier posted call's big reply: a deadlock).
                driver.pending_in[call.seq] = views
            header = wire.REQUEST.pack(len(payload), call.seq, len(views))
            end = driver.end
            try:
                if end is None:
                    wire.write_all(driver.req_w, [header, payload])
                else:
                    # Under the worker lock: while the channel is full, other senders
                    # wait behind this one.
                    if driver.left:
                        driver.take_left()
                    call.slot, call.posted_to = end.send(header + payload, armed, driver.take_left)
            except OSError:
                raise RequestNotSent(self._lost(driver, "while idle, before this call was sent")) from None
        except RequestNotSent:
            driver.pending_in.pop(call.seq, None)  # never taken: nothing fetches them
            driver.leave()
            raise
        except BaseException:
            self._give_up(driver, "interrupted")  # a request half written: out of step
            driver.leave()
            raise
        return call

    def _checked_reply(self, call: "_Call", value, error):
        if error is not None and error.type_name.endswith(".CallInterrupted"):
            if self.closed:
                raise ManagerClosedError(
                    f"the manager was closed while interpreter {self.index} (subinterpreter) "
                    "was running this call; the call was interrupted")
            if call.driver.abandoned is not None:
                raise self._given_up(call.driver)
        return value, error

    def _read_reply(self, call: "_Call"):
        """The reply to ``call``.  Calls are answered in order and a caller that
        gives up on its reply abandons the interpreter, so any other call number
        means the streams are out of step: the interpreter is abandoned."""
        driver, seq, op = call.driver, call.seq, call.op
        end = driver.end
        if end is not None:
            frame, call.frame = call.frame, _NOTHING
            if frame is _NOTHING:
                frame = driver.next_frame(call, None)  # there, or on its way: no timeout applies
            if frame is None:
                raise self._gone(call)
            size, answers, nslots = wire.REPLY.unpack_from(frame)
        else:
            header = wire.read_exact(driver.rep_r, wire.REPLY.size)
            if header is None:
                raise self._gone(call)
            size, answers, nslots = wire.REPLY.unpack(header)
        if answers != seq:
            self._give_up(driver, "out of step")
            raise TransportError(
                f"subinterpreter {self.index} answered call {answers} while call {seq} waited; "
                "its replies are out of step, so it was abandoned and a new one serves later "
                "calls")
        if end is not None:
            body = memoryview(frame)[wire.REPLY.size:]
        else:
            body = wire.read_exact(driver.rep_r, size + nslots * wire.SLOT.size)
            if body is None:
                raise self._lost(driver, "while replying")
            body = memoryview(body)
        if not nslots and body[0] == FAST_VALUE:  # the binary form of a scalar result
            try:
                return self._decoder.decode(body), None
            except TransportError as exc:
                raise TransportError(f"the result of {op.name.lower()} in interpreter "
                                     f"{self.index} could not be read: {exc}") from None
        held = driver.arena  # the one this reply's buffers are in (see _Driver._arena_read)
        arena = memoryview(held)
        buffers = []
        try:
            for i in range(nslots):
                offset, length = wire.SLOT.unpack_from(body, size + i * wire.SLOT.size)
                buffers.append(arena[offset:offset + length])
            return pickle.loads(body[:size], buffers=buffers)
        except Exception as exc:
            raise TransportError(
                f"the result of {op.name.lower()} in interpreter {self.index} could not be "
                f"rebuilt in the host: {type(exc).__name__}: {exc}. Types defined inside the "
                "interpreter (register_module_source) exist only there; return plain values, "
                "or keep an Obj handle.") from exc
        finally:
            del buffers, arena, body
            if nslots:
                driver.arena_read(held)

    def _gone(self, call: "_Call") -> Exception:
        """The error of a call whose reply will never come: the manager closed, the
        subinterpreter was given up, or its loop ended (before taking the request:
        :class:`RequestNotSent`, so that a replacement can take it)."""
        driver = call.driver
        if self.closed:
            return ManagerClosedError(
                f"the manager was closed while interpreter {self.index} (subinterpreter) had "
                "this call in flight")
        if driver.abandoned is not None and driver.failure is None:
            return self._given_up(driver)
        if driver.end is not None and not driver.end.taken(call.posted_to):
            return RequestNotSent(self._lost(driver, "while idle, before this call was sent"))
        return self._lost(driver, "while running a call")

    def _given_up(self, driver: _Driver) -> InterpreterCrashedError:
        return InterpreterCrashedError(
            f"subinterpreter {self.index} was given up ({driver.abandoned}) while this call "
            "was in flight; a new one serves later calls, and objects created in the old one "
            "are gone.", index=self.index)

    def _await(self, call: "_Call", timeout: float | None) -> bool:
        """Wait for the reply; False when ``timeout`` passed first.  On the channel:
        spin, then sleep in FUTEX_WAIT, releasing the GIL once (the reply is taken
        off the channel here, for :meth:`_read_reply`).  On the pipes: spin on
        ``poll``, then sleep (see :class:`~multipy.transport.frames.Waiter`)."""
        driver = call.driver
        if driver.end is None:
            if timeout is None:
                driver.waiter.wait()
                return True
            return block_readable(driver.waiter.poller, timeout)
        frame = driver.next_frame(call, timeout)
        if frame is _TIMEOUT:
            return False
        call.frame = frame
        return True

    def _timed_out(self, call: "_Call", timeout: float):
        # The call is cancelled if it has not started, or interrupted where it runs.
        if self._cancel(call):
            # Skipped unrun, queued behind other calls: its caller is told now, not
            # once the calls ahead of it end (they may run long past the grace
            # period); its reply is taken when it comes (_Driver.take_left).
            driver = call.driver
            with driver.watch_lock:
                driver.left.append(call)
            raise self._dropped(timeout)
        if self._await(call, INTERRUPT_GRACE):
            self._drop_reply(call)
            raise self._dropped(timeout) if call.skipped else self._interrupted(timeout)
        self._give_up(call.driver, "timed out")
        raise self._not_stopped(timeout)

    @staticmethod
    def _cancel(call: "_Call", interrupt: bool = True) -> bool:
        """Stop a call: on the channel a call still queued is skipped unrun, decided
        once against its start (HostEnd.cancel: never both, never neither); one
        that started, or any call on the pipes, is interrupted (``interrupt``).
        Returns whether it was skipped."""
        end = call.driver.end
        if end is not None and not call.skipped:
            try:
                call.skipped = end.cancel(call.slot)
            except ValueError:  # detached: the driver stopped
                pass
        if not call.skipped and interrupt:
            call.driver.interrupt(call.seq)
        return call.skipped

    def _dropped(self, timeout: float) -> CallTimeoutError:
        return CallTimeoutError(
            f"call waited past its timeout of {timeout:g} s queued behind other calls on "
            f"interpreter {self.index} (subinterpreter) and was dropped without running; the "
            "interpreter keeps running. Raise call_timeout= (manager) or timeout= (per call), "
            "or run fewer calls at once.")

    def _drop_reply(self, call: "_Call") -> None:
        """Read and discard the reply of an interrupted call."""
        try:
            self._read_reply(call)
        except TransportError:
            pass

    def _interrupted(self, timeout: float) -> CallTimeoutError:
        return CallTimeoutError(
            f"call on interpreter {self.index} (subinterpreter) ran past its timeout of "
            f"{timeout:g} s and was interrupted; the interpreter and its objects are kept. "
            "Raise call_timeout= (manager) or timeout= (per call) if the work is expected "
            "to take longer.")

    def _not_stopped(self, timeout: float) -> CallTimeoutError:
        return CallTimeoutError(
            f"call on interpreter {self.index} (subinterpreter) ran past its timeout of "
            f"{timeout:g} s and did not stop when interrupted within {INTERRUPT_GRACE:g} s (it "
            "is probably blocked in native code); the subinterpreter was abandoned, its objects "
            "are gone, and a new one serves later calls. Raise call_timeout= (manager) or "
            "timeout= (per call) if the work is expected to take longer.")

    def _give_up(self, driver: _Driver, reason: str) -> None:
        """Give ``driver`` up (once, from whichever thread sees why first): stop it
        and restart the interpreter in the background."""
        with self._swap:
            if driver.abandoned is None:
                driver.abandoned = reason
            current = self._driver is driver
            if current:
                self._driver = None
        driver.stop(wait=0)
        if current:
            self.mark_dead(reason)

    def _lost(self, driver: _Driver, while_: str) -> InterpreterCrashedError:
        driver.finished.wait(5)
        why = driver.failure or "its serving loop stopped"
        self._give_up(driver, "failed")
        return InterpreterCrashedError(
            f"subinterpreter {self.index} stopped serving {while_}: {why}. It will be "
            "restarted for later calls; objects created in it are gone.", index=self.index)


def _left_on_close(driver: _Driver, finish, worker=None, call=None):
    """``finish``, which also leaves ``driver`` when the completion thread stopped
    before the reply came (``CLOSED``): nobody will read that reply, so the host's
    ends of the pipes and the channel may close, and the serving loop end once
    the call returns."""
    def finishing(event: str) -> None:
        if event == CLOSED:
            if call is not None:
                worker._forget(driver, call)
            driver.leave()
        finish(event)
    return finishing


class _Call:
    """One request in flight: its number, and where its reply comes."""

    __slots__ = ("driver", "seq", "op", "slot", "posted_to", "frame", "skipped")

    def __init__(self, driver: _Driver, seq: int, op) -> None:
        self.driver = driver
        self.seq = seq
        self.op = op
        self.slot = 0           # its reply slot on the channel
        self.posted_to = 0      # the ring position past the request (HostEnd.taken)
        self.frame = _NOTHING   # its reply, once a wait took it off the channel
        self.skipped = False    # cancelled in time: the interpreter answers it unrun


class _Posted:
    """A posted call in flight: what ``_collect`` and ``_expire`` need."""

    __slots__ = ("call", "completions", "finish", "timeout", "grace", "abandoned", "handed",
                 "dropped")

    def __init__(self, call: _Call, completions, finish) -> None:
        self.call = call
        self.completions = completions
        self.finish = finish
        self.timeout = None     # set once it ran past its timeout and was interrupted
        self.grace = None       # the timer that abandons it if it does not stop
        self.abandoned = False
        self.handed = False     # its finish was scheduled by the bell watch (channel)
        self.dropped = False    # skipped at its deadline: its caller was told already


class SubinterpreterBackend(Backend):
    """Creates :class:`SubinterpreterWorker` interpreters."""

    kind = BackendKind.SUBINTERPRETER

    def create_worker(self, config: WorkerConfig) -> Worker:
        return SubinterpreterWorker(config)


def create_backend() -> Backend:
    """The backend object ``resolve_backend("subinterpreter")`` hands the manager.

    >>> from multipy import InterpreterManager                # doctest: +SKIP
    >>> with InterpreterManager(2, backend="subinterpreter") as manager:  # doctest: +SKIP
    ...     manager.register_module_source("m", "def f(x): return x + 1")
    ...     with manager.acquire_one() as s:
    ...         assert s.global_("m", "f")(1).deref() == 2
    """
    _interpreters()  # fail here, with the import error, on a Python without it
    return SubinterpreterBackend()


# Interpreters still running when the host exits are stopped before Python
# finalizes (a subinterpreter left running would make finalization fail).
_live: "weakref.WeakSet[_Driver]" = weakref.WeakSet()


def _stop_all() -> None:
    drivers = list(_live)
    for driver in drivers:
        driver.stop(wait=0)
    deadline = time.monotonic() + 5.0
    for driver in drivers:
        driver.finished.wait(max(0.0, deadline - time.monotonic()))


_exit_hook = False


def _watch_exit() -> None:
    # threading's exit hooks run before non-daemon threads are joined and long
    # before the interpreter finalizes (atexit would run too late for that).
    global _exit_hook
    if not _exit_hook:
        threading._register_atexit(_stop_all)
        _exit_hook = True
