"""The ``process`` backend: one worker process per interpreter.

::

    host thread                                worker process (_process_main.Loop)
    -----------                                ------------------------------------
    request(op, args)
      encode args ──▶ args arena (memfd)
      write frame ──── request pipe ─────────▶ read frame, view args in place
                                               run op under the caller's grad mode
                                               copy result tensors ▶ results arena
      read frame  ◀──── reply pipe ─────────── write frame
      view results in place (freed when the host tensor dies)

CUDA tensors take the same path through device buffers instead (a CUDA link per
interpreter and GPU, mapped once: transport.cuda_link); the host announces a new
or grown link with an ``Op.CUDA_LINK`` request before the call that needs it.

Workers are forked by a fork server that imported torch (and the manager's
``preload=`` modules) once but never ran an op (so no thread pool exists to be
broken by ``fork``): starting N interpreters costs about one ``import torch``,
not N, and what the server imported is shared by all of them (see
:mod:`._forkserver`).  Each worker's stdout
and stderr are pumped into the host's ``sys.stdout``/``sys.stderr``.  A
worker that dies closes its reply pipe: the waiting caller sees end-of-file at
once and gets :class:`~multipy.errors.InterpreterCrashedError`.
"""

from __future__ import annotations

import collections
import multiprocessing
import operator
import os
import select
import sys
import threading
import time
from _thread import get_ident
from multiprocessing import reduction, spawn

from ..errors import CallTimeoutError, ManagerClosedError, TransportError
from ..transport import channel as _channel
from ..transport.codec import Decoder, Encoder
from ..transport.cuda_link import HostLinks
from ..transport.frames import FRAME_HEADER, FrameError, FrameReader, Waiter, write_frame
from ..transport.messages import CALL_ID, FAST_REPLY, MovablePayload, Op, parse_reply, unpack_fast_reply
from ..transport.shm import Arena, Segment, held_blocks, open_descriptor
from . import _forkserver
from .base import (PENDING, Backend, BackendKind, RequestNotSent, Worker, WorkerConfig, describe_exit,
                   in_calls, no_start)
from .completions import READY

_pack_id = CALL_ID.pack
_CALL_REPLICATED = Op.CALL_REPLICATED
_ID_BYTES = CALL_ID.size
_unpack_fast = unpack_fast_reply
_call_of = operator.attrgetter("call")  # a Reply's call id
# Globals: an enum attribute costs a metaclass __getattr__ (~0.7 µs) per lookup.
_TIMEOUT, _CLOSED = _channel.Wait.TIMEOUT, _channel.Wait.CLOSED
_GONE = (_channel.Wait.DEAD, _channel.Wait.CLOSED)
ARENA_BYTES = 1 << 22  # grows on demand; pages are only touched when used
_LINK_TIMEOUT = 30.0   # seconds an interpreter may take to map a CUDA link
_CALLERS_LEAVE = 10.0  # seconds a restart waits for the calls in flight to be failed
_PRELOAD = ["multipy.backends._process_main", "numpy", "torch"]


def _pipeline_depth() -> int:
    """Posted calls the dispatcher keeps in flight per interpreter on the call channel
    (``MULTIPY_PIPELINE_DEPTH``, default 2; 1 sends the next only once one ended)."""
    raw = os.environ.get("MULTIPY_PIPELINE_DEPTH", "2")
    try:
        depth = int(raw)
    except ValueError:
        raise ValueError(f"MULTIPY_PIPELINE_DEPTH must be a whole number, not {raw!r}") from None
    if not 1 <= depth <= 32:
        raise ValueError(f"MULTIPY_PIPELINE_DEPTH must be between 1 and 32, not {depth}")
    return depth


PIPELINE_DEPTH = _pipeline_depth()


class _Fd:
    """An inherited file descriptor in a Process's arguments."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        return (_identity, (reduction.DupFd(self.fd),))


def _identity(x):
    return x


_starting = threading.local()


def _preparation_without_main(name, _original=spawn.get_preparation_data):
    """multiprocessing's start data, minus the host's ``__main__`` for our workers.

    multiprocessing re-runs the parent's main script in every child so that
    functions defined there can be unpickled.  An interpreter never needs the
    host's ``__main__``, and re-running it costs start-up time and breaks
    scripts without an ``if __name__ == "__main__"`` guard, so it is left out
    while (and only while) this thread starts a worker.
    """
    data = _original(name)
    if getattr(_starting, "worker", False):
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
    return _forkserver.preparation(data)


def worker_context(extra_preload: tuple[str, ...] = ()):
    """The multiprocessing context interpreters start from: forkserver with torch
    preloaded where available, else spawn.  ``extra_preload`` adds modules (the
    preload list is the process-wide fork server's, so every user shares it)."""
    if spawn.get_preparation_data is not _preparation_without_main:
        spawn.get_preparation_data = _preparation_without_main  # installed on first use
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD + list(extra_preload))
        return ctx
    return multiprocessing.get_context("spawn")


