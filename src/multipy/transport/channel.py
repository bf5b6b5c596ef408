"""The shared-memory call channel: one per interpreter and generation.

::

    host threads (any number)                       interpreter (one consumer)
    -------------------------                       --------------------------
    slot = claim()
    post(request, slot) ──▶ request ring ──────────▶ wait_request() ─▶ take()
      (copies, GIL held; FUTEX_WAKE only              (spin with pause, then
       when the consumer sleeps)                       FUTEX_WAIT on req_seq)
                                                          serve the call
    wait_reply(slot) ◀──── reply slot[slot] ◀───────── reply(slot, data)
      (releases the GIL once: spin with pause,          (FUTEX_WAKE only when
       then FUTEX_WAIT on the slot's word,               the caller sleeps)
       polling the interpreter's liveness fd)
    take_reply(slot); release(slot)

Memory (one memfd, like the arenas)::

    0    header: magic, version, ring_bytes, slots, slot_bytes | closed | tail | head
              | req_seq, req_sleeping, poked | slot_hint  (each on its own cache line)
              | bell (384: the process backend's, see HostEnd.want_bell), polled (388)
    512  request ring (ring_bytes, a power of two): records of
              [state u32 | len u32 | tag u32 | pad u32 | payload, padded to 16]
    ...  reply slots (slots x (64 + slot_bytes)):
              [state u32 | sleeping u32 | len u32 | tag u32 | go u64 | pad | payload]

Producers reserve ring space with a compare-and-swap on ``tail``, copy, then
publish the record's state; the consumer zeroes each record it takes (a later
record may start anywhere inside it) and advances ``head``.  A waiter announces
that it sleeps in its ``sleeping`` word before its last look, and a waker reads
that word after publishing, so a wake-up is never lost and never paid for when
nobody sleeps.  A slot's ``go`` word decides, by one compare-and-swap, whether the
request posted with it runs or is skipped unrun (a posted call past its deadline or
cancelled): ``claim`` clears it (the request runs), the host may ``arm`` it before
posting and ``cancel`` it later, and the interpreter decides with ``begin`` when it
takes the request, so the request is either started or skipped, never both and
never neither.  Messages larger than the ring or a slot are the caller's to
spill (the process backend sends them over its pipe).

This module decides *which* implementation runs: the C extension
``multipy._native`` (mechanism only: ring, futex, spin) unless it is missing or
``MULTIPY_NATIVE=0``, else :class:`PyChannel`, a pure-Python twin with the same
layout and behaviour that sleeps in slices instead of spinning.

Example:
    >>> import mmap
    >>> memory = mmap.mmap(-1, size(1 << 12, 2, 256))
    >>> prepare(memory, ring_bytes=1 << 12, slots=2, slot_bytes=256)
    >>> ch = Channel(memory)
    >>> slot = ch.claim(); ch.post(b"ping", slot)      # the ring position past it
    32
    >>> ch.taken
    0
    >>> ch.take(), ch.taken
    ((0, b'ping'), 32)
    >>> ch.reply(slot, b"pong", 7); ch.take_reply(slot)
    True
    (7, b'pong')
"""

from __future__ import annotations

import collections
import enum
import os
import select
import struct
import threading
import time
from functools import partial

from .frames import read_frame

HEADER_BYTES = 512
RECORD_HEAD = 16
SLOT_HEAD = 64
MAGIC = 0x4D504348
VERSION = 1
# Seconds between looks at the peer's liveness: the watcher among a channel's sleepers
# (the first to find none) looks every _SLICE (on the host, a slice that doubles while
# its wait lasts, up to _WATCH_MAX), every other sleeper every _QUIET_SLICE; a
# watcher that finds the peer dead wakes them all (see _native.c, "sleeping callers").
_SLICE = 0.002
_QUIET_SLICE = 0.1
_WATCH_MAX = 0.032  # the host's watcher: its slice doubles from _SLICE up to this

# Offsets of the header words (see the layout above and _native.c's header_t).
_CLOSED, _TAIL, _HEAD, _REQ_SEQ, _REQ_SLEEPING, _SLOT_HINT = 64, 128, 192, 256, 260, 320
_BELL = 384  # unused by the mechanism: set by the host once a reply needs the bell pipe
# 1 + the slot whose reply the host polls for (_native.poll_awaited), else 0: the
# extension's serving loop rings no bell for that reply (the Python paths always ring:
# a bell for a reply taken already only wakes the watch once for nothing).
_POLLED = 388
# The consumer's count of its sleeps that a poke ended (Channel.poke; diagnostics and
# tests: the twin, which never spins, leaves it at 0).
_POKED = 264
# A slot's go word (see _native.c's GO_*): 0 unarmed, 1 cancelled, 2 started, 3 skipped,
# else armed with a time.monotonic_ns() deadline (2**64 - 1: none).
_SLOT_GO = 16
_GO_UNARMED, _GO_CANCELLED, _GO_STARTED, _GO_SKIPPED = 0, 1, 2, 3
_GO_NO_DEADLINE = (1 << 64) - 1
_GEOMETRY = struct.Struct("<5I")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_RECORD = struct.Struct("<3I")    # state, len, tag
_SLOT = struct.Struct("<4I")      # state, sleeping, len, tag
_REC_EMPTY, _REC_DATA, _REC_PAD = 0, 1, 2
_SLOT_FREE, _SLOT_WAITING, _SLOT_REPLIED = 0, 1, 2


class Wait(enum.IntEnum):
    """How a wait on the channel ended."""

    READY = 0    # a request (or the reply) is there to take
    TIMEOUT = 1  # the timeout passed first
    DEAD = 2     # the liveness fd became readable: the peer is gone
    CLOSED = 3   # close() was called on the channel (either side)
    SLEPT = 4    # ready, but only after sleeping: the spin (if any) was too short


# The members as module globals: an enum's attribute costs a metaclass __getattr__
# lookup (about 0.7 µs here), and the waits below run once per call.
_READY, _TIMEOUT, _SLEPT = Wait.READY, Wait.TIMEOUT, Wait.SLEPT
_WOKEN = (Wait.READY, Wait.SLEPT)
_BELL_READY = "ready"  # what a completions' watch reports (backends.completions.READY)


