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
import os
import select
import sys
import threading
import time
from multiprocessing import reduction, spawn

from ..errors import CallTimeoutError, ManagerClosedError, TransportError
from ..transport import channel as _channel
from ..transport.codec import Decoder, Encoder
from ..transport.cuda_link import HostLinks
from ..transport.frames import FRAME_HEADER, FrameError, FrameReader, Waiter, write_frame
from ..transport.messages import CALL_ID, MovablePayload, Op, parse_reply
from ..transport.shm import Arena, BlockViews, Segment, open_descriptor
from . import _forkserver
from .base import (PENDING, Backend, BackendKind, RequestNotSent, Worker, WorkerConfig, describe_exit, drain,
                   no_start)
from .completions import READY

_pack_id = CALL_ID.pack
ARENA_BYTES = 1 << 22  # grows on demand; pages are only touched when used
_LINK_TIMEOUT = 30.0   # seconds an interpreter may take to map a CUDA link
_PRELOAD = ["multipy.backends._process_main", "numpy", "torch"]


class _Fd:
    """An inherited file descriptor in a Process's arguments."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        return (_identity, (reduction.DupFd(self.fd),))


def _identity(x):
    return x


_starting = threading.local()
_waiting = 0  # host threads waiting for a reply now
_waiting_lock = threading.Lock()


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
        self._freed: collections.deque = collections.deque()
        self._pins: set[int] = set()

    def _launch(self) -> None:
        self._terminate(kill=True)
        req_r, self._req_w = os.pipe()
        self._rep_r, rep_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self._args = Arena(Segment.create(ARENA_BYTES, name=f"multipy-args-{self.index}"))
        self._results = Segment.create(ARENA_BYTES, name=f"multipy-results-{self.index}")
        self._freed = collections.deque()
        self._pins = set()
        self._args_lock = threading.RLock()  # reentrant: a GC finalizer may run inside it
        generation = self.generation
        freed = self._freed
        self._encoder = Encoder(self._args, returnable=self._results, reuse_arena=True)
        # Argument blocks that host results view (results handed back by reference).
        # The release binds this generation's arena: a result may outlive a restart.
        pins, arena = self._pins, self._args
        self._held = BlockViews(lambda off: None if off in pins else arena.free(off),
                                self._args_lock)
        self._decoder = Decoder(self._results, own=self._args.segment, own_cuda=True,
                                on_release=lambda off: freed.append(off) if self.generation == generation else None,
                                on_return=self._held.add)
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
        self._next_call = 0
        self._owed: dict[int, list[int]] = {}  # call id -> argument blocks, reply not read yet
        self._unsure: set[int] = set()  # owed calls whose write was interrupted: sent or not?
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
        try:
            reply = self._reply_for(call, timeout, starting)
        except BaseException:
            if self._process is not None and self._links.active:
                # The next call reuses the CUDA link buffers that this one may still be
                # reading in the interpreter: only a fresh interpreter is safe.
                self._out_of_step("a call using CUDA link buffers was interrupted")
            raise
        return self._settle(op, reply, placed)

    _roundtrip = _exchange  # the Worker step, without a call in between

    # -- posted requests (Worker.post): the completion thread reads the reply ----
    def _post(self, op, args, drop, timeout, handles, completions, finish):
        if self._end is not None:
            self._end.want_bell()  # before the request is published: its reply rings
        call, placed = self._send(op, args, drop, timeout, handles)
        posted = (op, call, placed, completions, finish)
        self._arm(posted)
        return posted

    def _arm(self, posted) -> None:
        """Have the completion thread run ``finish`` once a reply frame can be read."""
        completions, finish = posted[3], posted[4]
        end = self._end
        if end is not None:
            # Emptied before looking at the slot: a reply published after the look
            # rings the bell again, so the watch below cannot miss it.
            end.drain_bell()
            if end.bell_closed or end.channel.ready(end.order[0]):
                completions.call_soon(lambda: finish(READY))
            else:
                completions.watch(end.bell_r, finish)
            return
        if self._reader.buffered:
            completions.call_soon(lambda: finish(READY))
        else:
            completions.watch(self._rep_r, finish)

    def _collect(self, posted):
        op, call, placed, _, _ = posted
        end = self._end
        while end is not None:
            try:
                frame = end.poll_frame()
            except (OSError, ValueError):  # closed under us: the manager is closing
                raise self._crashed("while running a call") from None
            if frame is None:
                end.drain_bell()
                if end.bell_closed or self._process is None:
                    raise self._crashed("while running a call")
                self._arm(posted)
                return PENDING
            reply = self._match(call, frame)
            if reply is not None:
                return self._settle(op, reply, placed)
        while True:  # a frame is there: the completion ran because the pipe was readable
            reply = self._match(call, self._read_frame(False))
            if reply is not None:
                return self._settle(op, reply, placed)
            if not self._reader.buffered and not self._waiter.poller.poll(0):
                # That was the reply of an earlier call whose caller left; ours is not here yet.
                self._arm(posted)
                return PENDING

    def _expire(self, posted, timeout):
        try:
            self._kill_for_timeout(timeout)
        except BaseException as exc:
            return exc

    def _send(self, op, args, drop, timeout, handles) -> tuple[int, list[int]]:
        """Write the request; returns its call id and the argument blocks it placed."""
        links = self._links
        if links.active and op != Op.CUDA_LINK:
            self._announce_links(links, timeout)
        encoder = self._encoder
        encoder.handles = handles
        freed = drain(self._freed) if self._freed else ()
        try:  # a plain tuple of Request's fields: see transport.messages
            data = encoder.encode((int(op), args, drop, freed), "request")
        except BaseException:
            self._freed.extend(freed)  # nothing was sent: report them with the next request
            with self._args_lock:
                self._release_placed(encoder.placed, ())
            raise
        finally:
            encoder.handles = None  # the session's: kept, they would keep its manager alive
            links.sent()
        placed = encoder.placed
        call = self._next_call = self._next_call + 1
        # Owed from before the write: from then on, whatever is raised, the reply to
        # `call` is recognised and settled by whoever reads it (see _match).
        self._owed[call] = placed
        payload = _pack_id(call) + data  # messages.stamp, without the call
        try:
            if self._end is None:
                write_frame(self._req_w, payload)
            elif not self._end.send(payload):
                self._out_of_step("too many abandoned calls were still in its channel")
                raise BrokenPipeError
        except (BrokenPipeError, ConnectionResetError):
            # Nobody reads the request pipe: the interpreter died while idle and never saw it.
            self._owed.pop(call, None)
            with self._args_lock:
                self._release_placed(placed, ())
            raise RequestNotSent(self._crashed("while idle, before this call was sent")) from None
        except BaseException:
            # A signal handler raised during the write, or just after it returned.
            if len(payload) + FRAME_HEADER <= select.PIPE_BUF:
                # A request this small goes in one atomic write (a pipe write of at most
                # PIPE_BUF bytes, or one ring post): all of it was sent or none.  The
                # next reply says which (see _resolve_unsure).
                self._unsure.add(call)
            else:
                # Part of the request may be in the pipe: the stream is out of step.
                self._out_of_step("a request was interrupted while it was being sent")
            raise
        return call, placed

    def _reply_for(self, call: int, timeout, starting: bool):
        """Wait for the reply to ``call``: the one place where replies meet callers.

        Replies come back in request order.  One carrying an earlier id in
        ``_owed`` belongs to a call whose caller gave up waiting (a signal
        handler raised, e.g. Ctrl-C): it is settled (its blocks freed, its value
        dropped) and never returned.  Any other id means the stream is out of
        step: the interpreter is killed and restarted.  An exception raised
        while waiting leaves ``call`` owed; one raised while a frame was being
        read (its bytes half consumed) restarts the interpreter.  (One raised in
        the few bytecodes between reading the reply to ``call`` and returning it
        leaves that call's argument blocks allocated until the next restart: a
        leak, never a wrong answer.)
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        next_frame = self._next_channel_frame if self._end is not None else self._next_frame
        while True:
            reply = self._match(call, next_frame(deadline, timeout, starting))
            if reply is not None:
                return reply

    def _match(self, call: int, frame: bytes):
        """The reply in ``frame`` if it answers ``call``, else ``None`` once the reply
        (of a call whose caller left) is settled; a reply nobody owes is corruption."""
        try:
            reply = parse_reply(frame)
        except TransportError as exc:
            raise self._desynchronised(exc) from None
        if self._unsure:
            self._resolve_unsure(reply.call)
        if reply.call == call:
            del self._owed[call]
            return reply
        placed = self._owed.pop(reply.call, None)
        if placed is None:
            raise self._desynchronised(
                f"a reply to call {reply.call} came while call {call} waited")
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
                with self._args_lock:
                    self._release_placed(placed, ())

    def _next_frame(self, deadline, timeout, starting: bool) -> bytes:
        """The next reply frame, waiting until ``deadline`` (monotonic; ``None``: no limit)."""
        if self._end is not None:
            return self._next_channel_frame(deadline, timeout, starting)
        reader = self._reader
        if not reader.buffered:
            # Spin for the reply only while no other host thread is waiting on an
            # interpreter: a spinning thread takes the GIL back on every poll, and with
            # many callers that starves the threads doing real work.
            global _waiting
            with _waiting_lock:
                _waiting += 1
                alone = _waiting == 1
            try:
                ready = self._waiter.wait(
                    None if deadline is None else max(0.0, deadline - time.monotonic()),
                    spin=alone)
            finally:
                with _waiting_lock:
                    _waiting -= 1
            if not ready:
                self._kill_for_timeout(timeout)
        return self._read_frame(starting)

    def _read_frame(self, starting: bool) -> bytes:
        """Read one reply frame (buffered, or readable now)."""
        try:
            frame = self._reader.read()
        except (BrokenPipeError, ConnectionResetError):
            frame = None
        except FrameError as exc:
            raise self._desynchronised(exc) from None
        except BaseException:
            self._out_of_step("a reply was interrupted while it was being read")
            raise
        if frame is None:
            raise self._crashed("while starting" if starting else "while running a call")
        return frame

    def _next_channel_frame(self, deadline, timeout, starting: bool) -> bytes:
        """:meth:`_next_frame` through the call channel (transport.channel)."""
        end = self._end
        try:
            frame = end.next_frame(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except FrameError as exc:  # a spilled reply with a corrupt header
            raise self._desynchronised(exc) from None
        except (OSError, ValueError):
            frame = None  # the channel was closed under this wait (the manager is closing)
        if frame is _channel.Wait.TIMEOUT:
            self._kill_for_timeout(timeout)
        if frame is None:
            try:
                unsent = end.unsent
            except ValueError:  # detached: this generation is over already
                unsent = False
            if unsent and not starting:
                # The interpreter died while idle and never took this call.
                raise RequestNotSent(self._crashed("while idle, before this call was sent"))
            raise self._crashed("while starting" if starting else "while running a call")
        return frame

    def _settle(self, op, reply, placed: list[int]):
        """Decode ``reply`` and release the argument blocks of its call.  ``op`` is
        ``None`` for the reply of a call whose caller left: its value is not
        unpickled (no user code runs for it), its result blocks are freed."""
        if reply.output:
            self._out.drain()
            self._err.drain()
        value = None
        try:
            if op is None:
                self._freed.extend(reply.blocks)
            elif reply.value is not None:
                # Decoded before this call's argument blocks are released: a result can
                # be a view of one (handed back by reference), which then stays held.
                value = self._decoder.decode(reply.value)
        except Exception as exc:
            raise TransportError(
                f"the result of {Op(op).name.lower()} in interpreter {self.index} could not be "
                f"rebuilt in the host: {exc}. Types defined inside a package exist only in "
                "the interpreters; return plain values or tensors, or keep an Obj handle.") from exc
        finally:
            self._links.received()
            with self._args_lock:
                for offset in reply.unpinned:
                    self._pins.discard(offset)
                    self._free_arg(offset)
                # _release_placed, inlined (once per call)
                pins, held, arena = self._pins, self._held, self._args
                if reply.pinned:
                    pins.update(reply.pinned)
                for offset in placed:
                    if offset not in held and offset not in pins:
                        arena.free(offset)
        return value, reply.error

    def _out_of_step(self, why: str) -> None:
        """The request and reply streams may no longer match: restart the interpreter."""
        self._terminate(kill=True)
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

    def _release_placed(self, placed: list[int], pinned: tuple) -> None:
        """Free this call's argument blocks, except those the interpreter still uses
        (``pinned``) and those a host result views (``_held``).  Under ``_args_lock``."""
        self._pins.update(pinned)
        for offset in placed:
            self._free_arg(offset)

    def _free_arg(self, offset: int) -> None:
        if offset not in self._held and offset not in self._pins:
            self._args.free(offset)

    def _desynchronised(self, why) -> TransportError:
        """The reply stream is corrupt: the interpreter cannot be trusted to be in step."""
        pid = self.pid
        self._terminate(kill=True)
        self.mark_dead(f"its reply stream was corrupt ({why})")
        return TransportError(
            f"interpreter {self.index} (pid {pid}) sent a corrupt reply ({why}); it was killed "
            "and will be restarted")

    def _kill_for_timeout(self, timeout: float):
        pid = self.pid
        self._terminate(kill=True)
        self.mark_dead("timed out")
        raise CallTimeoutError(
            f"call on interpreter {self.index} (pid {pid}) ran past its timeout of {timeout:g} s; "
            "the interpreter was killed and will be restarted. Raise call_timeout= (manager) or "
            "timeout= (per call) if the work is expected to take longer.")

    def _crashed(self, while_: str):
        process = self._process
        pid = self.pid
        exitcode = None
        if process is not None:
            process.join(5)
            exitcode = process.exitcode
        self._terminate(kill=True)
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
        self.mark_dead(str(error))
        return error

    def adopt_movable(self, payload):
        """The movable's tensors are in a segment this interpreter holds: the host
        opens it too (through /proc), so the movable outlives the interpreter."""
        if payload.segment is None:
            return payload, None
        pid, fd, inode = payload.segment
        own = open_descriptor(pid, fd, inode)
        return MovablePayload(payload.data, (os.getpid(), own, inode)), own

    def _stop_in_flight(self) -> None:
        # Only the process is killed: the caller waiting on the reply pipe sees
        # end-of-file and raises ManagerClosedError (see _crashed).  Closing the pipe
        # here instead would pull the descriptor from under that caller: it would
        # read a closed descriptor (EBADF) or, once the number is reused, another one.
        process = self._process
        if process is not None:
            try:
                process.kill()
            except (OSError, ValueError):  # already gone, or closed by the caller
                pass

    def _terminate(self, *, kill: bool) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if self._end is not None:
            self._end.close()  # wakes the interpreter, which exits; and any waiting caller
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
