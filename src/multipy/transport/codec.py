"""Pickling with tensors out of band.

A message is an ordinary pickle (protocol 5) in which every CPU tensor is
replaced by a small descriptor ``(segment, offset, nbytes, dtype, shape,
stride, storage_offset)``.  The tensor's bytes are written once into a
shared-memory block (or not at all when the tensor already lives in a segment
the receiver can map) and the receiver views them in place::

    encode: tensor ──copy──▶ arena block      descriptor ──▶ pickle
    decode: pickle ──▶ descriptor ──▶ numpy view of block ──▶ torch tensor (no copy)

``Encoder`` and ``Decoder`` hold the per-side policy: which arena outbound
tensors go to, which segments inbound descriptors may name, and what happens
when a received block dies (``on_release``).  torch is imported lazily so the
codec also serves interpreters that never load it.
"""

from __future__ import annotations

import io
import pickle
import sys
from typing import Any, Callable

from ..errors import TransportError
from .shm import Arena, Segment, track

# Descriptor segment names.  Anything else is a ``(pid, fd, inode)`` ident.
OUTBOUND = "o"   # the sender's arena (host: args arena; interpreter: results arena)
RETURNED = "r"   # the receiver's own arena, handed back without a copy
EMPTY = "e"      # numel == 0: no bytes at all
HANDLE = "h"     # ("h", id): an object in the receiver's object table

_DTYPES: dict[str, Any] = {}


def _dtype(name: str):
    if not _DTYPES:
        import torch

        for value in vars(torch).values():
            if isinstance(value, torch.dtype):
                _DTYPES[str(value)] = value
    return _DTYPES[name]


def view_tensor(array, dtype_name: str, shape, stride, storage_offset):
    """A tensor over ``array``'s bytes (numpy uint8), sharing its memory."""
    import torch

    base = torch.from_numpy(array)
    dtype = _dtype(dtype_name)
    if dtype != torch.uint8:
        base = base.view(dtype)
    return base.as_strided(shape, stride, storage_offset)


def tensor_nbytes(t) -> int:
    return t.numel() * t.element_size()


class Encoder:
    """Pickles values for one direction of one interpreter link.

    ``arena`` receives copies of outbound tensors; ``placed`` collects the
    offsets allocated while encoding (the caller frees or keeps them).
    ``returnable`` is a segment the receiver owns: tensors already in it cross
    by reference.  ``shared`` maps segment addresses to idents for tensors in
    shared segments (movables), which also cross by reference.
    """

    def __init__(self, arena: Arena | None, *, returnable: Segment | None = None,
                 shared: Callable[[int], tuple | None] | None = None,
                 keep_grad: bool = False) -> None:
        self.arena = arena
        self.returnable = returnable
        self.shared = shared
        self.keep_grad = keep_grad
        self.placed: list[int] = []
        self.handles: tuple | None = None  # (Obj type, obj -> handle id) for this request
        self._torch = None

    def encode(self, value: Any, /) -> bytes:
        self.placed = []
        buf = io.BytesIO()
        pickler = pickle.Pickler(buf, protocol=5)
        pickler.persistent_id = self._persistent_id
        try:
            pickler.dump(value)
        except TransportError:
            raise
        except Exception as exc:
            raise TransportError(describe_unpicklable(value, exc)) from exc
        return buf.getvalue()

    def _persistent_id(self, obj):
        torch = self._torch
        if torch is None:
            torch = sys.modules.get("torch")
            if torch is None:
                handles = self.handles
                if handles is not None and type(obj) is handles[0]:
                    return (HANDLE, handles[1](obj))
                return None
            self._torch = torch
        if type(obj) is not torch.Tensor:
            handles = self.handles
            if handles is not None and type(obj) is handles[0]:
                return (HANDLE, handles[1](obj))
            return None
        return self.describe(obj)

    def describe(self, t) -> tuple | None:
        """Descriptor for tensor ``t``, copying its bytes into the arena if needed."""
        torch = self._torch or sys.modules["torch"]
        if t.layout != torch.strided or t.is_quantized or t.device.type != "cpu":
            if t.device.type != "cpu":
                raise TransportError(
                    f"a {t.device.type} tensor cannot cross the process boundary yet; "
                    "move it to the CPU first")
            return None  # sparse and quantized tensors are pickled by value
        grad = bool(self.keep_grad and t.requires_grad)
        t = t.detach()
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        dtype = str(t.dtype)
        if t.numel() == 0:
            return (EMPTY, 0, 0, dtype, tuple(t.shape), tuple(t.stride()), 0, grad)
        storage = t.untyped_storage()
        address = storage.data_ptr()
        if self.returnable is not None and self.returnable.contains(address):
            return (RETURNED, address - self.returnable.address, storage.nbytes(), dtype,
                    tuple(t.shape), tuple(t.stride()), t.storage_offset(), grad)
        if self.shared is not None:
            found = self.shared(address)
            if found is not None:
                ident, base = found
                return (ident, address - base, storage.nbytes(), dtype,
                        tuple(t.shape), tuple(t.stride()), t.storage_offset(), grad)
        if self.arena is None:
            raise TransportError("tensors cannot cross this link")
        nbytes = tensor_nbytes(t)
        offset = self.arena.alloc(nbytes)
        self.placed.append(offset)
        dst = view_tensor(self.arena.segment.view(offset, nbytes), dtype,
                          tuple(t.shape), _contiguous_stride(t.shape), 0)
        dst.copy_(t)
        return (OUTBOUND, offset, nbytes, dtype, tuple(t.shape), tuple(dst.stride()), 0, grad)