def size(ring_bytes: int, slots: int, slot_bytes: int) -> int:
    """Bytes of shared memory a channel of this geometry needs."""
    return HEADER_BYTES + ring_bytes + slots * (SLOT_HEAD + slot_bytes)


def prepare(memory, *, ring_bytes: int, slots: int, slot_bytes: int) -> None:
    """Write a channel header into fresh, zeroed ``memory`` (an ``mmap``).

    ``ring_bytes`` must be a power of two; ``slot_bytes`` a multiple of 64.
    """
    if ring_bytes < 64 or ring_bytes & (ring_bytes - 1):
        raise ValueError(f"ring_bytes must be a power of two >= 64, not {ring_bytes}")
    if slots < 1 or slot_bytes % 64:
        raise ValueError("slots must be >= 1 and slot_bytes a multiple of 64")
    if len(memory) < size(ring_bytes, slots, slot_bytes):
        raise ValueError("memory is smaller than the channel")
    _GEOMETRY.pack_into(memory, 0, MAGIC, VERSION, ring_bytes, slots, slot_bytes)


def _r16(n: int) -> int:
    return (n + 15) & ~15


class _Futex:
    """FUTEX_WAIT/FUTEX_WAKE through ctypes (which releases the GIL around the
    call); where that is unavailable, a short sleep stands in for the wait."""

    def __init__(self) -> None:
        self.syscall = None
        try:
            import ctypes
            import platform

            nr = {"x86_64": 202, "aarch64": 98}.get(platform.machine())
            if nr is not None:
                libc = ctypes.CDLL(None, use_errno=True)
                self.syscall = libc.syscall
                self.nr = nr
                self.ctypes = ctypes
        except (OSError, AttributeError):
            self.syscall = None

    def wait(self, address: int, expected: int, seconds: float) -> None:
        if self.syscall is None:
            time.sleep(min(seconds, 0.0005))
            return
        c = self.ctypes
        ts = (c.c_long * 2)(int(seconds), int((seconds % 1) * 1e9))
        self.syscall(c.c_long(self.nr), c.c_void_p(address), c.c_int(0), c.c_uint(expected),
                     ts, None, 0)

    def wake(self, address: int) -> None:
        if self.syscall is not None:
            c = self.ctypes
            self.syscall(c.c_long(self.nr), c.c_void_p(address), c.c_int(1),
                         c.c_int(2 ** 31 - 1), None, None, 0)


_futex: _Futex | None = None


