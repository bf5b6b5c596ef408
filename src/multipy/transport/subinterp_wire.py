"""The wire of the ``subinterpreter`` backend, imported on both sides of it.

Everything here is pure Python (``os``, ``pickle``, ``struct``): it runs inside
isolated subinterpreters, where numpy and torch cannot be imported.

Frames on the request pipe or the call channel (host -> subinterpreter)::

    REQUEST header  (payload bytes, call number, buffers shared through exec)
    payload         pickle (protocol 5) of (op, args, drop),
                    or codec.FAST_CALL for the common call (see fast_request)

Frames on the reply pipe or the call channel (subinterpreter -> host)::

    REPLY header    (payload bytes, call number it answers, buffers placed in the arena)
    payload         pickle (protocol 5) of (value, RemoteException | None),
                    or codec.FAST_VALUE for a None, bool, int or float result
    slots           one SLOT (offset, length) per out-of-band buffer

Copies.  Small values travel in-band through the pipe.  Buffers of at least
``OOB_THRESHOLD`` bytes travel out of band:

* host -> interpreter: a ``memoryview`` (or ``PickleBuffer``) argument is
  shared with ``_interpreters.exec(..., shared=...)`` as a cross-interpreter
  buffer view of the host's memory: **no copy**; the interpreter sees the
  host's bytes (and writes through when the host buffer is writable).  A
  ``bytearray`` or ``bytes`` argument is rebuilt from such a view: **one copy**.
* interpreter -> host: buffers are copied once into a host-owned arena (a
  ``bytearray`` the host shared with the interpreter) and rebuilt from it in
  the host: **two copies**.  The arena is reused by the next such reply once the
  host has copied this one out: its first byte (of ``ARENA_HEAD``) says it still
  holds a reply.  A result cannot borrow the interpreter's memory safely: it
  would outlive a restart.
"""

from __future__ import annotations

import copyreg
import io
import os
import pickle
import struct

from . import frames
from .codec import _CALL_REPLICATED

OOB_THRESHOLD = 64 * 1024
ALIGN = 64
ARENA_HEAD = ALIGN       # the arena's first byte: 1 while the host has not read its buffers
WALK_LIMIT = 64          # containers longer than this are not searched for big bytes
REQUEST = struct.Struct("<QQI")
REPLY = struct.Struct("<QQI")
SLOT = struct.Struct("<QQ")
SEQ = struct.Struct("<Q")