def _contiguous_stride(shape) -> tuple:
    stride, acc = [], 1
    for n in reversed(tuple(shape)):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


class Decoder:
    """Unpickles values, viewing tensor descriptors in place.

    ``outbound`` is the peer's arena segment (mapped here); ``own`` is this
    side's arena segment (for tensors handed back by reference); ``open_shared``
    maps an ident to a :class:`Segment`.  ``on_release(offset)`` is called
    when the last tensor over a block of ``outbound`` dies; ``received``
    collects ``(offset, array)`` of the blocks decoded by the last call.
    """

    def __init__(self, outbound: Segment | None, *, own: Segment | None = None,
                 open_shared: Callable[[tuple], Segment] | None = None,
                 on_release: Callable[[int], None] | None = None,
                 find_class: Callable[[str, str], Any] | None = None,
                 resolve_handle: Callable[[int], Any] | None = None) -> None:
        self.outbound = outbound
        self.resolve_handle = resolve_handle
        self.own = own
        self.open_shared = open_shared
        self.on_release = on_release
        self.find_class = find_class
        self.received: list = []

    def decode(self, data: bytes, /) -> Any:
        self.received = []
        unpickler = pickle.Unpickler(io.BytesIO(data))
        unpickler.persistent_load = self._persistent_load
        if self.find_class is not None:
            unpickler.find_class = self.find_class
        return unpickler.load()

    def _persistent_load(self, pid):
        if pid[0] == HANDLE:
            return self.resolve_handle(pid[1])
        seg, offset, nbytes, dtype, shape, stride, storage_offset, grad = pid
        if seg == EMPTY:
            import torch

            t = torch.empty_strided(shape, stride, dtype=_dtype(dtype))
        else:
            if seg == OUTBOUND:
                segment = self.outbound
            elif seg == RETURNED:
                segment = self.own
            else:
                segment = self.open_shared(seg)
            array = segment.view(offset, nbytes)
            if seg == OUTBOUND:
                self.received.append((offset, array))
                if self.on_release is not None:
                    track(array, self.on_release, offset)
            t = view_tensor(array, dtype, shape, stride, storage_offset)
        if grad:
            t.requires_grad_(True)
        return t


def describe_unpicklable(value: Any, exc: BaseException, where: str = "value") -> str:
    """Find the first part of ``value`` that cannot be pickled and name it.

    >>> describe_unpicklable({"f": lambda: 0}, Exception("x"), "result").split(":")[0]
    "result['f'] is a function that cannot be pickled"
    """
    path, bad = _find_unpicklable(value, where)
    kind = type(bad)
    name = f"{kind.__module__}.{kind.__qualname__}" if kind.__module__ != "builtins" else kind.__qualname__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return (f"{path} is {article} {name} that cannot be pickled: {exc}. "
            "Return plain values, tensors or picklable objects, or keep the object in the "
            "interpreter and use an Obj handle (session.global_ / Obj.attr) instead.")


def _find_unpicklable(value: Any, where: str, depth: int = 0):
    if depth < 20:
        items = ()
        if isinstance(value, dict):
            items = ((f"{where}[{k!r}]", v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            items = ((f"{where}.{k}", v) for k, v in vars(value).items())
        for sub_where, sub in items:
            try:
                pickle.dumps(sub, protocol=5)
            except Exception:
                return _find_unpicklable(sub, sub_where, depth + 1)
    return where, value