class PyChannel:
    """The pure-Python twin of ``multipy._native.Channel``: same layout, same API.

    Producers in one process serialise on a lock (the C version uses a
    compare-and-swap); waits sleep in FUTEX_WAIT slices through ctypes and never
    spin, since spinning in Python would hold the GIL.  Stores rely on the total
    store order of x86-64; on other machines use the extension.

    Example:
        >>> import mmap
        >>> m = mmap.mmap(-1, size(4096, 1, 64)); prepare(m, ring_bytes=4096, slots=1, slot_bytes=64)
        >>> PyChannel(m).geometry
        (4096, 1, 64)
    """

    def __init__(self, buffer, /) -> None:
        global _futex
        view = memoryview(buffer)
        if view.readonly or len(view) < HEADER_BYTES:
            raise ValueError("not a channel: write its header with channel.prepare() first")
        magic, version, ring, slots, slot_bytes = _GEOMETRY.unpack_from(view, 0)
        if (magic != MAGIC or version != VERSION or ring < 64 or ring & (ring - 1) or slots < 1
                or slot_bytes % 64 or len(view) < size(ring, slots, slot_bytes)):
            raise ValueError("not a channel: write its header with channel.prepare() first")
        self._m = view
        self._ring_bytes, self._slots, self._slot_bytes = ring, slots, slot_bytes
        self._post_lock = threading.Lock()
        self._watching = threading.Lock()  # held by the sleeper that watches the peer
        if _futex is None:
            _futex = _Futex()
        self._futex = _futex
        self._address = 0
        if _futex.syscall is not None:
            import ctypes

            self._anchor = ctypes.c_char.from_buffer(buffer)  # keeps the mapping alive
            self._address = ctypes.addressof(self._anchor)
        self._attached = True

    # -- helpers ---------------------------------------------------------------
    def _u32(self, off: int) -> int:
        return _U32.unpack_from(self._m, off)[0]

    def _set32(self, off: int, value: int) -> None:
        _U32.pack_into(self._m, off, value)

    def _slot_off(self, slot: int) -> int:
        if not 0 <= slot < self._slots:
            raise IndexError(f"slot {slot} out of range ({self._slots} slots)")
        return HEADER_BYTES + self._ring_bytes + slot * (SLOT_HEAD + self._slot_bytes)

    def _check(self) -> None:
        if not self._attached:
            raise ValueError("the channel is detached")

    def _front(self) -> int | None:
        """Offset of the oldest committed record, skipping padding; None if none."""
        m = self._m
        while True:
            head = _U64.unpack_from(m, _HEAD)[0]
            pos = head & (self._ring_bytes - 1)
            off = HEADER_BYTES + pos
            state = self._u32(off)
            if state == _REC_DATA:
                return off
            if state != _REC_PAD:
                return None
            m[off:off + RECORD_HEAD] = bytes(RECORD_HEAD)
            _U64.pack_into(m, _HEAD, head + self._ring_bytes - pos)

    # -- the API -----------------------------------------------------------------
    @property
    def geometry(self) -> tuple[int, int, int]:
        """``(ring_bytes, slots, slot_bytes)``."""
        self._check()
        return (self._ring_bytes, self._slots, self._slot_bytes)

    @property
    def pending(self) -> int:
        """Ring bytes posted but not yet taken (0: the consumer took every request)."""
        self._check()
        return _U64.unpack_from(self._m, _TAIL)[0] - _U64.unpack_from(self._m, _HEAD)[0]

    @property
    def closed(self) -> bool:
        """True once either side called :meth:`close`."""
        self._check()
        return self._u32(_CLOSED) != 0

    @property
    def taken(self) -> int:
        """Ring position up to which the consumer took requests."""
        self._check()
        return _U64.unpack_from(self._m, _HEAD)[0]

    def post(self, data, tag: int, /) -> int:
        """Copy ``data`` into the request ring; returns the ring position just past
        it (the consumer took it once :attr:`taken` reaches that), or 0 when the
        ring has no room now."""
        self._check()
        data = memoryview(data).cast("B")
        cap = self._ring_bytes
        n = len(data)
        if n + RECORD_HEAD > cap // 2:
            raise ValueError(f"a message of {n} bytes does not fit this ring "
                             f"(at most {cap // 2 - RECORD_HEAD}): spill it")
        rec = RECORD_HEAD + _r16(n)
        m = self._m
        with self._post_lock:
            tail = _U64.unpack_from(m, _TAIL)[0]
            head = _U64.unpack_from(m, _HEAD)[0]
            pos = tail & (cap - 1)
            pad = cap - pos if pos + rec > cap else 0
            if tail + pad + rec - head > cap:
                return 0
            _U64.pack_into(m, _TAIL, tail + pad + rec)
            if pad:
                self._set32(HEADER_BYTES + pos, _REC_PAD)
                tail += pad
            off = HEADER_BYTES + (tail & (cap - 1))
            m[off + RECORD_HEAD:off + RECORD_HEAD + n] = data
            _U32.pack_into(m, off + 4, n)
            _U32.pack_into(m, off + 8, tag)
            self._set32(off, _REC_DATA)
            self._set32(_REQ_SEQ, (self._u32(_REQ_SEQ) + 1) & 0xFFFFFFFF)
        if self._u32(_REQ_SLEEPING):
            self._wake(_REQ_SEQ)
        return tail + rec

    def poke(self) -> bool:
        """A request is coming: wake the consumer if it sleeps in :meth:`wait_request`
        (see the extension's docstring).  This twin never spins, so the woken wait
        only looks once and sleeps again until the post.  ``False`` when detached
        or closed, or when nothing slept."""
        if not self._attached or self._u32(_CLOSED):
            return False
        with self._post_lock:
            self._set32(_REQ_SEQ, (self._u32(_REQ_SEQ) + 1) & 0xFFFFFFFF)
        if not self._u32(_REQ_SLEEPING):
            return False
        self._wake(_REQ_SEQ)
        return True

    def take(self):
        """The oldest request as ``(tag, bytes)``, or None when the ring is empty."""
        self._check()
        off = self._front()
        if off is None:
            return None
        m = self._m
        _, n, tag = _RECORD.unpack_from(m, off)
        rec = RECORD_HEAD + _r16(n)
        if off + rec > HEADER_BYTES + self._ring_bytes:  # records never wrap: corrupt
            raise ValueError("a corrupt request record: its length runs past the end of the ring")
        data = bytes(m[off + RECORD_HEAD:off + RECORD_HEAD + n])
        m[off:off + rec] = bytes(rec)
        _U64.pack_into(m, _HEAD, _U64.unpack_from(m, _HEAD)[0] + rec)
        return tag, data

    def claim(self) -> int | None:
        """Take a free reply slot, or None when all are taken."""
        self._check()
        with self._post_lock:
            start = self._u32(_SLOT_HINT)
            for k in range(self._slots):
                i = (start + k) % self._slots
                off = self._slot_off(i)
                if self._u32(off) == _SLOT_FREE:
                    self._set32(off, _SLOT_WAITING)
                    _U64.pack_into(self._m, off + _SLOT_GO, _GO_UNARMED)
                    self._set32(_SLOT_HINT, (i + 1) % self._slots)
                    return i
        return None

    def release(self, slot: int, /) -> None:
        """Give a claimed slot back."""
        self._check()
        self._set32(self._slot_off(slot), _SLOT_FREE)

    def reply(self, slot: int, data, tag: int, /) -> bool:
        """Put ``data`` in ``slot`` and wake its waiter; False when it does not fit."""
        self._check()
        off = self._slot_off(slot)
        data = memoryview(data).cast("B")
        if len(data) > self._slot_bytes:
            return False
        m = self._m
        m[off + SLOT_HEAD:off + SLOT_HEAD + len(data)] = data
        _U32.pack_into(m, off + 8, len(data))
        _U32.pack_into(m, off + 12, tag)
        self._set32(off, _SLOT_REPLIED)
        if self._u32(off + 4):
            self._wake(off)
        return True

    def take_reply(self, slot: int, /):
        """``(tag, bytes)`` from ``slot`` (which stays claimed), or None."""
        self._check()
        off = self._slot_off(slot)
        m = self._m
        state, _, n, tag = _SLOT.unpack_from(m, off)
        if state != _SLOT_REPLIED:
            return None
        n = min(n, self._slot_bytes)
        out = (tag, bytes(m[off + SLOT_HEAD:off + SLOT_HEAD + n]))
        self._set32(off, _SLOT_WAITING)
        return out

    def wait_request(self, timeout: float, spin: float, fd: int, /) -> int:
        """Wait until :meth:`take` has a request (see the extension's docstring)."""
        self._check()
        return self._wait(lambda: self._front() is not None, _REQ_SEQ, _REQ_SLEEPING, timeout, fd)

    def wait_reply(self, slot: int, timeout: float, spin: float, max_spinners: int,
                   fd: int, /) -> int:
        """Wait for ``slot``'s reply (see the extension's docstring)."""
        self._check()
        off = self._slot_off(slot)
        return self._wait(lambda: self._u32(off) == _SLOT_REPLIED, off, off + 4, timeout, fd,
                          grow=True)

    def ready(self, slot: int, /) -> bool:
        """Whether ``slot`` holds a reply to take (never waits)."""
        self._check()
        return self._u32(self._slot_off(slot)) == _SLOT_REPLIED

    def asleep(self, slot: int, /) -> bool:
        """Whether ``slot``'s caller sleeps in FUTEX_WAIT now (for tests and diagnostics)."""
        self._check()
        return self._u32(self._slot_off(slot) + 4) != 0

    # The go word (see the module docstring).  Here the compare-and-swap is a lock of
    # this process: atomic among its threads only.  (The backends share a channel
    # between processes only through the extension.)
    def arm(self, slot: int, deadline_ns: int, /) -> None:
        """Before posting the request naming ``slot``: it runs only if the interpreter
        takes it before ``deadline_ns`` (``time.monotonic_ns()``; < 0: no deadline)
        and it was not cancelled by then."""
        self._check()
        go = _GO_NO_DEADLINE if deadline_ns < 0 else max(deadline_ns, _GO_SKIPPED + 1)
        _U64.pack_into(self._m, self._slot_off(slot) + _SLOT_GO, go)

    def begin(self, slot: int, /) -> bool:
        """The interpreter, having taken a request: run it (True) or answer it unrun."""
        self._check()
        off = self._slot_off(slot) + _SLOT_GO
        with self._post_lock:
            go = _U64.unpack_from(self._m, off)[0]
            if go in (_GO_UNARMED, _GO_STARTED, _GO_SKIPPED):
                return True
            run = go != _GO_CANCELLED and (go == _GO_NO_DEADLINE or time.monotonic_ns() < go)
            _U64.pack_into(self._m, off, _GO_STARTED if run else _GO_SKIPPED)
            return run

    def cancel(self, slot: int, /) -> bool:
        """Skip the request armed in ``slot`` unless it started: True when it is skipped."""
        self._check()
        off = self._slot_off(slot) + _SLOT_GO
        with self._post_lock:
            go = _U64.unpack_from(self._m, off)[0]
            if go in (_GO_UNARMED, _GO_STARTED):
                return False
            if go not in (_GO_CANCELLED, _GO_SKIPPED):
                _U64.pack_into(self._m, off, _GO_CANCELLED)
            return True

    def started(self, slot: int, /) -> bool:
        """Whether the interpreter decided to run the request armed in ``slot``."""
        self._check()
        return _U64.unpack_from(self._m, self._slot_off(slot) + _SLOT_GO)[0] == _GO_STARTED

    def close(self) -> None:
        """Mark the channel closed and wake every waiter on both sides."""
        if not self._attached:
            return
        self._set32(_CLOSED, 1)
        self._set32(_REQ_SEQ, (self._u32(_REQ_SEQ) + 1) & 0xFFFFFFFF)
        self._wake(_REQ_SEQ)
        for i in range(self._slots):
            self._wake(self._slot_off(i))

    def detach(self) -> None:
        """Let go of the buffer."""
        if self._attached:
            self._attached = False
            self._anchor = None
            self._m.release()

    # -- waiting ------------------------------------------------------------------
    def _wake(self, off: int) -> None:
        if self._address:
            self._futex.wake(self._address + off)

    def _wait(self, ready, word: int, sleeping: int, timeout: float, fd: int,
              grow: bool = False) -> int:
        """``grow``: the watcher's slice doubles up to _WATCH_MAX (the host's waits)."""
        if ready():
            return Wait.READY
        deadline = None if timeout < 0 else time.monotonic() + timeout
        poller = None
        if fd >= 0:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
        watcher = False
        watch = _SLICE
        try:
            while True:
                seen = self._u32(word)
                self._set32(sleeping, 1)
                try:
                    if ready():
                        return Wait.READY
                    if self._u32(_CLOSED):
                        return Wait.CLOSED
                    if not watcher:
                        watcher = self._watching.acquire(False)
                    left = watch if watcher or poller is None else _QUIET_SLICE
                    if watcher and grow:
                        watch = min(watch * 2, _WATCH_MAX)
                    if deadline is not None:
                        left = min(left, deadline - time.monotonic())
                        if left <= 0:
                            return Wait.TIMEOUT
                    if self._address:
                        self._futex.wait(self._address + word, seen, left)
                    else:
                        time.sleep(min(left, 0.0005))
                finally:
                    self._set32(sleeping, 0)
                if ready():
                    return Wait.SLEPT
                if poller is not None and poller.poll(0):
                    if ready():
                        return Wait.SLEPT
                    if watcher:  # the peer died: every sleeper learns it now
                        for slot in range(self._slots):
                            off = self._slot_off(slot)
                            if self._u32(off + 4):  # its sleeping word
                                self._wake(off)
                    return Wait.DEAD
        finally:
            if watcher:
                self._watching.release()