class BigBytes:
    """Marks a large ``bytes`` so that it is pickled out of band.

    The C pickler never consults reducers for exact ``bytes``, so large ones
    are wrapped before pickling (:func:`mark_big`).
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce_ex__(self, protocol):
        return (bytes, (pickle.PickleBuffer(self.data),))


def mark_big(value, depth: int = 0):
    """``value`` with every large ``bytes`` in small nested tuples/lists/dicts
    wrapped in :class:`BigBytes`; the same object when there is none."""
    kind = type(value)
    if kind is bytes:
        return BigBytes(value) if len(value) >= OOB_THRESHOLD else value
    if kind is dict:
        items = value.items()
    elif kind is tuple or kind is list:
        items = enumerate(value)
    else:
        return value
    if depth >= 4 or len(value) > WALK_LIMIT:
        return value
    out = None
    for key, item in items:
        if type(item) in _WALKED:
            marked = mark_big(item, depth + 1)
            if marked is not item:
                if out is None:
                    out = dict(value) if kind is dict else list(value)
                out[key] = marked
    if out is None:
        return value
    return tuple(out) if kind is tuple else out


_WALKED = frozenset((bytes, tuple, list, dict))


def _shaped(view: memoryview, fmt: str, shape: tuple) -> memoryview:
    if view.format == fmt and view.shape == shape:
        return view
    try:
        return view.cast("B").cast(fmt, shape)
    except (TypeError, ValueError):
        return view


def memoryview_view(buffer, fmt: str, shape: tuple) -> memoryview:
    """Rebuild a ``memoryview`` argument over the buffer it arrived in (no copy)."""
    return _shaped(memoryview(buffer), fmt, shape)


def memoryview_copy(buffer, fmt: str, shape: tuple) -> memoryview:
    """Rebuild a ``memoryview`` result over a private copy (the arena is reused)."""
    return _shaped(memoryview(bytearray(buffer)), fmt, shape)


def _reduce_memoryview(rebuild):
    def reduce(view: memoryview):
        data = view if view.c_contiguous else view.tobytes()
        return (rebuild, (pickle.PickleBuffer(data), view.format, view.shape))
    return reduce


def dispatch_table(*, results: bool) -> dict:
    """The pickler's reducers: copyreg's, plus ``memoryview`` (which pickle refuses)."""
    table = dict(copyreg.dispatch_table)
    table[memoryview] = _reduce_memoryview(memoryview_copy if results else memoryview_view)
    return table


def dumps(value, table: dict) -> tuple[bytes, list]:
    """Pickle ``value``; returns the payload and the out-of-band buffers."""
    return Dumper(table).dumps(value)


class Dumper:
    """:func:`dumps` with one pickler kept for every message of one side (building a
    pickler costs more than pickling a small message).  Not for two threads at once.

    >>> payload, oob = Dumper(dispatch_table(results=False)).dumps((1, b"x" * OOB_THRESHOLD))
    >>> len(oob), pickle.loads(payload, buffers=oob)[1] == b"x" * OOB_THRESHOLD
    (1, True)
    """

    def __init__(self, table: dict) -> None:
        self.table = table  # the pickler's reducers (see dispatch_table)
        self._oob: list = []
        self._out = io.BytesIO()
        self._pickler = pickle.Pickler(self._out, 5, buffer_callback=self._keep)
        self._pickler.dispatch_table = table

    def _keep(self, buffer: pickle.PickleBuffer) -> bool:
        if memoryview(buffer).nbytes < OOB_THRESHOLD:
            return True  # in band
        self._oob.append(buffer)
        return False

    def dumps(self, value) -> tuple[bytes, list]:
        """The payload and the out-of-band buffers of ``value``."""
        out, pickler = self._out, self._pickler
        out.seek(0)
        out.truncate()
        self._oob = oob = []
        try:
            pickler.dump(mark_big(value))
        finally:
            pickler.clear_memo()  # the memo would keep the message's objects alive
            self._oob = []
        return out.getvalue(), oob


# -- the binary forms of the common call (multipy.transport.codec's) ----------------------
#
# A request whose arguments are only None, bools, int64s and floats (a call of a loaded
# replicated object, positional arguments, nothing to drop) crosses as codec.FAST_CALL,
# and such a result as codec.FAST_VALUE: a few struct fields, no pickle on either side.
# Every other request and result is pickled as above (a pickle starts with 0x80).

_SCALARS = frozenset((type(None), bool, int, float))


def fast_request(encoder, op: int, args: tuple, drop: tuple):
    """The request in codec's binary form :data:`~multipy.transport.codec.FAST_CALL`
    (with ``encoder``, a ``codec.Encoder(None)``), or ``None`` when it must be pickled."""
    if op != _CALL_REPLICATED or drop or len(args) != 6 or args[5] is not None or args[3]:
        return None
    scalars = _SCALARS
    for value in args[2]:
        if type(value) not in scalars:
            return None
    return encoder.encode_request(op, args, (), (), False)  # None for an int beyond int64


def fast_value(encoder, value):
    """``value`` (a result) in codec's binary form :data:`~multipy.transport.codec.FAST_VALUE`,
    or ``None`` when it must be pickled."""
    if type(value) not in _SCALARS:
        return None
    return encoder.encode(value, "result", False)  # None for an int beyond int64


def align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def read_exact(fd: int, n: int):
    """``n`` bytes from ``fd``; ``None`` at end-of-file."""
    data = os.read(fd, n)
    if len(data) == n:
        return data
    if not data:
        return None
    buf = bytearray(data)
    while len(buf) < n:
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return buf


def write_all(fd: int, parts: list) -> None:
    """Write ``parts`` in one ``writev`` when the pipe takes them at once, the rest
    after a partial write (a signal) however many writes it takes."""
    total = sum(len(p) for p in parts)
    written = os.writev(fd, parts)
    if written != total:
        frames.write_all(fd, memoryview(b"".join(parts))[written:])
