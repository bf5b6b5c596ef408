"""The wire of the ``subinterpreter`` backend, imported on both sides of it.

Everything here is pure Python (``os``, ``pickle``, ``struct``): it runs inside
isolated subinterpreters, where numpy and torch cannot be imported.

Frames on the request pipe (host -> subinterpreter)::

    REQUEST header  (payload bytes, call number, buffers shared through exec)
    payload         pickle (protocol 5) of (op, args, drop)

Frames on the reply pipe (subinterpreter -> host)::

    REPLY header    (payload bytes, call number it answers, buffers placed in the arena)
    payload         pickle (protocol 5) of (value, RemoteException | None)
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
  the host: **two copies** (the arena is reused by the next call).  A result
  cannot borrow the interpreter's memory safely: it would outlive a restart.
"""

from __future__ import annotations

import copyreg
import io
import os
import pickle
import struct

from .frames import write_all

OOB_THRESHOLD = 64 * 1024
ALIGN = 64
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
    oob: list = []

    def keep(buffer: pickle.PickleBuffer):
        if memoryview(buffer).nbytes < OOB_THRESHOLD:
            return True  # in band
        oob.append(buffer)
        return False

    out = io.BytesIO()
    pickler = pickle.Pickler(out, 5, buffer_callback=keep)
    pickler.dispatch_table = table
    pickler.dump(mark_big(value))
    return out.getvalue(), oob


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
    """Write ``parts`` in one ``writev`` when the pipe takes them at once."""
    total = sum(len(p) for p in parts)
    written = os.writev(fd, parts)
    if written == total:
        return
    write_all(fd, memoryview(b"".join(parts))[written:])