# -- the process backend's use of a channel (policy) -----------------------------------

#: Tag bit of a request or reply whose bytes follow over the pipe (too big for the
#: ring or a slot).  The low 16 bits of a request's tag name its reply slot.
SPILLED = 1 << 16
#: Geometry of a process interpreter's channel: a request or reply of up to 64 KiB
#: (the common call is well under 1 KiB) stays in shared memory.
#: One slot per request in flight: 256 callers of one interpreter wait each on its own
#: (the memfd is sparse: a slot's pages are touched only as far as its replies reach,
#: one page for a small reply).  With 64, a 65th caller waited for a slot under the
#: worker lock, and 100 host threads on one interpreter made a third of 64's calls.
RING_BYTES, SLOTS, SLOT_BYTES = 1 << 18, 256, (1 << 16) - SLOT_HEAD


def create(name: str) -> tuple[int, object]:
    """A new channel in its own memfd: ``(fd, channel)``; the fd goes to the interpreter."""
    import mmap

    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    n = size(RING_BYTES, SLOTS, SLOT_BYTES)
    os.ftruncate(fd, n)
    memory = mmap.mmap(fd, n)
    prepare(memory, ring_bytes=RING_BYTES, slots=SLOTS, slot_bytes=SLOT_BYTES)
    return fd, Channel(memory), memory


def attach(fd: int):
    """``(channel, memory)``: the channel in memfd ``fd`` (the interpreter's side)."""
    import mmap

    memory = mmap.mmap(fd, os.fstat(fd).st_size)
    return Channel(memory), memory


