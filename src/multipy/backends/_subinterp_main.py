"""The serving loop of the ``subinterpreter`` backend: runs inside each subinterpreter.

::

    host driver thread                 subinterpreter (own GIL)
    ------------------                 ------------------------------------------
    exec(boot)  ───────────────────▶   start(): sys.path, interpreter id, state
    exec("_multipy_loop()") ───────▶   loop(): read frame ◀── request pipe
                                         InterpreterState.handle(op, args, drop)
                                         write frame ──▶ reply pipe
                                         ... until end-of-file on the request pipe
          ◀── WantBuffers / WantArena    (returns to the host thread to take
    exec(loop, shared=...) ────────▶      shared buffers or a bigger arena, resumes)

    watchdog thread (in the subinterpreter): interrupt pipe ─▶ CallInterrupted
    raised in the serving thread, only while a call runs.

Between requests the loop waits with its own GIL released: on the call
channel (spin, then ``FUTEX_WAIT``) where the host has one, else in ``os.read``
on the request pipe.  numpy and torch are never imported here; an ``import torch`` in user
code fails at once with the reason (:class:`_RefuseNative`).
"""

from __future__ import annotations

import ctypes
import importlib.abc
import os
import pickle
import select
import sys
import threading

from .._current import set_process_interpreter
from ..errors import BackendUnavailableError, TransportError
from ..interp.state import InterpreterState, capture_exception
from ..transport.frames import Waiter
from ..transport import subinterp_wire as wire
from ..transport.codec import FAST_CALL, Decoder, Encoder

#: Top-level modules whose C extensions cannot load in an isolated subinterpreter.
REFUSED = ("torch", "numpy")
_REASON = ("{name} cannot be imported in a subinterpreter: its C extension does not support "
           "isolated (own-GIL) interpreters yet. Use InterpreterManager(..., backend='process') "
           "for work that needs {name}; the subinterpreter backend runs pure-Python code only.")


class WantBuffers(Exception):
    """Raised out of :func:`loop` so the host thread re-enters it with the
    request's shared buffers (``_multipy_in``); the message is its call number."""


class WantArena(Exception):
    """Raised out of :func:`loop` so the host thread re-enters it with a bigger
    arena (``_multipy_arena``); the message is the size needed."""


class CallInterrupted(BaseException):
    """Raised inside a call that ran past its timeout (a ``BaseException`` so
    that ``except Exception`` in user code does not swallow it)."""


class _RefuseNative(importlib.abc.MetaPathFinder):
    """Fails ``import torch`` / ``import numpy`` with the reason, before any of
    their code runs."""

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top in REFUSED:
            raise ModuleNotFoundError(_REASON.format(name=top), name=fullname)
        return None


def _refuse_package(path: str):
    raise BackendUnavailableError(
        f"torch cannot be imported in a subinterpreter, so the torch.package archive {path!r} "
        "cannot be opened here (torch's C extension does not support isolated, own-GIL "
        "interpreters yet). Use InterpreterManager(..., backend='process') for torch models; "
        "the subinterpreter backend runs pure-Python code only.")


_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)
_set_async_exc.restype = ctypes.c_int

_server: "_Server | None" = None


def _op_name(op) -> str:
    from ..transport.messages import Op

    try:
        return Op(op).name.lower()
    except ValueError:
        return str(op)


def start(index: int, fds: tuple, spin: float = 200e-6) -> None:
    """Set this subinterpreter up to serve the host (run once, by the boot code);
    ``spin``: seconds the loop polls for the next request before sleeping."""
    global _server
    set_process_interpreter(index)
    sys.meta_path.insert(0, _RefuseNative())
    state = InterpreterState(index, importer_factory=_refuse_package)
    state.activate_for_process()
    _server = _Server(state, *fds, spin=spin)


