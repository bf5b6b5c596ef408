"""Length-prefixed frames over a pair of pipe file descriptors.

A frame is a 4-byte little-endian length followed by that many bytes.  A read
that hits end-of-file returns ``None``: the peer is gone.  Short reads and
writes (pipes carry at most 64 KiB at a time) are looped over.

:func:`read_frame` expects one frame at a time in the pipe (a request loop);
:class:`FrameReader` is for a reader that may find several queued (the host,
when a call it gave up on left its reply behind): it keeps what one read
brought in beyond the frame for the next read.
"""

from __future__ import annotations

import os
import select
import struct
import time

_HEADER = struct.Struct("<I")
FRAME_HEADER = _HEADER.size  # bytes before each frame's payload
MAX_FRAME = 1 << 31


class FrameError(Exception):
    """A frame header announced an impossible length: the stream is corrupt."""


def write_frame(fd: int, payload: bytes | memoryview, /) -> None:
    """Write one frame; loops over short writes."""
    data = _HEADER.pack(len(payload)) + payload if len(payload) < 65536 else None
    if data is not None:
        view = memoryview(data)
    else:
        write_all(fd, memoryview(_HEADER.pack(len(payload))))
        view = memoryview(payload)
    write_all(fd, view)


def write_frame_draining(fd: int, payload: bytes | memoryview, other: int, drain, /) -> None:
    """:func:`write_frame` to a blocking pipe whose reader may first wait for this
    thread: whenever ``other`` is readable, ``drain()`` runs (it reads ``other``),
    and the frame goes out only in pieces the pipe takes without waiting.  For a
    host thread writing a big request while the interpreter may be blocked writing
    a big reply that this thread must read first.  ``drain()`` returns False once
    ``other`` has nothing more to give (end-of-file): it is then no longer watched."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    poller.register(other, select.POLLIN)
    for view in (memoryview(_HEADER.pack(len(payload))), memoryview(payload).cast("B")):
        while view:
            writable = False
            for ready, _ in poller.poll():
                if ready == other:
                    if drain() is False:
                        poller.unregister(other)
                else:
                    writable = True  # (POLLERR too: the write says what went wrong)
            if writable:
                # At most PIPE_BUF bytes: a pipe that polls writable takes them at once.
                view = view[os.write(fd, view[:select.PIPE_BUF]):]


def write_all(fd: int, view: memoryview) -> None:
    """Write all of ``view`` to ``fd`` (a blocking descriptor), however many writes it takes."""
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


_CHUNK = 65536 + _HEADER.size


class FrameReader:
    """Reads whole frames from ``fd``, one ``os.read`` per small frame, keeping
    the bytes of later frames that a read brought in (:attr:`buffered`).

    An exception raised inside :meth:`read` (a signal handler's
    ``KeyboardInterrupt``) may lose bytes: the stream must then be treated as
    out of step.
    """

    __slots__ = ("fd", "_rest", "partial")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._rest = b""
        self.partial = False  # bytes of a frame were taken from the pipe, not all of it yet

    @property
    def buffered(self) -> bool:
        """Whether bytes of the next frame were already read (no need to wait)."""
        return bool(self._rest)

    def read(self) -> bytes | None:
        """The next frame's payload; ``None`` at end-of-file."""
        fd = self.fd
        data, self._rest = self._rest or os.read(fd, _CHUNK), b""
        if not data:
            return None
        self.partial = True
        while len(data) < _HEADER.size:
            more = os.read(fd, _CHUNK)
            if not more:
                return None
            data += more
        (size,) = _HEADER.unpack_from(data)
        if size >= MAX_FRAME:
            raise FrameError(f"frame header announces {size} bytes; the stream is corrupt")
        end = _HEADER.size + size
        if len(data) < end:
            parts, have = [data], len(data)
            while have < end:
                chunk = os.read(fd, min(max(end - have, _CHUNK), 1 << 20))
                if not chunk:
                    return None
                parts.append(chunk)
                have += len(chunk)
            data = b"".join(parts)
        if len(data) > end:
            self._rest = data[end:]
        self.partial = False
        return data[_HEADER.size:end]


#: Seconds one ``poll(0)`` of a spin may take before the spin counts as contended: an
#: uncontended poll and GIL round trip takes about a microsecond; one after which
#: this thread had to wait for the GIL (another thread took it) takes far longer.
_CONTENDED_POLL = 50e-6


def spin_readable(poller: "select.poll", spin: float) -> bool:
    """Poll without sleeping for up to ``spin`` seconds; True once readable.

    A reply that comes back within that window costs no sleep and no wake-up,
    the dominant cost of a round trip on a virtual machine (tens of µs each way).
    Each ``poll(0)`` releases the GIL: while another thread of this process runs
    Python code, the spin and that thread trade the GIL back and forth, each
    waiting up to a switch interval for it.  The spin gives up (False) at the
    first poll after which it had to wait that long, so a contended host sleeps
    at once instead.
    """
    clock = time.perf_counter
    now = clock()
    deadline = now + spin
    while not poller.poll(0):
        last, now = now, clock()
        if now > deadline or now - last > _CONTENDED_POLL:
            return False
    return True


def block_readable(poller: "select.poll", timeout: float | None) -> bool:
    """Sleep in ``poll`` until readable; False when ``timeout`` (seconds) passed first."""
    if timeout is None:
        while not poller.poll(None):
            pass
        return True
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bool(poller.poll(0))
        if poller.poll(max(1, int(min(left, 86400.0) * 1000))):  # (an int of ms: a day at most)
            return True


class Waiter:
    """Waits for one pipe to become readable, spinning only while it pays.

    Spinning is worth it while answers come back within the spin window (a
    stream of small calls); for long calls it would only burn a core.  After a
    spin that ran out, the waiter sleeps straight away for the next 1, 2, 4 ...
    64 waits before it tries spinning again, so a slow peer costs at most one
    wasted window in 64 waits, and a peer that turns fast is noticed soon.
    """

    def __init__(self, fd: int, spin: float) -> None:
        self.poller = select.poll()
        self.poller.register(fd, select.POLLIN)
        self.spin = spin
        self._skip = 0
        self._backoff = 1

    def wait(self, timeout: float | None = None, *, spin: bool = True, block: bool = True) -> bool:
        """Wait for data; ``spin=False`` sleeps at once (e.g. when other threads
        of this process need the GIL more than this one needs a fast wake-up).
        ``block=False`` with no ``timeout`` leaves the sleep to the caller's
        blocking read (True at once after a spin that ran out): a read that
        waits is one GIL release, a ``poll`` and then a read are two."""
        if spin and self.spin > 0:
            if self._skip:
                self._skip -= 1
            elif spin_readable(self.poller, self.spin):
                self._backoff = 1
                return True
            else:
                self._backoff = min(self._backoff * 2, 64)
                self._skip = self._backoff
        if timeout is None and not block:
            return True
        return block_readable(self.poller, timeout)