def _cores() -> int:
    """Cores this process may run on (its affinity), which spinning callers share
    with the interpreters (see HostEnd.wait)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class HostEnd:
    """The host's side of one interpreter's channel, shared by every host thread.

    Each request in flight holds one reply slot, so several calls can be in
    flight at once: a caller claims a slot (:meth:`claim`), posts its request
    naming that slot (:meth:`post`, spilling it to the request pipe when it is too
    big for the ring) and then waits on *its own* slot (:meth:`wait`), without a
    lock: the interpreter wakes exactly that caller.  Replies are still produced
    in request order (the interpreter serves one request at a time), which is
    what lets the process backend match spilled replies and those of callers
    who left.  Spinning adapts like :class:`~multipy.transport.frames.Waiter`:
    after a spin that ran out, the next 1, 2, 4 ... 64 waits sleep at once; and
    a caller spins only while the machine (:attr:`cores`) has a core that no busy
    interpreter and no other host thread needs (the extension counts the
    requests of this process in flight and the interpreters holding them); the
    others sleep in FUTEX_WAIT at once.  A spinning caller would otherwise take
    the core of the interpreter it waits for, or of the host thread holding the
    GIL, and its own call, or theirs, would only end later.
    """

    def __init__(self, channel, req_w: int, read_spilled, alive_fd: int, spin: float,
                 bell_r: int = -1, memory=None) -> None:
        self.channel = channel
        self.bell_r = bell_r  # the interpreter writes a byte here after a reply (want_bell)
        self.bell_closed = False
        self.memory = memory  # the channel's mapping: for the bell word
        self.req_w = req_w
        self.read_spilled = read_spilled  # () -> the next frame of the reply pipe, or None
        self.alive_fd = alive_fd
        self.spin = spin
        self.cores = _cores()
        self.limit = RING_BYTES // 2 - RECORD_HEAD
        ring_bytes, _, slot_bytes = channel.geometry
        self._slot0 = HEADER_BYTES + ring_bytes  # offset of slot 0's header
        self._stride = SLOT_HEAD + slot_bytes
        self.claim = channel.claim      # () -> a free reply slot, or None when all are taken
        self.release = channel.release  # (slot) -> None: give an unused slot back
        self.ready = channel.ready      # (slot) -> whether its reply is there (never waits)
        self._skip = 0
        self._backoff = 1
        # While a send waits for the interpreter (no room in the ring or no free slot,
        # or a big request's frame only partly into the request pipe), the interpreter
        # may be waiting for the host too: blocked writing a reply too big for its slot
        # to the reply pipe, until its reader reads it, and that reader may be the very
        # thread sending (the completion thread sends queued posted calls).  So such a
        # send runs ``drain()`` whenever ``reply_fd`` (the reply pipe) is readable: the
        # backend reads the replies waiting there into its keeping for their callers.
        # ``None``: nothing set (the sends wait as they are).
        self.reply_fd = -1
        self.drain = None

    def post(self, payload: bytes, slot: int) -> int:
        """Post one request whose reply goes to ``slot`` (claimed); returns the ring
        position past it (see :meth:`taken`), or 0 when the ring has no room now.
        A request too big for the ring is announced there and written to the pipe."""
        if len(payload) <= self.limit:
            return self.channel.post(payload, slot)
        end = self.channel.post(b"", slot | SPILLED)
        if end:
            from .frames import write_frame, write_frame_draining  # here: a big request is rare

            if self.drain is None:
                write_frame(self.req_w, payload)
            else:
                write_frame_draining(self.req_w, payload, self.reply_fd, self.drain)
        return end

    def send(self, payload: bytes, armed: bool = False, make_room=None) -> tuple[int, int]:
        """Claim a reply slot and post ``payload`` naming it: ``(slot, ring position
        past it)`` (see :meth:`taken`); an ``armed`` request can be cancelled until
        it starts (:meth:`arm`).  Waits while the channel is full (``make_room``
        as for :meth:`retry`) and raises :class:`BrokenPipeError` once the
        interpreter is gone.  (The process backend does these steps itself,
        recording the slot as soon as it is claimed.)"""
        slot = self.claim()
        if slot is None:
            slot = self.retry(self.claim, make_room)
        if armed:
            self.arm(slot, None)
        position = self.post(payload, slot)
        if not position:
            position = self.retry(lambda: self.post(payload, slot) or None, make_room)
        return slot, position

    def retry(self, attempt, make_room=None):
        """``attempt()`` (a :meth:`claim`, or a post returning ``None`` for no room)
        until it returns something other than ``None``: every reply slot is taken
        or the ring is full (rare: 256 calls in flight, or big requests queued).
        Before each new try ``make_room()`` runs, if given (it may settle slots
        of callers who left), then the calls in flight get a moment (the GIL
        released) to take their replies.  Raises :class:`BrokenPipeError` once
        the channel is closed or the interpreter is gone: nothing would free a
        slot (the channel is over then, a slot claimed with it too)."""
        got = None
        while got is None:
            if make_room is not None:
                make_room()
                got = attempt()
                if got is not None:
                    break
            if self.drain is not None and select.select([self.reply_fd], [], [], 0)[0]:
                self.drain()  # the interpreter may be blocked writing a reply (see drain)
            if self.channel.closed or select.select([self.alive_fd], [], [], 0)[0]:
                raise BrokenPipeError("the interpreter is gone: nothing will free a reply slot")
            time.sleep(0.0005)  # releases the GIL: the callers in flight take their replies
            got = attempt()
        return got

    def taken(self, end: int) -> bool:
        """Whether the interpreter took the request that :meth:`post` placed before ``end``."""
        return self.channel.taken >= end

    def wait(self, slot: int, timeout: float | None, next_in_line: bool = True) -> Wait:
        """Wait until ``slot``'s reply is there (releasing the GIL once).  Returns
        READY or SLEPT (there), TIMEOUT, DEAD (the interpreter died) or CLOSED.

        ``next_in_line=False`` sleeps at once (no spin)."""
        spin = self.spin if next_in_line else 0.0
        if spin and self._skip:
            self._skip -= 1
            spin = 0.0
        rc = self.channel.wait_reply(slot, -1.0 if timeout is None else timeout, spin,
                                     self.cores, self.alive_fd)
        if rc == _SLEPT and spin:
            self._backoff = min(self._backoff * 2, 64)
            self._skip = self._backoff
        elif rc == _READY:
            self._backoff = 1
        return rc

    def take(self, slot: int):
        """``(tag, payload)`` of ``slot``'s reply, freeing the slot, or ``None`` when it
        is not there yet.  A tag with :data:`SPILLED` set means the payload is the next
        reply frame of the reply pipe (``read_spilled``), in reply order."""
        got = self.channel.take_reply(slot)
        if got is not None:
            self.channel.release(slot)
        return got

    def spilled(self, key, kept: dict, key_of, read=None):
        """The spilled reply whose ``key_of(reply)`` is ``key``, as ``read()`` returns
        it (by default :attr:`read_spilled`: the next frame of the reply pipe), or
        ``None`` at end-of-file.  Spilled replies cross the pipe in reply order: those
        of other calls read on the way are kept in ``kept`` (by key) for their
        callers.  Callers serialise (a lock of theirs)."""
        reply = kept.pop(key, None)
        read = read or self.read_spilled
        while reply is None:
            reply = read()
            if reply is None:
                return None
            other = key_of(reply)
            if other != key:
                kept[other] = reply
                reply = None
        return reply

    def arm(self, slot: int, deadline: float | None) -> None:
        """Before posting a request into ``slot`` (claimed) whose caller may give it up:
        the interpreter skips it unrun, answering with a
        :class:`~multipy.errors.CallTimeoutError`, when it takes it at or after
        ``deadline`` (``time.monotonic``, the same clock in every process; ``None``:
        no deadline) or after :meth:`cancel`; otherwise it starts it.  One
        compare-and-swap decides which, so it is never both and never neither."""
        self.channel.arm(slot, deadline_ns(deadline))

    def cancel(self, slot: int) -> bool:
        """Have the request armed in ``slot`` (:meth:`arm`) skipped unless it started:
        True when it will not run (skipped now, or by the interpreter already),
        False when it started.  Its reply comes either way."""
        return self.channel.cancel(slot)

    # -- for a completion thread (posted requests) ---------------------------------
    def want_bell(self, wanted: bool = True) -> None:
        """Whether the interpreter rings the bell pipe after each reply.  Set it
        before posting a request whose reply a completion thread waits for, and
        clear it once no such request is in flight.

        While it is clear the interpreter never rings: a blocking caller waits on
        its reply slot, and the write would cost the interpreter a system call per
        call.  It is set before the request is published (the post is a full
        barrier), so the interpreter, which reads it after each reply, rings for
        that request's reply; a ring after it was cleared is harmless (the bell is
        emptied before each watch)."""
        if self.memory is not None:
            _U32.pack_into(self.memory, _BELL, 1 if wanted else 0)

    def watch_bell(self, completions, replied, callback, drain: bool = True) -> None:
        """Have ``completions`` (a completion thread's or loop's) call
        ``callback(event)`` once a reply may be there: soon, with ``"ready"``, when
        ``replied()`` finds one already or the interpreter is gone, else when the
        bell rings (or the completions stop).  The bell is emptied before the look
        (unless ``drain`` is False: the caller emptied it before its own last look):
        a reply published after it rings again, so the watch cannot miss it."""
        if drain:
            self.drain_bell()
        if self.bell_closed or replied():
            completions.call_soon(partial(callback, _BELL_READY))
        else:
            completions.watch_kept(self.bell_r, callback, self)  # a loop keeps reading it

    def drain_bell(self) -> None:
        """Empty the bell pipe; :attr:`bell_closed` once it reached end-of-file
        (the interpreter died: it held the only write end)."""
        while True:
            try:
                rung = len(os.read(self.bell_r, 4096))
            except BlockingIOError:
                return
            except OSError:  # closed by the host: this generation is over
                self.bell_closed = True
                return
            if not rung:
                self.bell_closed = True
                return
            if rung < 4096:
                return  # emptied (no second read just to raise BlockingIOError)

    def stop(self) -> None:
        """Mark the channel closed: the interpreter and every waiting caller wake up."""
        self.channel.close()

    def close(self) -> None:
        """Stop, and let go of the memory once no wait uses it."""
        self.channel.close()
        self.channel.detach()
        self.memory = None


class BellWatch:
    """The one watch of a :class:`HostEnd`'s bell for the posted calls in flight on it.

    Every posted call's reply rings the same bell (see :meth:`HostEnd.want_bell`),
    so exactly one completion context watches it at a time: that of the oldest
    call not handed over yet (replies come in request order).  When the bell
    rings (or the interpreter dies, or the completions stop), each call whose
    reply is in its slot is handed to its own completions, and the watch is armed
    again for the calls still waiting.  The process and subinterpreter backends
    keep one per channel (per interpreter generation).

    ``posted`` (call key -> entry, in send order; changed under ``lock``) holds
    the calls a completion context collects.  An entry has ``handed`` (given to
    its finish already), ``completions`` and ``finish(event)``.  ``slot_of(entry)``
    is its reply slot, or ``None`` when it has none any more (handed over at once).
    ``hand(entry, completions, event, gone)``, when given, replaces the default
    hand-over (``entry.finish`` on its own completions: at once when that is the
    watching one, else through its ``call_soon``); ``gone``: the interpreter is gone.
    :attr:`retired` (set once the generation is over and its calls have their
    outcome) stops the watch.

    >>> watch = BellWatch(end, lambda entry: entry.slot)      # doctest: +SKIP
    >>> with watch.lock:                                      # doctest: +SKIP
    ...     watch.posted[call] = entry
    >>> watch.watch()                                         # doctest: +SKIP
    """

    def __init__(self, end: HostEnd, slot_of, hand=None) -> None:
        self.end = end
        self.posted: dict = {}
        self.lock = threading.Lock()
        self.watching = None   # the completions watching the bell now
        self.retired = False
        self._slot_of = slot_of
        self._hand = hand if hand is not None else _hand_over

    def watch(self) -> None:
        """Have the completions of the oldest call not handed over yet watch the
        bell, unless one watches it already (it hands the calls over in order).

        A raise anywhere in it (a Ctrl-C as its lock lets go included) leaves the
        bell watched, or :attr:`watching` clear so that the next call watches it:
        never marked watched with no watch armed (the replies would wait forever).
        At worst it is watched twice, which wakes :meth:`on_bell` once for nothing."""
        completions = None
        armed = False
        try:
            with self.lock:
                if self.watching is not None or self.retired:
                    return
                for oldest in self.posted.values():
                    if not oldest.handed:
                        break
                else:
                    return
                completions = self.watching = oldest.completions
            here = getattr(completions, "here", None)  # a loop's: watch() only on its thread
            if here is not None and not here():
                completions.call_soon(lambda: self._arm(completions))
            else:
                self._arm(completions)
            armed = True
        except BaseException:
            if not armed:
                self._unwatch(completions)
            raise

    def _unwatch(self, completions) -> None:
        """No watch armed for ``completions`` after all: the next :meth:`watch` arms one."""
        if completions is not None:
            with self.lock:
                if self.watching is completions:
                    self.watching = None

    def _arm(self, completions) -> None:
        if self.retired:
            return  # this generation is over; its calls were given their outcome
        # Not emptied here (drain=False): every reply published since the bell was
        # last emptied (in on_bell or by a collect, before they looked at the slots)
        # left a ring in it, so the look or the watch after it cannot miss one.  A
        # ring left over from a reply handled already wakes on_bell once for nothing.
        armed = False
        try:
            self.end.watch_bell(completions, self.any_reply, partial(self.on_bell, completions),
                                drain=False)
            armed = True
        except BaseException:
            if not armed:
                self._unwatch(completions)
            raise

    def any_reply(self) -> bool:
        """Whether a call not handed over yet has its reply in its slot."""
        slot_of, ready = self._slot_of, self.end.ready
        try:
            for entry in list(self.posted.values()):
                if not entry.handed:
                    slot = slot_of(entry)
                    if slot is None or ready(slot):
                        return True
        except (ValueError, RuntimeError):  # detached, or changed meanwhile: look again
            return True
        return False

    def on_bell(self, completions, event: str) -> None:
        """The bell rang (or the interpreter died, or ``completions`` stopped: ``event``
        is then not ``"ready"``): hand each call whose reply is there over, then
        watch again.

        A raise anywhere in it (a Ctrl-C, or a hand-over that fails) still hands
        over every call it took and watches the bell again; the first error is
        raised after that."""
        if self.retired:
            return  # this generation is over; its calls were given their outcome
        if _ring_awaited is not None and event == _BELL_READY and _ring_awaited(self, completions):
            return  # a loop's lone awaited call, settled and its future set in C
        ready: list = []
        gone = False  # until known: watch again (a watch sees a dead interpreter at once)
        try:
            with self.lock:
                self.watching = None
            end = self.end
            gone = event != _BELL_READY or end.bell_closed
            if not gone:
                end.drain_bell()
                gone = end.bell_closed
            slot_of, replied = self._slot_of, end.ready
            try:
                for entry in list(self.posted.values()):
                    if not entry.handed and (gone or (slot := slot_of(entry)) is None
                                             or replied(slot)):
                        ready.append(entry)  # before it is marked: a raise between still hands it
                        entry.handed = True
            except (ValueError, RuntimeError):  # detached: every call is over
                gone = True
                for entry in list(self.posted.values()):
                    if not entry.handed:
                        ready.append(entry)
                        entry.handed = True
        except BaseException:
            self._unwatch(completions)  # raised before it was cleared: the watch below arms again
            raise
        finally:
            # Every call taken is handed over, even past one that raises (inline: a
            # Ctrl-C can land as a function is entered), then the bell watched again.
            error = None
            hand = self._hand
            for entry in ready:
                entry.handed = True
                try:
                    if hand is _hand_over and entry.completions is completions:
                        entry.finish(event)  # the default hand-over's common case, written out
                    else:
                        hand(entry, completions, event, gone)
                except BaseException as exc:
                    if error is None:
                        error = exc
            if not gone and self.posted:  # (none left: nothing to watch for)
                try:
                    self.watch()
                except BaseException as exc:
                    if error is None:
                        error = exc
            if error is not None:
                try:
                    raise error
                finally:
                    error = None  # no cycle through the traceback's frame


def deadline_ns(deadline: float | None) -> int:
    """``deadline`` (``time.monotonic`` seconds; ``None``: none) as the channel's
    deadlines are given (nanoseconds, a signed 64-bit count): ``-1``, no deadline,
    for ``None`` and for one past what that count holds (centuries away).

    >>> deadline_ns(1.5), deadline_ns(None), deadline_ns(1e300)
    (1500000000, -1, -1)
    """
    if deadline is None or not deadline < _DEADLINE_MAX_S:
        return -1
    return int(deadline * 1e9)


_DEADLINE_MAX_S = ((1 << 63) - 1) / 1e9  # the last second a signed 64-bit ns count holds, about


def _hand_over(entry, completions, event: str, gone: bool) -> None:
    """:class:`BellWatch`'s default hand-over: the call's finish on its own completions."""
    if entry.completions is completions:
        entry.finish(event)
    else:
        entry.completions.call_soon(lambda finish=entry.finish: finish(_BELL_READY))


class InterpreterEnd:
    """The interpreter's side: take requests in order, answer each in its slot."""

    def __init__(self, channel, req_r: int, rep_w: int, spin: float, bell_w: int = -1,
                 memory=None) -> None:
        self.channel = channel
        self.memory = memory  # the channel's mapping: the bell word (HostEnd.want_bell)
        self.req_r = req_r
        self.rep_w = rep_w
        self.spin = spin
        self.bell_w = bell_w  # written after each reply: a completion thread's epoll wakes
        if bell_w >= 0:
            os.set_blocking(bell_w, False)

    def serve_forever(self, serve, skip=None, common=None, finish=None) -> None:
        """Answer every request with ``serve(payload) -> reply payload`` until the host
        closes the channel or its request pipe, or dies.  A request the host armed
        (:meth:`HostEnd.arm`) and that is taken past its deadline or cancelled is
        answered with ``skip(payload)`` instead, unrun (when ``skip`` is given).

        ``common()`` (with ``finish``; the process backend's loop passes the
        extension's ``serve_calls``) serves the common call itself, in C, and
        returns each request it leaves to this loop, in order (see
        :meth:`_serve_common`)."""
        if common is not None:
            return self._serve_common(serve, skip, common, finish)
        ch, spin, req_r, rep_w, bell_w = self.channel, self.spin, self.req_r, self.rep_w, self.bell_w
        take, reply, write = ch.take, ch.reply, os.write
        begin = ch.begin if skip is not None else None
        memory = self.memory
        bell = _U32.unpack_from
        while True:
            item = take()
            if item is None:
                # A readable request pipe with an empty ring is its end-of-file: every
                # spilled frame is announced in the ring before it is written.
                if ch.wait_request(-1.0, spin, req_r) not in _WOKEN:
                    return
                continue
            tag, data = item
            if tag & SPILLED:
                data = read_frame(req_r)
                if data is None:
                    return
            slot = tag & 0xFFFF
            out = serve(data) if begin is None or begin(slot) else skip(data)
            if not reply(slot, out, 0):
                self._spill(slot, out)  # rings the bell itself, before writing
            # The host sets the word while a posted call is in flight (HostEnd.want_bell).
            elif bell_w >= 0 and (memory is None or bell(memory, _BELL)[0]):
                try:
                    write(bell_w, b"!")
                except BlockingIOError:
                    pass  # full: readable already


    def _serve_common(self, serve, skip, common, finish) -> None:
        """The loop with the common call served by ``common()`` (``multipy._native.
        serve_calls``), which answers binary calls until a request needs this loop and
        then returns it: ``(0, tag, payload)`` a request taken but not served, served
        here as :meth:`serve_forever` serves any (its go word may be decided already:
        ``begin`` then says to run it again); ``(1, slot, payload)`` one taken past its
        deadline or cancelled: ``skip(payload)``; ``[2, slot, ...]`` a call that ran,
        whose reply ``finish(item)`` makes; ``None`` once the host is gone."""
        begin = self.channel.begin
        while True:
            item = common()
            if item is None:
                return
            kind = item[0]
            if kind == 0:
                _, tag, data = item
                del item
                if tag & SPILLED:
                    data = read_frame(self.req_r)
                    if data is None:
                        return
                slot = tag & 0xFFFF
                out = serve(data) if skip is None or begin(slot) else skip(data)
            elif kind == 1:
                slot, data = item[1], item[2]
                del item
                out = skip(data) if skip is not None else serve(data)
            else:
                slot = item[1]
                out = finish(item)  # empties the list: no reference to the call's objects
                del item
            self.answer(slot, out)

    # -- the same steps, for a serving loop of its own (the subinterpreter backend's,
    # which leaves its loop to fetch shared buffers between taking and answering) --
    def next_request(self):
        """``(slot, payload)`` of the next request, waiting for it; ``None`` once the
        host closed the channel or its request pipe, or died."""
        ch = self.channel
        while True:
            item = ch.take()
            if item is not None:
                break
            if ch.wait_request(-1.0, self.spin, self.req_r) not in _WOKEN:
                return None
        tag, data = item
        if tag & SPILLED:
            data = read_frame(self.req_r)
            if data is None:
                return None
        return tag & 0xFFFF, data

    def answer(self, slot: int, out) -> None:
        """Put the reply ``out`` in ``slot`` (over the reply pipe when it does not
        fit), then ring the bell once the host asked for it (:meth:`HostEnd.want_bell`)."""
        if self.channel.reply(slot, out, 0):
            self._ring()
        else:
            self._spill(slot, out)

    def _spill(self, slot: int, out) -> None:
        """Send a reply too big for its slot over the reply pipe: announced in the
        slot first, and the bell rung before writing, since a write larger than the
        pipe holds returns only once a completion thread, woken by the bell, reads it."""
        from .frames import write_frame  # looked up per spill (fault tests replace it)

        self.channel.reply(slot, b"", SPILLED)
        self._ring()
        write_frame(self.rep_w, out)

    def _ring(self) -> None:
        """Ring the bell while the host has a posted call in flight (HostEnd.want_bell)."""
        if self.bell_w >= 0 and (self.memory is None or _U32.unpack_from(self.memory, _BELL)[0]):
            try:
                os.write(self.bell_w, b"!")
            except BlockingIOError:
                pass  # full: readable already