class _Pump(threading.Thread):
    """Copies a worker's stdout or stderr into the host's current stream."""

    def __init__(self, fd: int, stream_name: str, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.fd = fd
        self.stream_name = stream_name
        self.lock = threading.Lock()
        self.tail = b""
        self.done = False
        os.set_blocking(fd, False)

    def run(self) -> None:
        while not self.done:
            try:
                select.select([self.fd], [], [])
            except (OSError, ValueError):
                return
            self.drain()

    def drain(self) -> None:
        with self.lock:
            if self.done:
                return
            while True:
                try:
                    chunk = os.read(self.fd, 65536)
                except BlockingIOError:
                    return
                except OSError:
                    chunk = b""
                if not chunk:
                    self.done = True
                    os.close(self.fd)
                    return
                self.tail = (self.tail + chunk)[-4096:]
                stream = getattr(sys, self.stream_name)
                try:
                    stream.write(chunk.decode("utf-8", "replace"))
                    stream.flush()
                except (OSError, ValueError):
                    pass


class _ForkUnsafe(Exception):
    """The interpreter exited at once: its fork server's shared imports made it
    unsafe to fork from (see :mod:`._forkserver`)."""


_UNSAFE_EXITS = {
    _forkserver.UNSAFE_THREADS: "importing them started threads in the fork server (forking a "
                                "process with threads can deadlock the child)",
    _forkserver.UNSAFE_CUDA: "importing them initialised CUDA in the fork server (CUDA does "
                             "not survive a fork)",
}


class ProcessWorker(Worker):
    """One interpreter in its own process."""

    kind = BackendKind.PROCESS

    def __init__(self, config: WorkerConfig, ctx) -> None:
        super().__init__(config)
        self._ctx = ctx
        self._server_key = None  # the fork server this interpreter comes from (held)
        self._process = None
        self._end = None
        self._freed: collections.deque = collections.deque()
        self._pins: set[int] = set()
        # Taken to read replies and settle them (never while waiting for one on the
        # channel); the worker lock is taken only to send.  Order: lock, then _rx.
        self._rx = threading.Lock()
        self._drained = threading.Condition(self._rx)
        self._callers: dict[int, int] = {}  # call id -> thread of its blocking caller
        self._draining = 0  # threads in _drain: told when the last caller leaves
        self._exit_lock = threading.Lock()

    request = Worker._request_in_flight  # several requests in flight at once

    def _launch(self) -> None:
        self._terminate(kill=True)
        # The new generation's books are made under _rx, where a blocking caller of
        # the last one reads them: one that outlived the restart's wait for it (see
        # _terminate) finds them all of one generation, and its own gone (call ids
        # are never reused: see _outlived).
        with self._rx:
            self._begin_generation()

    def _begin_generation(self) -> None:
        req_r, self._req_w = os.pipe()
        self._rep_r, rep_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self._args = Arena(Segment.create(ARENA_BYTES, name=f"multipy-args-{self.index}"))
        self._results = Segment.create(ARENA_BYTES, name=f"multipy-results-{self.index}")
        self._freed = collections.deque()
        self._pins = set()
        self._args_lock = threading.RLock()  # reentrant: a GC finalizer may run inside it
        freed = self._freed
        self._encoder = Encoder(self._args, returnable=self._results, reuse_arena=True)
        # Argument blocks that host results view (results handed back by reference),
        # this generation's: a result may outlive a restart.
        self._held = held_blocks(self._args, self._pins, self._args_lock)
        # Result blocks whose last tensor died are reported with the next request:
        # the decoder puts their offsets in this generation's _freed.
        self._decoder = Decoder(self._results, own=self._args.segment, own_cuda=True,
                                released=freed, held=self._held)
        # CUDA link buffers for this generation (made when the first CUDA tensor crosses).
        self._links = self._encoder.links = self._decoder.links = HostLinks()
        # The call channel of this generation (a fresh one each restart: a reply half
        # written by a dead interpreter can never reach its replacement).
        channel_fd = channel = memory = None
        bell = (-1, -1)
        if _channel.NATIVE:
            channel_fd, channel, memory = _channel.create(f"multipy-channel-{self.index}")
            bell = os.pipe()  # rung after each reply, for the completion thread's epoll
            os.set_blocking(bell[0], False)
        fds = tuple(_Fd(fd) for fd in (req_r, rep_w, self._args.segment.fd, self._results.fd, out_w, err_w))
        fds += (None, None) if channel_fd is None else (_Fd(channel_fd), _Fd(bell[1]))
        try:
            process = self._start_process(fds)
        finally:
            for fd in (req_r, rep_w, out_w, err_w) + (() if channel_fd is None else (channel_fd, bell[1])):
                os.close(fd)
        self._process = process
        self.pid = process.pid
        self._waiter = Waiter(self._rep_r, self.config.spin)
        self._reader = FrameReader(self._rep_r)
        self._end = None if channel is None else _channel.HostEnd(
            channel, self._req_w, self._reader.read, process.sentinel, self.config.spin, bell[0],
            memory)
        if self._end is not None:  # a send waiting for the interpreter reads its big replies
            self._end.reply_fd, self._end.drain = self._rep_r, self._drain_spilled
        # Only the pipes' wait asks whether a caller is alone (base.in_calls); on the
        # channel the extension counts the calls in flight itself.
        self.counts_callers = channel is None
        # (_next_call goes on from the last generation's: a call id names one call
        # over the worker's life, so a late caller never finds its id in new books.)
        # In-flight bookkeeping of this generation (see _send and _finish).
        self._owed: dict[int, list[int]] = {}  # call id -> argument blocks, reply not read yet
        self._unsure: set[int] = set()  # owed calls whose write was interrupted: sent or not?
        self._callers = {}               # owed calls whose blocking caller waits: id -> thread
        self._slots: dict[int, int] = {}  # channel: call id -> its reply slot
        # Owed calls a completion context collects, in send order (call id -> _Posted);
        # on the channel, those of the one watch of its bell (changed under its lock).
        self._bells = None if channel is None else _channel.BellWatch(
            self._end, lambda posted, slots=self._slots: slots.get(posted.call))
        self._posted: dict[int, _Posted] = {} if channel is None else self._bells.posted
        self._stash: dict[int, object] = {}  # replies read for a caller not back yet
        self._ends: dict[int, int] = {}   # channel: call id -> ring position past it
        self._left: set[int] = set()      # channel: owed calls whose caller left
        self._exit = None                 # (exitcode,) once the process is known dead
        self._lost = False                # marked dead (once per generation)
        # The common blocking call sent and ended in C (see _send_call and _await_call),
        # on this generation's channel and books.
        self._caller = None if channel is None else _channel._native_module.caller(
            self, channel, self._end)
        self._out = _Pump(out_r, "stdout", f"multipy-stdout-{self.index}")
        self._err = _Pump(err_r, "stderr", f"multipy-stderr-{self.index}")
        self._out.start()
        self._err.start()

    def _start_process(self, fds):
        """Fork the interpreter from the fork server of its shared imports (or
        spawn it where there is no fork server)."""
        config = self.config
        if not _forkserver.available():
            process = self._ctx.Process(
                target=_worker_entry, args=(config, fds, False),
                name=f"multipy-interpreter-{self.index}", daemon=True)
            _starting.worker = True
            try:
                process.start()
            finally:
                _starting.worker = False
            return process
        while True:
            key = _forkserver.server_key(config.shared_imports, config.sys_path)
            if key != self._server_key:
                _forkserver.hold(key)
                if self._server_key is not None:
                    _forkserver.release(self._server_key)
                self._server_key = key
            process = _forkserver.WorkerProcess(
                target=_worker_entry, args=(config, fds, bool(key[0])),
                name=f"multipy-interpreter-{self.index}", daemon=True)
            try:
                with _forkserver.starting(key):
                    process.start()
                return process
            except (OSError, EOFError) as exc:
                if not key[0]:
                    raise
                # The server died importing them (an import that raised something
                # other than ImportError): import them per interpreter instead.
                _forkserver.mark_unsafe(config.shared_imports, config.sys_path,
                                        f"the fork server could not import them ({exc!r})")

    def close(self, *, timeout: float = 10.0) -> None:
        try:
            super().close(timeout=timeout)
        finally:
            key, self._server_key = self._server_key, None
            if key is not None:
                _forkserver.release(key)

    @property
    def notes(self) -> tuple[str, ...]:
        why = _forkserver.why_not_shared(self.config.shared_imports, self.config.sys_path)
        if why is None:
            return ()
        return (f"{', '.join(self.config.shared_imports)}: imported in every interpreter, not "
                f"shared from the fork server: {why}",)

    def _wait_ready(self) -> None:
        try:
            try:
                self._exchange(Op.PING, (), (), self.config.start_timeout, starting=True)
            except _ForkUnsafe as exc:
                _forkserver.mark_unsafe(self.config.shared_imports, self.config.sys_path, str(exc))
                self._launch()  # from the plain server; the modules are imported here instead
                self._exchange(Op.PING, (), (), self.config.start_timeout, starting=True)
        except Exception as exc:
            tail = self._err.tail.decode("utf-8", "replace").strip() if self._err else ""
            why = str(exc) + (f"\nits stderr ended with:\n{tail}" if tail else "")
            raise no_start(self.index, why) from None

    def _exchange(self, op, args, drop, timeout, handles=None, *, starting: bool = False):
        call, placed = self._send(op, args, drop, timeout, handles)
        return self._finish(call, placed, op, timeout, starting)

    _roundtrip = _exchange  # the Worker step, without a call in between

    # -- several calls in flight (Worker._request_in_flight) ---------------------------
    def _send_call(self, op, args, drop, timeout, handles):
        """Send one request under the worker lock; the reply is awaited without it
        (:meth:`_await_call`) on the call channel.  On the pipes, and while CUDA link
        buffers are in use (the next call would reuse the buffers this one reads),
        the reply is awaited here, under the lock, and the ticket carries it."""
        caller = self._caller
        if caller is not None and op is _CALL_REPLICATED and not drop and handles is None:
            links = self._links
            if not (links._links or links._wanted):  # links.active, inlined
                # The common call: sent by the extension, its books kept there too.
                freed = self._decoder.released_offsets() if self._freed else ()
                held = self._held
                if held.pending:  # arguments whose last host view died: reuse their blocks
                    held.settle()
                since = self._next_call  # moved on by the send
                try:
                    ticket = caller.send(op, args, freed, timeout)
                except BaseException:
                    # Not sent: reported with the next one.  Sent, then a Ctrl-C as send
                    # returned: reported already (twice would free blocks reused since).
                    if self._next_call == since:
                        self._freed.extend(freed)
                    raise
                if ticket is not None:
                    return ticket
                self._freed.extend(freed)  # the Python path below sends them
        call, placed = self._send(op, args, drop, timeout, handles)
        if self._end is None or self._links.active:
            return (None, self._finish(call, placed, op, timeout, False), op, timeout)
        return (call, placed, op, timeout)

    def _await_call(self, ticket, waited=None):
        """The reply to the call of ``ticket``; ``waited``: what the extension's wait
        for it already said (an int) or raised (see Worker._request_in_flight's ``sent``)."""
        call, placed, op, timeout = ticket
        if call is None:
            return placed
        caller = self._caller
        if waited is None and (caller is None or self._left):  # (callers who left: _channel_reply sweeps them)
            return self._finish(call, placed, op, timeout, False)
        # The extension waits and, for the common reply, settles it: (value, None).
        # Anything else (an error, output to pump, a spilled or pickled reply, a
        # timeout, a dead interpreter) is _finish's, told what the wait said.
        try:
            if waited is None:
                slot = self._slots.get(call)  # None: its generation is over (_channel_reply says so)
                got = _CLOSED if slot is None else caller.finish(
                    call, slot, -1.0 if timeout is None else timeout)
            elif type(waited) is int:
                got = waited
            else:
                raise waited
        except ValueError:  # detached: this generation is over
            got = _CLOSED
        except BaseException:  # a signal handler raised while waiting: the call stays owed
            if call in self._owed:
                self._left.add(call)  # settled by a later reader (_sweep)
            self._callers.pop(call, None)
            if self._draining and not self._callers:
                self._notify_drained()
            raise
        if type(got) is tuple:
            self._callers.pop(call, None)
            if self._draining and not self._callers:
                self._notify_drained()
            return got
        return self._finish(call, placed, op, timeout, False, got)

    def _pipelines(self) -> bool:
        # Not while CUDA link buffers are in use: the next call would reuse the buffers
        # the one before it reads.
        # (links.active, inlined: asked once per posted call.)
        links = self._links
        return (self._end is not None and PIPELINE_DEPTH > 1
                and not (links._links or links._wanted))

    @property
    def posted_depth(self) -> int:
        # _pipelines() and links.active, inlined: asked for every interpreter the
        # dispatcher looks at, several times per posted call when they are all busy.
        links = self._links
        if self._end is None or links._links or links._wanted:
            return 1
        return PIPELINE_DEPTH

    def _drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the calls in flight without the lock (blocking
        callers, posted calls queued on the channel) to end."""
        deadline = time.monotonic() + timeout
        with self._rx:
            self._draining += 1
            try:
                while self._callers or (self._posted and self._end is not None):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._drained.wait(min(left, 0.05))
            finally:
                self._draining -= 1
        return True

    def _finish(self, call: int, placed, op, timeout, starting: bool, waited=None):
        """Wait for the reply to ``call`` and settle it: ``(value, RemoteException | None)``.
        ``waited``: what a wait on the channel already said (no first wait then).

        Runs without the worker lock: other calls are sent meanwhile.  A caller who
        leaves before its reply (a signal handler raised, e.g. Ctrl-C) leaves the
        call owed: its reply is settled unread by whoever reads it (see _match and
        _sweep), so it never reaches another caller."""
        try:
            if self._end is not None:
                return self._channel_reply(call, placed, op, timeout, starting, waited)
            return self._pipe_reply(call, placed, op, timeout, starting)
        except BaseException:
            if self._process is not None and self._links.active:
                # The next call reuses the CUDA link buffers that this one may still be
                # reading in the interpreter: only a fresh interpreter is safe.
                self._out_of_step("a call using CUDA link buffers was interrupted")
            if call in self._owed and self._end is not None:
                self._left.add(call)  # settled by a later reader (_sweep)
            raise
        finally:
            self._callers.pop(call, None)
            if self._draining and not self._callers:
                self._notify_drained()

    def _abandon(self, since: int) -> None:
        me = get_ident()
        # list() copies in one step: other threads add and remove calls meanwhile.
        for call, caller in list(self._callers.items()):
            if caller == me and call > since:
                if self._end is not None and call in self._owed:
                    self._left.add(call)  # settled by a later reader (_sweep)
                self._callers.pop(call, None)
        if self._draining and not self._callers:
            self._notify_drained()

    def _notify_drained(self) -> None:
        if self._rx.acquire(blocking=False):
            try:
                self._drained.notify_all()
            finally:
                self._rx.release()

    def _channel_reply(self, call, placed, op, timeout, starting, waited=None):
        """:meth:`_finish` on the call channel: wait on this call's own reply slot
        (``waited``: what a first wait said, see :meth:`_await_call`)."""
        end = self._end
        slot = self._slots.get(call)
        if slot is None:  # not in this generation's books: its own is over
            raise self._outlived()
        deadline = None if timeout is None else time.monotonic() + timeout
        wait = end.wait
        while True:
            # Whether to spin first is the extension's choice: only on a core that no
            # busy interpreter and no other host thread needs (see HostEnd.wait).
            if waited is not None:
                rc, waited = waited, None
            else:
                try:
                    rc = wait(slot, None if deadline is None else max(0.0, deadline - time.monotonic()))
                except ValueError:  # detached: this generation is over
                    rc = _CLOSED
            with self._rx:
                if self._end is not end:  # replaced while it waited
                    raise self._outlived()
                try:
                    reply = self._take_reply(call, slot)
                except ValueError:  # detached
                    reply = None
                if reply is not None:
                    if self._left:
                        self._sweep(call)
                    return self._settle(op, reply, placed)
                if rc == _TIMEOUT:
                    self._kill_for_timeout(timeout)
                if rc in _GONE:
                    try:
                        unsent = not end.taken(self._ends[call])
                    except (KeyError, ValueError):  # detached: this generation is over already
                        unsent = False
                    if unsent and not starting:
                        # The interpreter died before it took this call.
                        self._owed.pop(call, None)
                        raise RequestNotSent(self._crashed("before this call reached it"))
                    raise self._crashed("while starting" if starting else "while running a call")

    def _outlived(self):
        """The error of a blocking caller back after its interpreter was replaced: the
        restart stopped waiting for it (:data:`_CALLERS_LEAVE`, twice) and the
        generation it sent its call to is over, its books gone.  Nothing of the
        replacement is touched (its slots and call ids are not this call's)."""
        from ..errors import InterpreterCrashedError

        return InterpreterCrashedError(
            f"interpreter {self.index} was restarted while this call waited for its reply: its "
            f"caller did not come back within the {2 * _CALLERS_LEAVE:g} s a restart waits for "
            "the calls in flight (its thread was held up: a debugger, a slow signal handler, "
            "an overloaded host); whether the call ran is unknown", index=self.index)

    def _take_reply(self, call: int, slot: int):
        """The reply to ``call`` from its slot (``None`` if not there yet).  Under ``_rx``."""
        channel = self._end.channel
        got = channel.take_reply(slot)  # HostEnd.take, inlined (once per call)
        if got is None:
            return None
        channel.release(slot)
        del self._slots[call]
        self._ends.pop(call, None)
        tag, data = got
        if tag & _channel.SPILLED:
            reply = self._spilled_reply(call)
        elif _unpack_fast is not None and len(data) > _ID_BYTES and data[_ID_BYTES] == FAST_REPLY:
            try:  # the usual reply: its fields as a plain tuple, in Reply's order
                reply = _unpack_fast(data)
            except ValueError as exc:
                raise self._desynchronised(exc) from None
        else:
            try:
                reply = parse_reply(data)  # _parse, inlined
            except TransportError as exc:
                raise self._desynchronised(exc) from None
        if reply[0] != call:
            raise self._desynchronised(f"the reply in the slot of call {call} answers call {reply[0]}")
        del self._owed[call]
        return reply

    def _drain_spilled(self) -> bool:
        """Read the spilled replies waiting in the reply pipe, kept for their callers
        (``HostEnd.drain``: a send waiting for the interpreter runs it, since the
        interpreter, blocked writing one, takes no request until it is read); False at
        end-of-file (the interpreter died)."""
        with self._rx:
            while self._reader.buffered or self._waiter.poller.poll(0):
                frame = self._reader.read()
                if frame is None:
                    return False
                reply = self._parse(frame)
                self._stash[_call_of(reply)] = reply
        return True

    def _spilled_reply(self, call: int):
        """The reply to ``call`` announced in its slot and written to the reply pipe.
        Spilled replies cross the pipe in reply order: those of other calls read on
        the way are kept for their callers.  Under ``_rx``."""
        return self._end.spilled(call, self._stash, _call_of,
                                 lambda: self._parse(self._read_frame(False)))

    def _sweep(self, answered: int) -> None:
        """Settle the replies of channel calls whose callers left (they never reach
        anyone) and give their slots back.  Replies come in request order: one that
        left before ``answered`` and has no reply never reached the interpreter.
        Under ``_rx``; a failure here stops the interpreter but not the caller."""
        end = self._end
        try:
            for call in sorted(self._left):
                slot = self._slots.get(call)
                if slot is not None and end.ready(slot):
                    tag, data = end.take(slot)
                    del self._slots[call]
                    reply = self._spilled_reply(call) if tag & _channel.SPILLED else self._parse(data)
                elif call < answered:
                    reply = None
                    if slot is not None:
                        del self._slots[call]
                        end.release(slot)
                else:
                    break
                self._left.discard(call)
                self._ends.pop(call, None)
                placed = self._owed.pop(call, ())
                if reply is not None:
                    self._settle(None, reply, placed)
                else:
                    self._held.release(placed)
        except Exception:
            pass  # the interpreter was stopped (desynchronised or dead): its callers learn it

    def _parse(self, frame: bytes):
        try:
            return parse_reply(frame)
        except TransportError as exc:
            raise self._desynchronised(exc) from None

    def _pipe_reply(self, call, placed, op, timeout, starting):
        """:meth:`_finish` on the pipes, where one call is in flight at a time (its
        caller holds the worker lock): replies come in request order; those read
        on the way belong to callers who left and are settled (see _match)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._rx:
            reply = self._stash.pop(call, None)
            if reply is not None:
                del self._owed[call]
            while reply is None:
                reply = self._match(call, self._next_frame(deadline, timeout, starting))
            return self._settle(op, reply, placed)

    # -- posted requests (Worker.post): the completion thread reads the reply ----
    def _post(self, op, args, drop, timeout, handles, completions, finish):
        posted = _Posted(op, completions, finish, timeout)
        caller = self._caller
        if caller is not None and op is _CALL_REPLICATED and not drop and handles is None:
            links = self._links
            if not (links._links or links._wanted):  # links.active, inlined
                # The common call: sent by the extension, its books kept there too
                # (as _send_call's blocking one; its slot armed with its deadline).
                freed = self._decoder.released_offsets() if self._freed else ()
                held = self._held
                if held.pending:  # arguments whose last host view died: reuse their blocks
                    held.settle()
                deadline = -1 if timeout is None else _channel.deadline_ns(time.monotonic() + timeout)
                since = self._next_call  # moved on by the post
                try:
                    sent = caller.post(args, freed, posted, self._posted, deadline)
                    if sent is not None:
                        posted.call, posted.placed = sent
                        self._bells.watch()  # one watch of the bell hands every posted reply over
                        return posted
                except BaseException as exc:
                    if self._next_call == since:  # not sent: reported with the next one
                        self._freed.extend(freed)
                        raise
                    # Sent, its books kept (in C), then a Ctrl-C as post returned or the
                    # watch was entered: its freed blocks are reported (twice would free
                    # reused blocks), its reply watched, and its sender ends it as a
                    # call interrupted after its send (see Worker._send_posted).
                    call = self._next_call
                    posted.call, posted.placed = call, self._owed.get(call, posted.placed)
                    exc.multipy_posted = posted
                    self._bells.watch()
                    raise
                self._freed.extend(freed)  # the Python path below sends them
        call, placed = self._send(op, args, drop, timeout, handles, posted)
        posted.call, posted.placed = call, placed
        try:
            if self._end is not None:
                self._bells.watch()
            else:
                self._arm(posted)
        except BaseException as exc:  # a Ctrl-C as the watch was entered: sent all the same
            exc.multipy_posted = posted
            if self._end is not None:
                self._bells.watch()
            else:
                self._arm(posted)
            raise
        return posted

    def _arm(self, posted) -> None:
        """Have the completion thread run ``finish`` once the reply can be read (pipes)."""
        call, completions, finish = posted.call, posted.completions, posted.finish
        if call in self._stash or self._reader.buffered:
            completions.call_soon(lambda: finish(READY))
        else:
            completions.watch(self._rep_r, finish)

    def _collect(self, posted):
        op, call, placed = posted.op, posted.call, posted.placed
        caller = self._caller
        if caller is not None and posted.outcome is None and not self._left \
                and not self._links._links:  # (CUDA link buffers: marked read by _settle)
            slot = self._slots.get(call)
            if slot is not None:
                # The common reply, settled by the extension (its books, the posted
                # call's entry and, once none is left, the bell with it).
                got = caller.collect(call, slot, self._posted)
                if got is not None:
                    if self._draining and not self._posted:
                        self._notify_drained()
                    return got
        end = self._end
        try:
            with self._rx:
                if posted.outcome is not None:
                    raise posted.outcome
                if end is not None:
                    slot = self._slots.get(call)
                    try:
                        reply = None if slot is None else self._take_reply(call, slot)
                    except ValueError:  # detached: the manager is closing
                        raise self._crashed("while running a call") from None
                    if reply is None:
                        end.drain_bell()
                        if end.bell_closed or self._process is None:
                            try:
                                unsent = slot is not None and not end.taken(self._ends[call])
                            except (KeyError, ValueError):
                                unsent = False
                            if unsent:  # the interpreter died before it took this call
                                self._forget(call)
                                self._held.release(placed)
                                raise RequestNotSent(self._crashed("before this call reached it"))
                            raise self._crashed("while running a call")
                        posted.handed = False  # not there yet: watched again
                        self._bells.watch()
                        return PENDING
                    if self._left:
                        self._sweep(call)
                else:
                    reply = self._stash.pop(call, None)
                    if reply is not None:
                        del self._owed[call]
                    while reply is None:
                        if not self._reader.buffered and not self._waiter.poller.poll(0):
                            # What woke us was read by another caller; ours is not here yet.
                            self._arm(posted)
                            return PENDING
                        reply = self._match(call, self._read_frame(False))
                if end is not None:
                    with self._bells.lock:
                        self._posted.pop(call, None)
                        if caller is not None:  # in one step against the extension's post
                            caller.unwant_bell(self._posted)
                        elif not self._posted:
                            end.want_bell(False)
                else:
                    self._posted.pop(call, None)
                return self._settle(op, reply, placed)
        except BaseException:
            self._posted.pop(call, None)
            raise
        finally:
            if self._draining and not self._posted:
                self._notify_drained()

    def _fail_posted(self) -> None:
        """Posted calls of this generation not collected by now (their completions
        did not run: a loop that stopped): decide their outcome here and have their
        completions deliver it.  Under the worker lock, before the channel closes."""
        from ..errors import InterpreterCrashedError

        with self._rx:
            left = list(self._posted.values())
            self._posted.clear()
            end = self._end
            for posted in left:
                if self.closed:
                    error = ManagerClosedError(
                        f"the manager was closed while interpreter {self.index} ran this call")
                else:
                    error = InterpreterCrashedError(
                        f"interpreter {self.index} was restarted before the reply to this call "
                        "was read", index=self.index)
                try:
                    if not end.taken(self._ends[posted.call]):
                        error = RequestNotSent(error)
                except (KeyError, ValueError):
                    pass
                posted.outcome = error
        for posted in left:
            posted.handed = True
            posted.completions.call_soon(lambda finish=posted.finish: finish(READY))

    def poke(self) -> bool:
        """Wake the interpreter if it sleeps waiting for requests (``Channel.poke``):
        it spins for the call about to be posted.  A no-op on the pipes
        (``MULTIPY_NATIVE=0``: the interpreter blocks in a read of its request
        pipe, which only a request ends) and while no generation runs; a channel
        closed or let go of answers ``False``.

        >>> manager._workers[0].poke()  # doctest: +SKIP
        True
        """
        end = self._end
        return end is not None and end.channel.poke()

    def cancel_posted(self, posted) -> None:
        """The caller of a posted call queued on the channel gave up on it (an
        ``acall`` cancelled): the interpreter skips it unrun unless it started it
        already (see :meth:`HostEnd.arm`).  Either way its reply, when it comes,
        is collected as usual and dropped by its caller."""
        end = self._end
        if end is None or not isinstance(posted, _Posted):
            return
        with self._rx:
            slot = self._slots.get(posted.call)
            if posted.call in self._posted and slot is not None:
                try:
                    end.cancel(slot)
                except ValueError:  # detached: over
                    pass

    def _abandon_posted(self, posted) -> None:
        """The completions stopped before collecting ``posted``: its reply, if one
        comes, is settled unread (channel) or by whoever reads the pipe next."""
        if posted is None:
            return
        with self._rx:
            call = posted.call
            if self._posted.pop(call, None) is not None and call in self._owed \
                    and self._end is not None:
                self._left.add(call)
        if self._draining and not self._posted:
            self._notify_drained()

    def _expire(self, posted, timeout):
        """At a posted call's deadline: a call still queued behind others on the
        channel is dropped unrun (the interpreter skips it when its turn comes:
        see :meth:`HostEnd.arm`) and the interpreter keeps running; a call that
        started is stopped the old way, by killing the interpreter."""
        call = posted.call
        end = self._end
        if end is not None and posted.outcome is None:
            with self._rx:
                slot = self._slots.get(call)
                if call in self._posted and slot is not None:
                    try:
                        if end.ready(slot):
                            return PENDING  # answered in time: its finish is on its way
                        skipped = end.cancel(slot)  # atomic against the interpreter's start
                    except ValueError:  # detached: this generation is over
                        skipped = False
                    if skipped:
                        self._posted.pop(call, None)
                        self._left.add(call)  # the interpreter's skip reply is settled unread
                        if self._draining and not self._posted:
                            self._notify_drained()
                        return CallTimeoutError(
                            f"call waited past its timeout of {timeout:g} s queued behind other "
                            f"calls on interpreter {self.index} and was dropped without running; "
                            "the interpreter keeps running. Raise call_timeout= (manager) or "
                            "timeout= (per call), or run fewer calls at once.")
        self._posted.pop(call, None)
        try:
            self._kill_for_timeout(timeout)
        except BaseException as exc:
            return exc

    def _send(self, op, args, drop, timeout, handles, posted=None) -> tuple[int, list[int]]:
        """Write the request (under the worker lock); returns its call id and the
        argument blocks it placed.  The call is owed from before the write, so
        whoever reads its reply recognises it (see _match)."""
        links = self._links
        if links.active and op != Op.CUDA_LINK:
            self._announce_links(links, timeout)
        encoder = self._encoder
        encoder.handles = handles
        # A skipped request's releases still apply in the interpreter (see _expire).
        freed = self._decoder.released_offsets() if self._freed else ()
        held = self._held
        if held.pending:  # arguments whose last host view died: reuse their blocks
            held.settle()
        try:  # Request's fields, binary or a plain tuple: see transport.messages
            data = encoder.encode_request(int(op), args, drop, freed)
        except BaseException:
            self._freed.extend(freed)  # nothing was sent: report them with the next request
            self._held.release(encoder.placed)
            raise
        finally:
            encoder.handles = None  # the session's: kept, they would keep its manager alive
            links.sent()
        placed = encoder.placed
        call = self._next_call = self._next_call + 1
        self._owed[call] = placed
        deadline = None
        if posted is None:
            self._callers[call] = get_ident()
        else:
            end = self._end
            if end is None:
                self._posted[call] = posted
            else:
                with self._bells.lock:  # against _collect clearing the bell meanwhile
                    self._posted[call] = posted
                    end.want_bell()  # before the request is published: its reply rings
                if posted.timeout is not None:
                    deadline = time.monotonic() + posted.timeout
        payload = _pack_id(call) + data  # messages.stamp, without the call
        end = self._end
        try:
            if end is None:
                write_frame(self._req_w, payload)
            else:
                # HostEnd.send's steps, the slot recorded as soon as it is claimed.
                slot = end.claim()
                if slot is None:
                    slot = end.retry(end.claim, self._settle_left)
                self._slots[call] = slot
                if posted is not None:
                    end.arm(slot, deadline)  # skipped unrun if cancelled or not started by then
                # HostEnd.post, inlined for a request that fits the ring (once per call)
                position = (end.channel.post(payload, slot) if len(payload) <= end.limit
                            else end.post(payload, slot))
                if not position:
                    position = end.retry(lambda: end.post(payload, slot) or None,
                                         self._settle_left)
                self._ends[call] = position
        except (BrokenPipeError, ConnectionResetError, ValueError):
            # Nobody reads the request pipe, or the channel is detached: the
            # interpreter died (or was stopped) and never saw the request.
            self._forget(call)
            self._held.release(placed)
            raise RequestNotSent(self._crashed("while idle, before this call was sent")) from None
        except BaseException:
            # A signal handler raised during the write, or just after it returned.
            self._callers.pop(call, None)
            self._posted.pop(call, None)
            if end is not None and len(payload) <= end.limit:
                # One ring post: all of it was sent or none (see _sweep).
                self._left.add(call)
            elif len(payload) + FRAME_HEADER <= select.PIPE_BUF and end is None:
                # A request this small goes in one atomic pipe write: all of it was
                # sent or none.  The next reply says which (see _resolve_unsure).
                self._unsure.add(call)
            else:
                # Part of the request may be in the pipe: the stream is out of step.
                self._out_of_step("a request was interrupted while it was being sent")
            raise
        return call, placed

    def _forget(self, call: int) -> None:
        self._owed.pop(call, None)
        self._callers.pop(call, None)
        self._posted.pop(call, None)
        self._ends.pop(call, None)
        slot = self._slots.pop(call, None)
        if slot is not None:
            try:
                self._end.release(slot)
            except ValueError:
                pass

    def _settle_left(self) -> None:
        """Every reply slot is taken or the ring is full (see HostEnd.retry): settle
        what callers who left still hold.  Under the worker lock, so other senders
        wait behind it; rare (channel.SLOTS calls in flight)."""
        with self._rx:
            if self._left:
                self._sweep(0)

    def _match(self, call: int, frame: bytes):
        """The reply in ``frame`` if it answers ``call``, else ``None`` once the reply
        is kept for its waiting caller, or settled (its caller left).  A reply nobody
        owes is corruption.  Pipes only; under ``_rx``."""
        reply = self._parse(frame)
        if self._unsure:
            self._resolve_unsure(reply.call)
        other = reply.call
        if other == call:
            del self._owed[call]
            return reply
        if other in self._callers or other in self._posted:
            self._stash[other] = reply  # its caller takes it when it gets _rx
            return None
        placed = self._owed.pop(other, None)
        if placed is None:
            raise self._desynchronised(f"a reply to call {other} came while call {call} waited")
        self._settle(None, reply, placed)  # nobody waits for it: blocks freed, value unread
        return None

    def _resolve_unsure(self, answered: int) -> None:
        """Replies come in request order: a call whose write was interrupted and
        that has no reply before the reply to ``answered`` never reached the
        interpreter, so its argument blocks are free again."""
        for unsure in sorted(self._unsure):
            if unsure > answered:
                break
            self._unsure.discard(unsure)
            if unsure < answered:
                placed = self._owed.pop(unsure, ())
                self._held.release(placed)

    def _next_frame(self, deadline, timeout, starting: bool) -> bytes:
        """The next reply frame, waiting until ``deadline`` (monotonic; ``None``: no limit)."""
        reader = self._reader
        if not reader.buffered:
            # Spin for the reply only while no other host thread is in a call, whether
            # it waits for a reply or for this worker's lock (the pipes carry one call
            # at a time): every poll(0) of a spin gives the GIL up and takes it back,
            # and each time another thread may take it first.
            # Without a deadline the read below is the wait: one GIL release.
            ready = self._waiter.wait(
                None if deadline is None else max(0.0, deadline - time.monotonic()),
                spin=len(in_calls) <= 1, block=False)
            if not ready:
                self._kill_for_timeout(timeout)
        return self._read_frame(starting)

    def _read_frame(self, starting: bool) -> bytes:
        """Read one reply frame: buffered, readable now, or (without a deadline) the
        blocking read is the wait."""
        try:
            frame = self._reader.read()
        except (BrokenPipeError, ConnectionResetError):
            frame = None
        except FrameError as exc:
            raise self._desynchronised(exc) from None
        except BaseException:
            if self._reader.partial:  # else interrupted while waiting: the call stays owed
                self._out_of_step("a reply was interrupted while it was being read")
            raise
        if frame is None:
            raise self._crashed("while starting" if starting else "while running a call")
        return frame

    def _settle(self, op, reply, placed: list[int]):
        """Decode ``reply`` and release the argument blocks of its call.  ``op`` is
        ``None`` for the reply of a call whose caller left: its value is not
        unpickled (no user code runs for it), its result blocks are freed.
        ``reply`` is a :class:`~multipy.transport.messages.Reply` or a plain tuple
        of its fields (``unpack_fast_reply``): read by index."""
        _, encoded, error, pinned, unpinned, output, blocks = reply
        if output:
            self._out.drain()
            self._err.drain()
        value = None
        try:
            if op is None:
                self._freed.extend(blocks)
            elif encoded is not None:
                # Decoded before this call's argument blocks are released: a result can
                # be a view of one (handed back by reference), which then stays held.
                value = self._decoder.decode(encoded)
        except Exception as exc:
            raise TransportError(
                f"the result of {Op(op).name.lower()} in interpreter {self.index} could not be "
                f"rebuilt in the host: {exc}. Types defined inside a package exist only in "
                "the interpreters; return plain values or tensors, or keep an Obj handle.") from exc
        finally:
            self._links.received()
            self._held.release(placed, pinned, unpinned)
        return value, error

    def _out_of_step(self, why: str) -> None:
        """The request and reply streams may no longer match: restart the interpreter."""
        self._stop()
        self._mark_lost(why)

    def _mark_lost(self, why: str) -> None:
        """Record once per generation that the interpreter is gone (any thread)."""
        if not self._lost:
            self._lost = True
            self.mark_dead(why)

    def _announce_links(self, links: HostLinks, timeout) -> None:
        """Have the interpreter map CUDA link buffers made or grown since the last call.
        If it cannot, CUDA tensors keep crossing by per-tensor IPC."""
        announcements = links.announcements()
        if announcements:
            # Mapping takes milliseconds; a tight per-call timeout is for the call itself.
            timeout = None if timeout is None else max(timeout, _LINK_TIMEOUT)
            _, error = self._exchange(Op.CUDA_LINK, (announcements,), (), timeout)
            if error is not None:
                links.disable(f"interpreter {self.index} could not map them: "
                              f"{error.type_name}: {error.message}")

    def _desynchronised(self, why) -> TransportError:
        """The reply stream is corrupt: the interpreter cannot be trusted to be in step."""
        pid = self.pid
        self._stop()
        self._mark_lost(f"its reply stream was corrupt ({why})")
        return TransportError(
            f"interpreter {self.index} (pid {pid}) sent a corrupt reply ({why}); it was killed "
            "and will be restarted")

    def _kill_for_timeout(self, timeout: float):
        pid = self.pid
        self._stop()
        self._mark_lost("timed out")
        raise CallTimeoutError(
            f"call on interpreter {self.index} (pid {pid}) ran past its timeout of {timeout:g} s; "
            "the interpreter was killed and will be restarted. Raise call_timeout= (manager) or "
            "timeout= (per call) if the work is expected to take longer.")

    def _crashed(self, while_: str):
        """The error for a call the interpreter did not answer because it is gone.
        Every call in flight gets one (each its own); the first marks the
        interpreter dead, which restarts it once they have all left."""
        pid = self.pid
        exitcode = self._exit_code()
        self._stop()
        if self._server_key and self._server_key[0]:
            # Forked from a server with shared imports: did they make it unsafe?  (Or
            # did another interpreter find that out and stop the server under it?)
            config = self.config
            why = _UNSAFE_EXITS.get(exitcode) or _forkserver.why_not_shared(
                config.shared_imports, config.sys_path)
            if why is not None:
                return _ForkUnsafe(why)
        if self.closed:
            return ManagerClosedError(
                f"the manager was closed while interpreter {self.index} was running this call")
        error = describe_exit(self.index, pid, exitcode, while_)
        self._mark_lost(str(error))
        return error

    def _exit_code(self):
        """The process's exit code (waiting up to 5 s for it to end), found once."""
        with self._exit_lock:
            if self._exit is None:
                process = self._process
                code = None
                if process is not None:
                    try:
                        process.join(5)
                        code = process.exitcode
                    except ValueError:  # closed already
                        pass
                self._exit = (code,)
            return self._exit[0]

    def adopt_movable(self, payload):
        """The movable's tensors are in a segment this interpreter holds: the host
        opens it too (through /proc), so the movable outlives the interpreter."""
        if payload.segment is None:
            return payload, None
        pid, fd, inode = payload.segment
        own = open_descriptor(pid, fd, inode)
        return MovablePayload(payload.data, (os.getpid(), own, inode)), own

    def _stop(self) -> None:
        """Kill the interpreter and close its channel, from any thread, closing no
        descriptor: every call in flight wakes up (end-of-file, DEAD or CLOSED) and
        its caller leaves; :meth:`_terminate` closes the descriptors once they have.
        (Closing one under a caller would make it read a closed descriptor, EBADF,
        or, once the number is reused, another one.)"""
        process = self._process
        if process is not None:
            try:
                process.kill()
            except (OSError, ValueError):  # already gone, or closed
                pass
        end = self._end
        if end is not None:
            try:
                end.stop()
            except ValueError:  # detached: over already
                pass

    _stop_in_flight = _stop  # close(): callers in flight raise ManagerClosedError

    def _terminate(self, *, kill: bool) -> None:
        """End this generation: stop the interpreter (``kill``) or let it exit by
        itself, wait for every caller in flight to leave, then close everything.
        Under the worker lock."""
        process = self._process
        if process is None:
            return
        if kill:
            self._stop()
        if not self._drain(_CALLERS_LEAVE):
            self._stop()
            self._drain(_CALLERS_LEAVE)
        if self._posted and self._end is not None:
            self._fail_posted()
        if self._bells is not None:
            self._bells.retired = True  # its calls have their outcome: no more watches
        self._process = None
        if self._end is not None:
            self._end.close()  # wakes the interpreter, which exits
        try:
            os.close(self._req_w)  # end-of-file: a healthy worker exits by itself
        except OSError:
            pass
        process.join(0 if kill else 5)
        if process.is_alive():
            process.kill()
            process.join(5)
        try:
            os.close(self._rep_r)
        except OSError:
            pass
        if self._end is not None:
            bell, self._end.bell_r = self._end.bell_r, -1  # never read a reused number
            try:
                os.close(bell)
            except OSError:
                pass
        for pump in (self._out, self._err):
            pump.join(1)
        self._args.segment.close()
        self._results.close()
        self._links.close()
        process.close()


class _Posted:
    """A posted call in flight (:meth:`ProcessWorker._post`) until it is collected:
    ``handed`` once the bell watch scheduled its finish, ``outcome`` an error decided
    for it by another thread (its interpreter was replaced before it was collected)."""

    __slots__ = ("op", "call", "placed", "completions", "finish", "handed", "outcome", "timeout")

    def __init__(self, op, completions, finish, timeout) -> None:
        self.op = op
        self.call = None
        self.placed = None
        self.completions = completions
        self.finish = finish
        self.handed = False
        self.outcome = None
        self.timeout = timeout


def _worker_entry(config, fds, check_fork):
    if check_fork:
        from ._shared_imports import fork_problem

        problem = fork_problem()
        if problem is not None:
            os._exit(problem)  # at once: nothing may run in a child of an unsafe fork
    from ._process_main import main

    main(config, tuple(f.detach() if hasattr(f, "detach") else f for f in fds))


class ProcessBackend(Backend):
    """Creates :class:`ProcessWorker` interpreters."""

    kind = BackendKind.PROCESS

    def __init__(self) -> None:
        self._ctx = worker_context()

    @staticmethod
    def warm() -> None:
        """Start the plain fork server now (it lives as long as the host, like the stdlib's)."""
        if _forkserver.available():
            _forkserver.ensure_running(_forkserver.PLAIN)

    def create_worker(self, config: WorkerConfig) -> Worker:
        return ProcessWorker(config, self._ctx)
