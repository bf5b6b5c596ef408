"""The worker loop of the ``process`` backend: runs inside the interpreter process.

::

    read frame ─▶ call id, Request ─▶ decode args (tensors viewed in the args arena)
        ─▶ InterpreterState.handle ─▶ encode value (tensors copied to the results arena)
        ─▶ call id, Reply{value, error, pinned, unpinned, output, blocks} ─▶ write frame

Every reply carries the call id of the request it answers, even when the
request could not be decoded (a frame too short to hold an id is answered as
call 0, which the host never uses: it then restarts the interpreter).

With the native call channel (transport.channel) the frames travel through
shared memory instead of the pipes: ``InterpreterEnd.serve_forever`` takes
each request from the ring and answers in the caller's reply slot; only
messages too big for the ring or a slot still cross the pipes.

The process exits when the request pipe reaches end-of-file or the channel is
closed (the host closed it or died) and, through the parent-death signal, when
its parent dies.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import sys

from .._current import set_process_interpreter
from ..errors import TransportError
from ..interp.state import InterpreterState, capture_exception
from ..transport.codec import FAST_CALL, Decoder, Encoder
from ..transport.cuda_link import InterpreterLinks
from ..transport.frames import FrameReader, Waiter, write_frame
from ..transport.messages import CALL_ID, Op, encode_reply, parse_request
from ..transport.shm import Arena, BlockViews, Segment


_CUDA_LINK = int(Op.CUDA_LINK)
_ID_BYTES = CALL_ID.size
_unpack_id = CALL_ID.unpack_from
_UNPINNED_REFS = 3  # the blocks list's entry, the loop variable, getrefcount's argument


def _from_hosts_main(exc: BaseException) -> bool:
    return isinstance(exc, AttributeError) and "on <module '__main__'" in str(exc)


def describe_hosts_main(exc: BaseException, index: int) -> str:
    """Why an argument whose class the host's ``__main__`` defines (the script it
    runs: pickled by that name) cannot be rebuilt here, and the fix."""
    found = re.search(r"attribute '([^']+)'", str(exc))
    name = found.group(1) if found else "it"
    return (f"an argument of the call is an object of class {name!r}, defined in the host's "
            f"__main__ (the script being run), which interpreter {index} cannot import. Move "
            "the class into a module that the host and the interpreters both import (a file "
            "on sys.path), or intern it in the package (PackageExporter.intern) and create the "
            "object inside the interpreter.")


class _Tracked:
    """A text stream that remembers whether anything was written to it."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self.dirty = False

    def write(self, s):
        self.dirty = True
        return self._stream.write(s)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _let_the_fork_server_go() -> None:
    """Close this process's copy of its fork server's liveness pipe.

    multiprocessing hands every child of a fork server the write end of the pipe
    whose end-of-file tells the server that its host is gone; while any child
    holds it, the server outlives the host, and so does a worker in a call that
    never returns (its parent, the server, never dies: PR_SET_PDEATHSIG never
    fires).  A worker forks nothing from the server, so it lets go of it: the
    host's death ends the server, and the server's ends the worker."""
    from multiprocessing import forkserver

    server = forkserver._forkserver
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        server._forkserver_alive_fd = None
        try:
            os.close(fd)
        except OSError:
            pass


def main(config, fds) -> None:
    """Entry point of a worker process; ``fds`` are inherited descriptors."""
    _die_with_parent()
    _let_the_fork_server_go()
    req_r, rep_w, args_fd, results_fd, out_w, err_w, channel_fd, bell_w = (
        fd.detach() if hasattr(fd, "detach") else fd for fd in fds)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.close(out_w)
    os.close(err_w)
    sys.stdout = _Tracked(open(1, "w", buffering=1, closefd=False))
    sys.stderr = _Tracked(open(2, "w", buffering=1, closefd=False))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the host's to handle
    sys.path[:] = list(config.sys_path)
    set_process_interpreter(config.index)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(config.num_threads)
        torch.version.interp = config.index
    state = InterpreterState(config.index)
    state.activate_for_process()
    Loop(state, req_r, rep_w, args_fd, results_fd, spin=config.idle_spin, channel_fd=channel_fd,
         bell_w=bell_w).run()


