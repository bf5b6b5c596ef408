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
        self._classes: dict[int, list[int]] = {}

    def alloc(self, nbytes: int) -> int:
        need = (max(nbytes, 1) + ALIGN - 1) & ~(ALIGN - 1)  # _round, inlined (once per tensor)
        if need <= SMALL:
            need = 1 << (need - 1).bit_length()
            free = self._classes.get(need)
            if free:
                with self._lock:
                    if free:
                        offset = free.pop()
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
        with self._lock:
            size = self._used.pop(off, None)
            if size is None:
                return
            if size <= SMALL:
                self._classes.setdefault(size, []).append(off)
                return
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
    storage keeps alive); when the last holder of a block dies,
    ``on_last(offset)`` runs.  Finalizers run in whatever thread drops the last
    reference, so a ``lock`` (reentrant: the GC may run a finalizer inside it)
    guards the counts when several threads use the blocks.
    """

    def __init__(self, on_last, lock=None) -> None:
        self._refs: dict[int, list] = {}
        self._on_last = on_last
        self._lock = lock if lock is not None else threading.RLock()
        self._ref_died = self._holder_died  # one bound method for every holder

    def add(self, offset: int, holder) -> None:
        ref = BlockRef(holder, self._ref_died)
        ref.offset = offset
        with self._lock:
            refs = self._refs.get(offset)
            if refs is None:
                self._refs[offset] = [ref]
            else:
                refs.append(ref)

    def __contains__(self, offset: int) -> bool:
        return offset in self._refs

    def _holder_died(self, ref) -> None:
        self._died(ref.offset, ref)

    def _died(self, offset: int, ref) -> None:
        with self._lock:
            refs = self._refs.get(offset, [])
            if ref in refs:
                refs.remove(ref)
            if refs:
                return
            self._refs.pop(offset, None)
            self._on_last(offset)