def loop() -> None:
    """Serve requests until the host closes the request pipe (or the channel).

    Raises :class:`WantBuffers` / :class:`WantArena` to get something from
    the host thread; the host re-enters with it and the loop resumes.
    """
    namespace = sys.modules["__main__"].__dict__
    server = _server
    server.ident = threading.get_ident()
    arena = namespace.pop("_multipy_arena", None)
    if arena is not None:
        server.arena = arena
    memory = namespace.pop("_multipy_channel", None)
    if memory is not None and server.end is None:  # the first entry: the call channel
        from ..transport.channel import InterpreterEnd
        from .._native import Channel

        server.end = InterpreterEnd(Channel(memory), server.req_r, server.rep_w, server.spin,
                                    server.bell_w, memory)
    server.resume(namespace.pop("_multipy_in", None))
    server.run()


def shutdown() -> None:
    """Stop the watchdog thread (the interpreter can then be destroyed)."""
    if _server is not None:
        _server.stop_watchdog()


class _Server:
    def __init__(self, state: InterpreterState, req_r: int, rep_w: int, intr_r: int,
                 bell_w: int = -1, *, spin: float = 200e-6) -> None:
        self.state = state
        self.index = state.index
        self.req_r = req_r
        self.rep_w = rep_w
        self.intr_r = intr_r
        self.bell_w = bell_w
        self.spin = spin         # seconds the loop polls for the next request before sleeping
        self.end = None          # the call channel's InterpreterEnd, where the host has one
        self.slot = 0            # the channel slot of the call being served
        self.arena = memoryview(b"")
        self.ident = threading.get_ident()
        self.stash = None        # (seq, payload) of a request waiting for its buffers
        self.pending = None      # (seq, payload, oob) of a reply waiting for a bigger arena
        self.dumper = wire.Dumper(wire.dispatch_table(results=True))
        self.encoder = Encoder(None)  # the binary forms of the common call (wire.fast_value)
        self.decoder = Decoder(None)
        self.lock = threading.Lock()
        self.active = None       # the call number running now, or None
        self.fired = False       # an interrupt was raised in the serving thread (not yet disarmed)
        self.started = 0         # the last call number that started
        self.cancelled: set = set()  # calls interrupted before they started: they never run
        self.cancel_all = False  # the host stops: no queued call runs any more
        self._quit_r, self._quit_w = os.pipe()
        self._watchdog = threading.Thread(target=self._watch, name="multipy-watchdog")
        self._watchdog.start()

    # -- the loop ------------------------------------------------------------
    def run(self) -> None:
        if self.end is not None:
            self._run_channel()
            return
        waiter = Waiter(self.req_r, self.spin)  # spin, then sleep: see transport.frames.Waiter
        while True:
            waiter.wait()
            header = wire.read_exact(self.req_r, wire.REQUEST.size)
            if header is None:
                return  # the host closed the request pipe
            size, seq, nbufs = wire.REQUEST.unpack(header)
            payload = wire.read_exact(self.req_r, size) if size else b""
            if payload is None:
                return
            if nbufs:
                self.stash = (seq, payload)
                raise WantBuffers(seq)
            self.serve(seq, payload, ())

    def _run_channel(self) -> None:
        """The loop on the call channel: wait (spin, then FUTEX_WAIT with this
        interpreter's GIL released) for a request; its frame is the pipe's."""
        next_request = self.end.next_request
        head = wire.REQUEST.size
        unpack = wire.REQUEST.unpack_from
        serve = self.serve
        while True:
            request = next_request()
            if request is None:
                return  # the host closed the channel or its request pipe
            self.slot, data = request
            size, seq, nbufs = unpack(data)
            payload = memoryview(data)[head:head + size]
            if nbufs:
                self.stash = (seq, payload)
                raise WantBuffers(seq)
            serve(seq, payload, ())

    def resume(self, incoming) -> None:
        if self.stash is not None:
            (seq, payload), self.stash = self.stash, None
            self.serve(seq, payload, incoming or ())
        elif self.pending is not None:
            self.send(force=True)  # the host thread waited until the arena was free

    def serve(self, seq: int, payload, buffers) -> None:
        op = None
        try:
            if payload[0] == FAST_CALL:
                op, args, drop, _ = self.decoder.decode(payload)
            else:
                op, args, drop = pickle.loads(payload, buffers=buffers)
        except Exception as exc:
            result, error = None, TransportError(
                f"the arguments could not be rebuilt in interpreter {self.index}: "
                f"{type(exc).__name__}: {exc}. Types passed by value must be importable in the "
                "interpreter (on the environment's sys.path or registered with "
                "register_module_source), or pass an Obj handle instead.")
        else:
            del payload, buffers
            result, error = self._run(seq, op, args, drop)
            del args
        self.reply(seq, op, result, error)

    def _run(self, seq: int, op, args, drop):
        result = error = None
        with self.lock:
            # The host may cancel a queued call it armed until it starts: one
            # compare-and-swap on its slot decides (HostEnd.arm).
            if self.cancel_all or seq in self.cancelled or not (
                    self.end is None or self.end.channel.begin(self.slot)):
                self.cancelled.discard(seq)
                self.state.release(drop)  # the host's releases still apply
                return None, CallInterrupted(f"call {seq} was interrupted before it started")
            self.active = self.started = seq
        try:
            result = self.state.handle(op, args, drop)
        except BaseException as exc:  # every failure goes back to the caller
            error = exc
        while True:  # an interrupt may land until the call is disarmed
            try:
                self._disarm()
                break
            except CallInterrupted as exc:
                error = exc
        return result, error

    def _disarm(self) -> None:
        with self.lock:
            self.active = None
            if self.fired:
                self.fired = False
                _set_async_exc(self.ident, ctypes.py_object())  # drop one not yet delivered

    def reply(self, seq: int, op, result, error) -> None:
        if error is None:
            payload = wire.fast_value(self.encoder, result)
            if payload is not None:  # the binary form: nothing out of band
                self._write([wire.REPLY.pack(len(payload), seq, 0), payload])
                return
        remote = capture_exception(error) if error is not None else None
        del error
        try:
            payload, oob = self.dumper.dumps((result, remote))
        except Exception as exc:
            name = _op_name(op)
            remote = capture_exception(TransportError(
                f"the result of {name} in interpreter {self.index} ({type(result).__name__}) "
                f"cannot cross to the host: {type(exc).__name__}: {exc}. Return plain values "
                "(numbers, str, bytes, containers, picklable objects) or keep an Obj handle."))
            payload, oob = self.dumper.dumps((None, remote))
        del result
        self.pending = (seq, payload, oob)
        self.send()

    def send(self, force: bool = False) -> None:
        seq, payload, oob = self.pending
        arena = self.arena
        if oob:
            need = wire.ARENA_HEAD + sum(wire.align(memoryview(b).nbytes) for b in oob)
            # Too small, or the host still copies out the buffers of an earlier reply
            # (several calls are in flight): the host thread waits for it, then re-enters.
            if need > len(arena) or (arena[0] and not force):
                raise WantArena(str(need))  # the reply stays pending
            arena[0] = 1  # the host clears it once it has copied these buffers out
        self.pending = None
        slots = []
        position = wire.ARENA_HEAD
        for buffer in oob:
            raw = buffer.raw()
            arena[position:position + raw.nbytes] = raw
            slots.append(wire.SLOT.pack(position, raw.nbytes))
            position += wire.align(raw.nbytes)
        self._write([wire.REPLY.pack(len(payload), seq, len(slots)), payload, *slots])

    def _write(self, parts: list) -> None:
        """Send one reply frame, given as its parts: in the call's reply slot on the
        channel (over the reply pipe when too big for it), or on the reply pipe."""
        if self.end is not None:
            self.end.answer(self.slot, b"".join(parts))
        else:
            wire.write_all(self.rep_w, parts)

    # -- timeouts ------------------------------------------------------------
    def _watch(self) -> None:
        while True:
            ready, _, _ = select.select([self.intr_r, self._quit_r], [], [])
            if self._quit_r in ready:
                return
            data = wire.read_exact(self.intr_r, wire.SEQ.size)
            if data is None:
                return
            (seq,) = wire.SEQ.unpack(data)
            with self.lock:
                if seq == 0:
                    self.cancel_all = True
                elif seq > self.started:  # queued behind other calls: it will not start
                    self.cancelled.add(seq)
                if self.active is not None and seq in (0, self.active):
                    self.fired = True
                    _set_async_exc(self.ident, CallInterrupted)

    def stop_watchdog(self) -> None:
        os.write(self._quit_w, b"q")
        self._watchdog.join()
        os.close(self._quit_r)
        os.close(self._quit_w)