class Loop:
    """Serves requests until the host goes away."""

    def __init__(self, state: InterpreterState, req_r: int, rep_w: int, args_fd: int,
                 results_fd: int, *, spin: float = 0.0, channel_fd: int | None = None,
                 bell_w: int | None = None) -> None:
        self.state = state
        self.channel_fd = channel_fd
        self.bell_w = -1 if bell_w is None else bell_w
        self.spin = spin
        self.req_r = req_r
        self.rep_w = rep_w
        args = Segment(args_fd, os.fstat(args_fd).st_size)
        self.results = Arena(Segment(results_fd, os.fstat(results_fd).st_size))
        self.decoder = Decoder(args, own=self.results.segment, open_shared=self._open_shared,
                               resolve_handle=state.objects.__getitem__,
                               on_return=lambda offset, holder: self._returned.append((offset, holder)))
        # A result that is a view of an argument (the args arena) goes back by reference.
        self.encoder = Encoder(self.results, returnable=args)
        # CUDA tensors through the link buffers the host announces (Op.CUDA_LINK).
        self.links = self.encoder.links = self.decoder.links = InterpreterLinks()
        self._returned: list = []        # (offset, holder): result blocks handed back this call
        self._kept = BlockViews(self._unkept)  # result blocks the interpreter still views
        self._free_later: set[int] = set()
        self.shared: dict[tuple, Segment] = {}
        self._pin_views = BlockViews(self._unpin)  # argument blocks kept after their call
        self.unpinned: list[int] = []

    def _open_shared(self, ident: tuple) -> Segment:
        seg = self.shared.get(ident)
        if seg is None:
            seg = Segment.open(*ident, private=True)
            self.shared[ident] = seg
        return seg

    def _unpin(self, offset: int) -> None:
        """The last tensor over a kept argument block is gone: tell the host."""
        self.unpinned.append(offset)

    def _free_result(self, offset: int) -> None:
        """The host dropped a result block; reuse it unless this side still views it."""
        if offset in self._kept:
            self._free_later.add(offset)
        else:
            self.results.free(offset)

    def _unkept(self, offset: int) -> None:
        if offset in self._free_later:
            self._free_later.discard(offset)
            self.results.free(offset)

    @staticmethod
    def _survivors(blocks: list, views: BlockViews) -> tuple:
        """The ``(offset, holder)`` blocks that a tensor still uses after the call,
        now watched by ``views``: argument blocks the interpreter kept (pinned), and
        result blocks handed back as arguments that it still views."""
        kept = []
        for offset, holder in blocks:
            # Held by `blocks` and the loop variable only, unless a tensor over it survived.
            if sys.getrefcount(holder) > _UNPINNED_REFS:
                kept.append(offset)
                views.add(offset, holder)
        return tuple(kept)

    def run(self) -> None:
        if self.channel_fd is not None:
            from ..transport.channel import InterpreterEnd, attach

            channel, memory = attach(self.channel_fd)
            end = InterpreterEnd(channel, self.req_r, self.rep_w, self.spin, self.bell_w, memory)
            common = self._common_calls(channel)
            end.serve_forever(self.serve, self.skip, common, self.finish if common else None)
            sys.stdout.flush()
            sys.stderr.flush()
            return
        waiter = Waiter(self.req_r, self.spin)
        reader = FrameReader(self.req_r)  # several requests may be queued in the pipe
        while True:
            if not reader.buffered:
                waiter.wait(block=False)  # after the spin, the blocking read is the wait
            data = reader.read()
            if data is None:
                break
            write_frame(self.rep_w, self.serve(data))
        sys.stdout.flush()
        sys.stderr.flush()

    def _common_calls(self, channel):
        """``common()`` for :meth:`InterpreterEnd.serve_forever`: the extension's
        serving loop (``multipy._native.serve_calls``), which serves the common call
        in C, as :meth:`serve` would, and hands every other request back; ``None``
        without the extension (``MULTIPY_NATIVE=0``: this module's loop serves all)."""
        from ..interp import state as state_module
        from ..transport.channel import _native_module

        serve_calls = getattr(_native_module, "serve_calls", None)
        if serve_calls is None or not isinstance(channel, _native_module.Channel):
            return None
        if "torch" in sys.modules:  # what the loop needs of torch, set up before the first call
            from ..transport.codec import native_tensors

            state_module._torch_cuda()
            native_tensors()
        state, results = self.state, self.results
        spin, req_r, bell_w = float(self.spin), self.req_r, self.bell_w
        args_segment = self.decoder.outbound
        torch_cuda, use_own_stream = state_module._TORCH_CUDA, state_module._use_own_stream

        def common():
            # Read again on each entry: _answer replaces _returned and unpinned.
            return serve_calls(channel, spin, req_r, bell_w, state.replicated, args_segment,
                               results.segment, results, self._free_result, self._returned,
                               self._pin_views.pending, self.unpinned, self._kept.pending,
                               state.open_segments, self.links._links, torch_cuda,
                               state.call_plain, use_own_stream)
        return common

    def finish(self, item: list) -> bytes:
        """The reply frame of a call that the extension's loop ran (see
        :meth:`_common_calls`) and left to this loop to answer: its value (encoded
        already, or ``result`` to encode here) or the error it raised, with the
        blocks it leaves held, as :meth:`serve` answers.  Empties ``item``."""
        _, _, call, result, value, error, watched, placed = item
        item.clear()
        self.encoder.placed = placed
        try:
            try:
                if error is None and value is None and result is not None:
                    value = self.encoder.encode(result, "result")
                del result
            finally:
                self.links.done()
        except BaseException as exc:
            error = exc
            del exc
        if error is not None:
            error = self._failed(error)
        return self._answer(call, value, error, watched)

    def _map_links(self, args: tuple) -> None:
        """Op.CUDA_LINK: map the host's link buffers and events, and move to this
        interpreter's own stream before any block is read through them."""
        from ..transport.cuda import ensure_stream

        self.links.update(args[0])
        ensure_stream()

    def _salvage(self, data: bytes) -> None:
        """A request whose arguments cannot be rebuilt here, or that is skipped,
        still carries the host's releases (dropped objects, freed result blocks):
        read it (again) with every unknown class stubbed out, and apply them."""
        try:
            request = parse_request(self.decoder.decode(data, lenient=True))
        except Exception:
            return  # nothing more can be read from it
        finally:
            self.decoder.received = []
        for offset in request.freed:
            self._free_result(offset)
        self.state.release(request.drop)

    def skip(self, data: bytes) -> bytes:
        """The reply to a request the host cancelled, or that was taken past its
        deadline: a CallTimeoutError, the request unrun.  The releases it carries
        (dropped objects, freed result blocks) still apply."""
        from ..errors import CallTimeoutError

        call = _unpack_id(data)[0] if len(data) >= _ID_BYTES else 0
        if len(data) > _ID_BYTES:
            self._salvage(data[_ID_BYTES:])
        error = CallTimeoutError("the call waited past its timeout queued behind other calls "
                                 f"on interpreter {self.state.index} and was dropped without running")
        return encode_reply(call, None, capture_exception(error), (), (), False, ())

    def serve(self, data: bytes) -> bytes:
        """The reply frame (call id first) for one request frame.

        The common call (``codec.FAST_CALL``: a loaded replicated object called with
        positional tensors and scalars) is read by ``Decoder.decode_call`` and run
        by ``InterpreterState.call_plain``, without a request tuple; any other
        request is unpickled and dispatched by ``InterpreterState.handle``."""
        # messages.split_call, inlined (this runs once per call)
        plain = False
        if len(data) > _ID_BYTES:
            call = _unpack_id(data)[0]
            plain = data[_ID_BYTES] == FAST_CALL
            if not plain:
                data = data[_ID_BYTES:]
        elif len(data) == _ID_BYTES:
            call = _unpack_id(data)[0]
            data = b""
        else:
            call = 0  # never a real call: the host treats the reply as out of step
        state = self.state
        if self._kept.pending:  # result blocks this side viewed, now free to reuse
            self._kept.settle()
        if state.open_segments:
            state.close_adopted_segments()
        watched = []
        value = error = None
        self.encoder.placed = []  # blocks of *this* reply only: the host owns the older ones
        decoder = self.decoder
        try:
            try:
                if plain:
                    rid, method, args, grad, freed = decoder.decode_call(data, _ID_BYTES)
                    watched, decoder.received = decoder.received, []
                    for offset in freed:
                        self._free_result(offset)
                    result = state.call_plain(rid, method, args, grad)
                else:
                    try:
                        fields = decoder.decode(data)
                    except Exception as exc:
                        self._salvage(data)
                        if _from_hosts_main(exc):
                            raise TransportError(describe_hosts_main(exc, state.index)) from exc
                        raise  # raised by the arguments' own code: theirs to see
                    watched, decoder.received = decoder.received, []
                    if type(fields) is not tuple or len(fields) != 4 or type(fields[0]) is not int \
                            or type(fields[1]) is not tuple:
                        parse_request(fields)  # raises TypeError, saying what came
                    op, args, drop, freed = fields
                    del fields
                    for offset in freed:
                        self._free_result(offset)
                    result = (self._map_links(args) if op == _CUDA_LINK
                              else state.handle(op, args, drop))
                del args
                value = self.encoder.encode(result, "result") if result is not None else None
                del result
            finally:
                self.links.done()  # marks this call's link reads and writes finished
        except BaseException as exc:  # every failure goes back to the caller
            error = self._failed(exc)
            del exc
        return self._answer(call, value, error, watched)

    def _failed(self, exc: BaseException):
        """The error a failed call answers with; the result blocks it had placed are freed."""
        for offset in self.encoder.placed:
            self.results.free(offset)
        self.encoder.placed = []
        return capture_exception(exc)

    def _answer(self, call: int, value, error, watched: list) -> bytes:
        """The reply frame: the call's value or error, and the blocks it leaves held."""
        if watched:
            if len(watched) == 1:  # _survivors of the usual single argument, inlined
                offset, holder = watched[0]
                # Held by `watched` and `holder` only, unless a tensor over it survived.
                if sys.getrefcount(holder) > _UNPINNED_REFS:
                    self._pin_views.add(offset, holder)
                    pinned = (offset,)
                else:
                    pinned = ()
                del holder
            else:
                pinned = self._survivors(watched, self._pin_views)
        else:
            pinned = ()
        del watched
        if self._returned:
            returned, self._returned = self._returned, []
            self._survivors(returned, self._kept)
            del returned
        if self._pin_views.pending:  # kept arguments whose last tensor died meanwhile
            self._pin_views.settle()
        if self.unpinned:
            unpinned, self.unpinned = tuple(self.unpinned), []
        else:
            unpinned = ()
        out, err = sys.stdout, sys.stderr
        try:  # _Tracked streams, unless the call replaced them
            output = out.dirty or err.dirty
        except AttributeError:
            output = getattr(out, "dirty", False) or getattr(err, "dirty", False)
        if output:
            out.flush()
            err.flush()
            out.dirty = err.dirty = False
        return encode_reply(call, value, error, pinned, unpinned, output,
                            tuple(self.encoder.placed))
