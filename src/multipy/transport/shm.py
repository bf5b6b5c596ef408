"""Shared-memory segments and the arenas that tensors are placed in.

Every segment is an anonymous ``memfd``: it has no name in ``/dev/shm``, so
nothing can be left behind there, whatever happens to the host or its
interpreters.  A process that does not hold the descriptor opens it through
``/proc/<owner pid>/fd/<fd>``; the inode is checked so a recycled descriptor
number is never mistaken for the segment.

::

      host                                    interpreter
      ----                                    -----------
      args arena   (host allocates) ───────▶  tensors viewed in place
      results arena  ◀─────── (interpreter allocates, host frees)
      shared segments (movables)  ───────▶  mapped copy-on-write

An :class:`Arena` is a segment plus a first-fit allocator.  Only one side
allocates in a given arena; the other side reports blocks it is done with, so
the allocator needs no cross-process lock.  A tensor view of a block carries a
finalizer that reports the block free when the last view of it dies.
"""

from __future__ import annotations

import bisect
import collections
import mmap
import os
import threading
import weakref

ALIGN = 64


def _round(n: int) -> int:
    return (max(n, 1) + ALIGN - 1) & ~(ALIGN - 1)


class Segment:
    """One memfd mapped into this process.

    ``view(offset, n)``
    returns a numpy ``uint8`` array over the bytes (numpy is used because its
    arrays carry weak references, which is how block lifetimes are tracked).
    """

    def __init__(self, fd: int, size: int, *, private: bool = False) -> None:
        import numpy as np  # deferred: the subinterpreter backend never maps segments

        self.fd = fd
        self.inode = os.fstat(fd).st_ino
        self.private = private
        self._np = np
        self._map(size)

    @classmethod
    def create(cls, size: int, *, name: str = "multipy") -> "Segment":
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, max(size, ALIGN))
        return cls(fd, max(size, ALIGN))

    @classmethod
    def open(cls, pid: int, fd: int, inode: int, *, private: bool = False) -> "Segment":
        """Open a segment held by another process (``pid``) as descriptor ``fd``."""
        own = open_descriptor(pid, fd, inode)
        return cls(own, os.fstat(own).st_size, private=private)

    def _map(self, size: int) -> None:
        access = mmap.ACCESS_COPY if self.private else mmap.ACCESS_WRITE
        self.size = size
        self.mm = mmap.mmap(self.fd, size, access=access)
        self.base = self._np.frombuffer(self.mm, dtype=self._np.uint8)
        self.address = self.base.ctypes.data

    def remap(self) -> None:
        """Map again at the file's current size (after the owner grew it)."""
        self._map(os.fstat(self.fd).st_size)

    def grow(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self._map(size)

    def ensure(self, end: int) -> None:
        if end > self.size:
            self.remap()
            if end > self.size:
                raise ValueError(f"block ends at {end} past the segment's {self.size} bytes")

    def contains(self, address: int) -> bool:
        return self.address <= address < self.address + self.size

    def view(self, offset: int, nbytes: int):
        self.ensure(offset + nbytes)
        return self.base[offset:offset + nbytes]

    def ident(self) -> tuple[int, int, int]:
        """``(pid, fd, inode)`` for :meth:`open` in another process."""
        return (os.getpid(), self.fd, self.inode)

    def close(self) -> None:
        """Close the descriptor.  Live views keep their mapping until they die."""
        self.base = None
        self.mm = None  # unmapped by the GC once no view exports it
        try:
            os.close(self.fd)
        except OSError:
            pass


def open_descriptor(pid: int, fd: int, inode: int) -> int:
    """A descriptor of this process for the segment that process ``pid`` holds as
    ``fd``; ``OSError`` when it is gone or the number now names another file.

    >>> segment = Segment.create(4096)
    >>> own = open_descriptor(*segment.ident())
    >>> os.fstat(own).st_ino == segment.inode
    True
    >>> os.close(own); segment.close()
    """
    path = f"/proc/{pid}/fd/{fd}"
    own = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    if os.fstat(own).st_ino != inode:
        os.close(own)
        raise OSError(f"{path} is no longer the shared segment (inode changed)")
    return own


SMALL = 1 << 16


class Arena:
    """A segment with an allocator owned by one side.

    Blocks up to 64 KiB come from power-of-two size classes (a list pop on the
    hot path) and go back to their class when freed; larger blocks are placed
    first-fit and coalesced on free.  ``alloc`` grows the segment (doubling)
    when nothing fits.  Thread-safe.
    """

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self._lock = threading.Lock()
        self._free_offsets = [0]
        self._free_sizes = {0: segment.size}
        self._used: dict[int, int] = {}
        # Freed small blocks by size class.  Taking one and giving one back are single
        # list and dict operations, atomic without the lock (each is one C call).
        # multipy._native.tensor_item takes blocks from these two dicts the same way
        # (keep them in step with it).
        self._classes: dict[int, list[int]] = {1 << k: [] for k in range(ALIGN.bit_length() - 1,
                                                                          SMALL.bit_length())}

    def alloc(self, nbytes: int) -> int:
        need = (nbytes + ALIGN - 1) & ~(ALIGN - 1) if nbytes > ALIGN else ALIGN  # _round, inlined
        if need <= SMALL:
            need = 1 << (need - 1).bit_length()
            free = self._classes[need]
            if free:
                try:
                    offset = free.pop()
                except IndexError:  # another thread took the last one
                    pass
                else:
                    self._used[offset] = need
                    return offset
        with self._lock:
            offset = self._take(need)
            if offset is not None:
                return offset
            old = self.segment.size
            new = max(old * 2, old + need)
            self.segment.grow(new)
            self._insert(old, new - old)
            self._coalesce_tail()
        return self.alloc(nbytes)

    def _take(self, need: int) -> int | None:
        for i, off in enumerate(self._free_offsets):
            size = self._free_sizes[off]
            if size >= need:
                del self._free_offsets[i]
                del self._free_sizes[off]
                if size > need:
                    self._insert(off + need, size - need)
                self._used[off] = need
                return off
        return None

    def _insert(self, off: int, size: int) -> None:
        bisect.insort(self._free_offsets, off)
        self._free_sizes[off] = size

    def _coalesce_tail(self) -> None:
        offs = self._free_offsets
        if len(offs) >= 2:
            a, b = offs[-2], offs[-1]
            if a + self._free_sizes[a] == b:
                self._free_sizes[a] += self._free_sizes.pop(b)
                offs.pop()

    def free(self, off: int) -> None:
        size = self._used.pop(off, None)
        if size is None:
            return
        if size <= SMALL:
            self._classes[size].append(off)
            return
        with self._lock:
            offs = self._free_offsets
            i = bisect.bisect_left(offs, off)
            if i < len(offs) and off + size == offs[i]:
                size += self._free_sizes.pop(offs.pop(i))
            if i > 0 and offs[i - 1] + self._free_sizes[offs[i - 1]] == off:
                self._free_sizes[offs[i - 1]] += size
            else:
                offs.insert(i, off)
                self._free_sizes[off] = size


class BlockRef(weakref.ref):
    """A weak reference to a block's holder that knows the block's offset (no
    closure per block)."""

    __slots__ = ("offset",)


class BlockViews:
    """Which arena blocks live tensors view here, counted per block.

    ``add(offset, holder)`` watches ``holder`` (the numpy array a tensor's
    storage keeps alive).  A holder's death runs no Python code: its weak
    reference's callback is a C-level ``deque.append`` that records it in
    :attr:`pending` (a tensor may die in any thread, and a Python callback per
    result cost more than the rest of its deallocation).  :meth:`settle` applies
    the recorded deaths: when the last holder of a block has died,
    ``on_last(offset)`` runs.  Asking whether a block is viewed (``offset in
    views``) settles first, so the answer is exact.  A ``lock`` (reentrant)
    guards the counts when several threads use the blocks.

    >>> import numpy
    >>> released = []
    >>> views = BlockViews(released.append)
    >>> holder = numpy.zeros(4)
    >>> views.add(64, holder)
    >>> del holder
    >>> views.settle(); released
    [64]
    """

    def __init__(self, on_last, lock=None) -> None:
        #: offset -> references of its live holders; read it after :meth:`settle`
        self.viewed: dict[int, list] = {}
        self._on_last = on_last
        self._lock = lock if lock is not None else threading.RLock()
        #: references of holders that died since the last :meth:`settle`
        self.pending: collections.deque = collections.deque()
        self._ref_died = self.pending.append  # C-level: no Python frame when a tensor dies

    def add(self, offset: int, holder) -> None:
        ref = BlockRef(holder, self._ref_died)
        ref.offset = offset
        with self._lock:
            refs = self.viewed.get(offset)
            if refs is None:
                self.viewed[offset] = [ref]
            else:
                refs.append(ref)

    def __contains__(self, offset: int) -> bool:
        if self.pending:
            self.settle()
        return offset in self.viewed

    def settle(self) -> None:
        """Apply the deaths recorded in :attr:`pending`: ``on_last(offset)`` for every
        block whose last holder is gone."""
        pending = self.pending
        if not pending:
            return
        with self._lock:
            while pending:
                try:
                    ref = pending.popleft()
                except IndexError:  # another thread took the last one
                    return
                offset = ref.offset
                refs = self.viewed.get(offset)
                if refs is None:
                    continue
                # Dead references compare by identity: `in` finds this one only.
                if ref in refs:
                    refs.remove(ref)
                if not refs:
                    del self.viewed[offset]
                    self._on_last(offset)


class HeldBlocksPy:
    """The host's books of its own argument blocks that result tensors view (an
    argument handed back in place): a block is free again once no tensor views
    it, its call has ended (:meth:`release`) and the interpreter does not keep
    it (``pins``, the set of blocks it keeps after their call).

    The Python twin of ``multipy._native.HeldBlocks`` (see :func:`held_blocks`),
    on :class:`BlockViews`; ``lock`` (reentrant) guards the counts and ``pins``.

    >>> arena = Arena(Segment.create(1 << 16))
    >>> block = arena.alloc(64)
    >>> held = HeldBlocksPy(arena, set(), threading.RLock())
    >>> held.release([block]); block in arena._used      # not viewed: freed
    False
    """

    def __init__(self, arena: Arena, pins: set, lock) -> None:
        self._arena, self._pins, self._lock = arena, pins, lock
        self._views = BlockViews(self._last, lock)
        self.add = self._views.add
        self.settle = self._views.settle

    def _last(self, offset: int) -> None:
        if offset not in self._pins:
            self._arena.free(offset)

    def __contains__(self, offset: int) -> bool:
        return offset in self._views

    @property
    def pending(self):
        """Deaths not applied yet (:meth:`settle` applies them)."""
        return self._views.pending

    @property
    def viewed(self) -> dict:
        """offset -> live views of the block."""
        self._views.settle()
        return {offset: len(refs) for offset, refs in self._views.viewed.items()}

    def release(self, placed, pinned=(), unpinned=()) -> None:
        """A call ended: the blocks in ``unpinned`` leave the pins (freed unless
        viewed), those in ``pinned`` join them, and the call's ``placed`` blocks
        are freed unless viewed or pinned.

        In the extension's order: the pins change before the deaths recorded so
        far are settled, so a block whose last view died and that this call pins
        stays in use."""
        with self._lock:
            views, pins, arena = self._views, self._pins, self._arena
            viewed = views.viewed
            for offset in unpinned:
                pins.discard(offset)
                if offset not in viewed:
                    arena.free(offset)
            pins.update(pinned)
            views.settle()
            viewed = views.viewed
            for offset in placed:
                if offset not in viewed and offset not in pins:
                    arena.free(offset)


def held_blocks(arena: Arena, pins: set, lock) -> "HeldBlocksPy":
    """The books of ``arena``'s blocks that host result tensors view: the
    extension's ``HeldBlocks`` where it is loaded (a result tensor's holder
    reports its own death to it, which frees a block of up to 64 KiB at once,
    without a lock or a Python frame), else :class:`HeldBlocksPy` (``lock``
    used).  Both have ``add(offset, holder)``, ``offset in held``,
    ``pending``/``settle()`` (larger blocks whose last view died) and
    ``release(placed, pinned, unpinned)``.

    >>> arena = Arena(Segment.create(1 << 16))
    >>> held = held_blocks(arena, set(), threading.RLock())
    >>> block = arena.alloc(64)
    >>> held.release([block], (), ()); block in arena._used
    False
    """
    from .channel import _native_module

    if _native_module is not None:
        return _native_module.held_blocks(arena, pins)
    return HeldBlocksPy(arena, pins, lock)
