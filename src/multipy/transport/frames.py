"""Length-prefixed frames over a pair of pipe file descriptors.

A frame is a 4-byte little-endian length followed by that many bytes.  A read
that hits end-of-file returns ``None``: the peer is gone.  Short reads and
writes (pipes carry at most 64 KiB at a time) are looped over.
"""

from __future__ import annotations

import os
import struct

_HEADER = struct.Struct("<I")
MAX_FRAME = 1 << 31


class FrameError(Exception):
    """A frame header announced an impossible length: the stream is corrupt."""


def write_frame(fd: int, payload: bytes | memoryview, /) -> None:
    """Write one frame; loops over short writes."""
    data = _HEADER.pack(len(payload)) + payload if len(payload) < 65536 else None
    if data is not None:
        view = memoryview(data)
    else:
        _write_all(fd, memoryview(_HEADER.pack(len(payload))))
        view = memoryview(payload)
    _write_all(fd, view)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view)
        view = view[n:]


def read_frame(fd: int, /) -> bytes | None:
    """Read one frame; ``None`` at end-of-file (the writer closed or died)."""
    head = os.read(fd, 65536 + _HEADER.size)
    if not head:
        return None
    while len(head) < _HEADER.size:
        more = os.read(fd, _HEADER.size - len(head))
        if not more:
            return None
        head += more
    (size,) = _HEADER.unpack_from(head)
    if size >= MAX_FRAME:
        raise FrameError(f"frame header announces {size} bytes; the stream is corrupt")
    body = head[_HEADER.size:]
    if len(body) == size:
        return body
    if len(body) > size:
        raise FrameError(f"frame of {size} bytes followed by {len(body) - size} stray bytes")
    parts = [body]
    missing = size - len(body)
    while missing:
        chunk = os.read(fd, min(missing, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        missing -= len(chunk)
    return b"".join(parts)
