"""CUDA links: one pair of device buffers per interpreter, shared by IPC once.

Opening a CUDA IPC mapping costs about a millisecond (``cudaIpcOpenMemHandle``
plus torch's reference counter and event), so a call that sent its input and
result that way spent most of its time mapping memory.  A link maps memory
once per interpreter start instead, and every call copies through it::

      host (caller's stream)                      interpreter (its own stream)
      ----------------------                      ----------------------------
      wait  worker_done
      copy  args ──▶ link.args[off:off+n]
      record args_written ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─▶  wait args_written
                                                  clone link.args[off:off+n] ──▶ own tensor
                                                  run the call
                                                  wait results_read
                                                  copy result ──▶ link.results[off:off+n]
      wait worker_done  ◀─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─ ─  record worker_done
      clone link.results[off:off+n] ──▶ host tensor
      record results_read

Both buffers and all three events belong to the host and are created there:
the interpreter maps them (``Op.CUDA_LINK``), so a result the host cloned
stays valid whatever happens to the interpreter, and nothing the interpreter
allocates is ever mapped by the host.  Each side copies what it keeps out of
the buffers, so every block is free again when its call ends: both buffers are
bump-allocated from offset 0 for every message, and the events order the
reuse (the host writes arguments only after the interpreter finished reading
the previous ones; the interpreter writes results only after the host cloned
the previous ones).

A tensor that does not fit what is left of a buffer, a tensor on a device
without a link yet, any tensor over :data:`LINK_MAX_TENSOR` bytes and the
tensors marked by :func:`share_by_mapping` (a package's weights on a GPU, which
every interpreter must map, not copy) cross by per-tensor IPC instead (:mod:`multipy.transport.cuda`); the host then creates
or grows the link between calls, so the next call of that shape fits.

Device operations go through a small ``ops`` object (:class:`CudaOps` on a GPU)
so the protocol can be checked without one.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from . import tensors
from .tensors import dtype_name, strided

LINK_ALIGN = 256            # every block starts on a 256-byte boundary (CUDA's own alignment)
LINK_MIN_BYTES = 1 << 20    # a new buffer's size
LINK_MAX_TENSOR = 1 << 26   # larger tensors cross by per-tensor IPC (mapping cost is small beside them)
CUDA_BLOCK = "c"            # descriptor tag: ("c", device, offset, nbytes, dtype, shape)

ARGS_WRITTEN, RESULTS_READ, WORKER_DONE = range(3)
_BY_MAPPING = "_multipy_by_mapping"


def share_by_mapping(t):
    """Mark CUDA tensor ``t`` to cross as a mapping of this process's memory (per-tensor
    IPC), never as a copy through a link: weights that every interpreter must share.

    Returns ``t``.  The mark is on the tensor object; views of it cross as copies.

    >>> table = share_by_mapping(torch.randn(1 << 20, device="cuda"))  # doctest: +SKIP
    """
    setattr(t, _BY_MAPPING, True)
    return t


def _aligned(n: int) -> int:
    return (n + LINK_ALIGN - 1) & ~(LINK_ALIGN - 1)


def _buffer_size(need: int) -> int:
    """Room for twice ``need`` bytes, as a power of two (at least LINK_MIN_BYTES)."""
    return max(LINK_MIN_BYTES, 1 << (2 * need - 1).bit_length())


class CudaOps:
    """The device operations a link needs, on CUDA device ``index``."""

    def __init__(self, index: int) -> None:
        import torch

        self.torch = torch
        self.device = torch.device("cuda", index)

    def buffer(self, nbytes: int):
        return self.torch.empty(nbytes, dtype=self.torch.uint8, device=self.device)

    def share(self, buffer) -> tuple:
        """What another process needs to map ``buffer`` (torch's IPC reduction)."""
        from torch.multiprocessing.reductions import reduce_tensor

        return reduce_tensor(buffer)

    def open(self, shared: tuple):
        rebuild, args = shared
        return rebuild(*args)

    def event(self):
        return self.torch.cuda.Event(interprocess=True)

    def share_event(self, event) -> bytes:
        with self.torch.cuda.device(self.device):
            return bytes(event.ipc_handle())

    def open_event(self, handle: bytes):
        return self.torch.cuda.Event.from_ipc_handle(self.device, handle)

    def record(self, event) -> None:
        event.record(self.torch.cuda.current_stream(self.device))

    def wait(self, event) -> None:
        self.torch.cuda.current_stream(self.device).wait_event(event)

    def finish(self, event) -> None:
        """Block this thread until ``event``'s last recorded work is done."""
        event.synchronize()

    def drain(self) -> None:
        """Block until everything this process queued on the device is done."""
        self.torch.cuda.synchronize(self.device)

    def empty(self, shape, dtype):
        return self.torch.empty(shape, dtype=dtype, device=self.device)


class _Message:
    """Per-message bookkeeping of one direction: the bump offset, whether the
    buffer was touched, and the bytes that did not fit."""

    __slots__ = ("used", "touched", "short")

    def __init__(self) -> None:
        self.used = 0
        self.touched = False
        self.short = 0


def _place(buffer, message: _Message, t, index, before: Callable[[], None]) -> tuple | None:
    """Copy ``t`` into ``buffer`` after what this message placed; its descriptor,
    or ``None`` when it does not fit (counted in ``message.short``).  Like every
    tensor that crosses, it arrives detached."""
    nbytes = t.nbytes
    if nbytes > LINK_MAX_TENSOR or t.layout is not strided() or t.is_quantized:
        return None  # sparse and quantized tensors keep torch's own reduction
    offset = message.used
    end = offset + _aligned(nbytes)
    if end > buffer.numel():
        message.short += _aligned(nbytes)
        return None
    if not message.touched:
        before()
        message.touched = True
    message.used = end
    if nbytes:
        buffer[offset:offset + nbytes].view(t.dtype).view(t.shape).copy_(t.detach())
    return (CUDA_BLOCK, index, offset, nbytes, dtype_name(t.dtype), tuple(t.shape))


def _take(ops, buffer, message: _Message, desc: tuple, before: Callable[[], None]):
    """A tensor of this side's own memory with the bytes of block ``desc``."""
    _, _, offset, nbytes, dtype, shape = desc
    if not message.touched:
        before()
        message.touched = True
    if nbytes:
        return buffer[offset:offset + nbytes].view(tensors.dtype(dtype)).view(shape).clone()
    return ops.empty(shape, tensors.dtype(dtype))


class HostLink:
    """The host's side of one interpreter's link on one device: it owns the
    buffers and the events, and grows the buffers between calls."""

    def __init__(self, ops) -> None:
        self.ops = ops
        self.args = ops.buffer(LINK_MIN_BYTES)
        self.results = ops.buffer(LINK_MIN_BYTES)
        self.events = (ops.event(), ops.event(), ops.event())
        self._pending: dict[str, Any] = {
            "args": ops.share(self.args), "results": ops.share(self.results),
            "events": tuple(ops.share_event(e) for e in self.events)}
        self._out = _Message()
        self._in = _Message()

    def place(self, t, index) -> tuple | None:
        """An argument's descriptor (its bytes copied into the args buffer), or None."""
        return _place(self.args, self._out, t, index,
                      lambda: self.ops.wait(self.events[WORKER_DONE]))

    def sent(self) -> None:
        """The request is encoded: mark its arguments written."""
        if self._out.touched:
            self.ops.record(self.events[ARGS_WRITTEN])
        self._out.touched = False
        self._out.used = 0

    def take(self, desc: tuple):
        """A result block, cloned into host memory."""
        return _take(self.ops, self.results, self._in, desc,
                     lambda: self.ops.wait(self.events[WORKER_DONE]))

    def received(self) -> None:
        """The reply is decoded: mark its results read."""
        if self._in.touched:
            self.ops.record(self.events[RESULTS_READ])
        self._in.touched = False

    def fell_back(self, nbytes: int) -> None:
        """A result of ``nbytes`` did not fit the results buffer (it came by
        per-tensor IPC): grow the buffer before the next call."""
        self._in.short += _aligned(nbytes)

    def settle(self) -> None:
        """Between calls: grow a buffer the last calls outgrew."""
        for name, message in (("args", self._out), ("results", self._in)):
            if message.short:
                current = getattr(self, name)
                size = _buffer_size(current.numel() + message.short)
                message.short = 0
                # The interpreter may still be reading the old buffer, and this
                # process may still be copying into it: let both finish first.
                self.ops.finish(self.events[WORKER_DONE])
                self.ops.drain()
                buffer = self.ops.buffer(size)
                setattr(self, name, buffer)
                self._pending[name] = self.ops.share(buffer)

    def announcement(self) -> dict | None:
        """The pieces the interpreter has not mapped yet (then cleared), or None."""
        pending, self._pending = self._pending, {}
        return pending or None

    def close(self) -> None:
        """Let queued copies finish before the buffers go back to the allocator."""
        self.ops.drain()


class InterpreterLink:
    """An interpreter's side of its link on one device: maps what the host announces."""

    def __init__(self, ops) -> None:
        self.ops = ops
        self.args = None
        self.results = None
        self.events = None
        self._in = _Message()
        self._out = _Message()

    def update(self, announcement: dict) -> None:
        """Map the buffers and events the host announced."""
        ops = self.ops
        if self.args is not None and ("args" in announcement or "results" in announcement):
            ops.drain()  # nothing queued here may still touch a mapping about to close
        if "args" in announcement:
            self.args = ops.open(announcement["args"])
        if "results" in announcement:
            self.results = ops.open(announcement["results"])
        if "events" in announcement:
            self.events = tuple(ops.open_event(h) for h in announcement["events"])

    @property
    def ready(self) -> bool:
        return self.events is not None and self.results is not None

    def take(self, desc: tuple):
        """An argument block, cloned into this interpreter's memory."""
        return _take(self.ops, self.args, self._in, desc,
                     lambda: self.ops.wait(self.events[ARGS_WRITTEN]))

    def place(self, t, index) -> tuple | None:
        """A result's descriptor (its bytes copied into the results buffer), or None."""
        return _place(self.results, self._out, t, index,
                      lambda: self.ops.wait(self.events[RESULTS_READ]))

    def done(self) -> None:
        """The reply is encoded: mark this call's reads and writes finished."""
        if self._in.touched or self._out.touched:
            self.ops.record(self.events[WORKER_DONE])
        self._in = _Message()
        self._out = _Message()


class HostLinks:
    """The host's links to one interpreter, one per device, made on demand:
    a device gets a link after the first tensor on it crossed without one."""

    def __init__(self, make_ops: Callable[[Any], Any] = CudaOps) -> None:
        self._make_ops = make_ops
        self._links: dict[Any, HostLink] = {}
        self._wanted: set = set()
        # Why links are off for this interpreter (None: on).  MULTIPY_CUDA_LINKS=0 turns
        # them off for every interpreter: the escape hatch, and the baseline they are
        # measured against (`multipy bench --overhead --device cuda`).
        self.disabled: str | None = ("MULTIPY_CUDA_LINKS=0"
                                     if os.environ.get("MULTIPY_CUDA_LINKS") == "0" else None)

    @property
    def active(self) -> bool:
        """Whether there is anything to announce or copy through (cheap: checked per call)."""
        return bool(self._links or self._wanted)

    def disable(self, why: str) -> None:
        """Give up on links (CUDA tensors keep crossing by per-tensor IPC), saying why once."""
        import warnings

        self.close()
        self.disabled = why
        warnings.warn(f"CUDA link buffers are off: {why}; CUDA tensors cross by per-tensor "
                      "IPC instead (slower per call)", RuntimeWarning, stacklevel=3)

    def place(self, t) -> tuple | None:
        if getattr(t, _BY_MAPPING, False):
            return None
        index = t.device.index
        link = self._links.get(index)
        if link is None:
            if self.disabled is None:
                self._wanted.add(index)
            return None
        return link.place(t, index)

    def take(self, desc: tuple):
        return self._links[desc[1]].take(desc)

    def fell_back(self, t) -> None:
        """A result on ``t``'s device came by per-tensor IPC: make room for next time."""
        if t.nbytes <= LINK_MAX_TENSOR and self.disabled is None:
            link = self._links.get(t.device.index)
            if link is not None:
                link.fell_back(t.nbytes)
            else:
                self._wanted.add(t.device.index)

    def sent(self) -> None:
        """The request is encoded (every call; costs nothing without links)."""
        for link in self._links.values():
            link.sent()

    def received(self) -> None:
        """The reply is decoded (every call; costs nothing without links)."""
        for link in self._links.values():
            link.received()

    def announcements(self) -> tuple:
        """Between calls: make wanted links, grow outgrown ones, and return what
        the interpreter must map before the next request, as ``((device, pieces), ...)``."""
        for index in self._wanted:
            if index not in self._links:
                self._links[index] = HostLink(self._make_ops(index))
        self._wanted.clear()
        out = []
        for index, link in self._links.items():
            link.settle()
            pieces = link.announcement()
            if pieces:
                out.append((index, pieces))
        return tuple(out)

    def close(self) -> None:
        """Drop every link (the interpreter is gone or links are off)."""
        links, self._links = self._links, {}
        self._wanted.clear()
        for link in links.values():
            try:
                link.close()
            except Exception:  # a broken device must not stop a restart; the buffers go anyway
                pass


class InterpreterLinks:
    """An interpreter's links, one per device the host announced."""

    def __init__(self, make_ops: Callable[[Any], Any] = CudaOps) -> None:
        self._make_ops = make_ops
        self._links: dict[Any, InterpreterLink] = {}

    def update(self, announcements: tuple) -> None:
        """Map what the host announced.  A link that fails to map is dropped whole
        (its tensors then cross by per-tensor IPC) and the error goes to the host."""
        for index, pieces in announcements:
            link = self._links.get(index)
            if link is None:
                link = self._links[index] = InterpreterLink(self._make_ops(index))
            try:
                link.update(pieces)
            except BaseException:
                del self._links[index]
                raise

    def take(self, desc: tuple):
        return self._links[desc[1]].take(desc)

    def place(self, t) -> tuple | None:
        index = t.device.index
        link = self._links.get(index)
        if link is None or not link.ready:
            return None
        return link.place(t, index)

    def done(self) -> None:
        for link in self._links.values():
            link.done()