def native_status() -> tuple[object | None, str]:
    """``(multipy._native or None, why)``: which channel implementation runs here.

    Example:
        >>> module, why = native_status()
        >>> why                                           # doctest: +SKIP
        'native: the C extension multipy._native is loaded'
    """
    if os.environ.get("MULTIPY_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "pure Python: MULTIPY_NATIVE=0 turns the C extension off"
    try:
        from .. import _native
    except ImportError as exc:
        return None, (f"pure Python: the C extension multipy._native is not built here ({exc}); "
                      "reinstall with a C compiler available to build it")
    if not hasattr(_native, "held_blocks"):  # built from an older source: rebuild it
        return None, ("pure Python: the C extension multipy._native was built from an older "
                      "multipy; rebuild it (python setup.py build_ext --inplace, or reinstall)")
    return _native, "native: the C extension multipy._native is loaded"


_native_module, NATIVE_WHY = native_status()

#: True when calls go through the C extension.
NATIVE = _native_module is not None

#: The channel class in use: the extension's where it is active, else the twin.
Channel = _native_module.Channel if NATIVE else PyChannel

# BellWatch.on_bell's common case on an event loop, in C (see runtime.dispatch, which
# registers what it recognises); None on the Python path.
_ring_awaited = getattr(_native_module, "ring_awaited", None) if NATIVE else None
