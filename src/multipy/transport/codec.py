"""Pickling with tensors out of band.

A message is an ordinary pickle (protocol 5) in which every CPU tensor is
replaced by a small descriptor ``(segment, offset, nbytes, dtype, shape,
stride, storage_offset)``.  The tensor's bytes are written once into a
shared-memory block (or not at all when the tensor already lives in a segment
the receiver can map) and the receiver views them in place::

    encode: tensor ──copy──▶ arena block      descriptor ──▶ pickle
    decode: pickle ──▶ descriptor ──▶ numpy view of block ──▶ torch tensor (no copy)

The common call's binary forms (below) carry the same descriptors as tensor
items; where the extension is loaded, it writes and reads those items itself,
through DLPack (see :func:`native_tensors`): no Python call into torch, no numpy.

``Encoder`` and ``Decoder`` hold the per-side policy: which arena outbound
tensors go to, which segments inbound descriptors may name, and what happens
when a received block dies (``released``).  torch is imported lazily so the
codec also serves interpreters that never load it.
"""

from __future__ import annotations

import collections
import copyreg
import ctypes
import io
import pickle
import struct
import sys
from typing import Any, Callable

from ..errors import MultipyError, TransportError
from . import cuda
from .cuda_link import CUDA_BLOCK
from .shm import Arena, BlockRef, Segment
from .tensors import decoding, dtype as _dtype, dtype_name as _dtype_name, \
    numpy_dtype as _numpy_dtype, strided as _strided

# Descriptor segment names.  Anything else is a ``(pid, fd, inode)`` ident.
OUTBOUND = "o"   # the sender's arena (host: args arena; interpreter: results arena)
RETURNED = "r"   # the receiver's own arena, handed back without a copy
EMPTY = "e"      # numel == 0: no bytes at all
HANDLE = "h"     # ("h", id): an object in the receiver's object table
# CUDA_BLOCK ("c"): a CUDA tensor in the link buffer of its device (cuda_link)

def view_tensor(array, dtype_name: str, shape, stride, storage_offset):
    """A tensor over ``array``'s bytes (numpy uint8), sharing its memory."""
    return hold_tensor(array, dtype_name, shape, stride, storage_offset)[0]


def hold_tensor(array, dtype_name: str, shape, stride, storage_offset):
    """``(tensor, holder)``: a tensor over ``array``'s bytes and the numpy array
    its storage keeps alive (weak-reference *that* to learn when the bytes are free)."""
    import torch

    if stride is None:
        np_dtype = _numpy_dtype(dtype_name)
        if np_dtype is not None:  # numpy reshapes for a fraction of torch's dispatch cost
            holder = array.view(np_dtype).reshape(shape)
            return torch.from_numpy(holder), holder
    base = torch.from_numpy(array)
    dtype = _dtype(dtype_name)
    if dtype != torch.uint8:
        base = base.view(dtype)
    if stride is None:
        return base.view(shape), array
    return base.as_strided(shape, stride, storage_offset), array


def _copier():
    """``copy(dst, src, nbytes)``: the extension's (keeps the GIL for all but huge
    copies), else ``ctypes.memmove`` (releases it for every copy)."""
    from .channel import _native_module

    return getattr(_native_module, "copy", None) or ctypes.memmove


_copy = _copier()


# -- the binary forms of the common call ------------------------------------------
#
# A message is a pickle (protocol 5: its first byte is 0x80) or, for the common
# call, one of two fixed binary forms whose first byte says which:
#
#   FAST_VALUE  tag | item                       one None, bool, int, float or tensor
#   FAST_CALL   tag | grad | nargs | mlen | rid | nfreed | method | freed[] | item[]
#               a CALL_REPLICATED request: positional tensor and scalar arguments,
#               no keyword arguments, no drops, the object already loaded
#
#   item        0 None | 1 False | 2 True | 3 int64 | 4 float64
#               | 5 seg dtype ndim strided offset nbytes storage_offset shape[] (stride[])
#
# Anything else (keyword arguments, containers, CUDA tensors, handles, big ints)
# is pickled.  The binary forms carry the same tensor descriptors as the pickle
# (see Encoder.describe), so both ends treat a tensor the same either way.

FAST_VALUE = 0x01
FAST_CALL = 0x02
_PICKLE = 0x80
_CALL_HEAD = struct.Struct("<BBHHqI")   # tag, grad mode (255: None), nargs, method bytes (65535: None), rid, nfreed
_TENSOR_HEAD = struct.Struct("<BBBBBQQq")  # item tag, seg, dtype, ndim, strided, offset, nbytes, storage_offset
_ITEM_INT = struct.Struct("<Bq")
_ITEM_FLOAT = struct.Struct("<Bd")
_U8 = struct.Struct("<B")
_I_NONE, _I_FALSE, _I_TRUE, _I_INT, _I_FLOAT, _I_TENSOR = range(6)
_SMALL_ITEMS = (b"\x00", b"\x01", b"\x02")  # None, False, True
_MAX_DIMS = 16
_DIMS = tuple(struct.Struct(f"<{n}q") for n in range(_MAX_DIMS + 1))
_U64S = tuple(struct.Struct(f"<{n}Q") for n in range(65))
_SEGS = (OUTBOUND, RETURNED, EMPTY)
_SEG_CODES = {OUTBOUND: 0, RETURNED: 1, EMPTY: 2}
#: dtypes by code in the binary forms (append only: the code is the index)
_FAST_DTYPES = ("torch.float32", "torch.float64", "torch.float16", "torch.bfloat16",
                "torch.int64", "torch.int32", "torch.int16", "torch.int8", "torch.uint8",
                "torch.bool", "torch.complex64", "torch.complex128")
_DTYPE_CODES = {name: code for code, name in enumerate(_FAST_DTYPES)}
_COMPLEX = _DTYPE_CODES["torch.complex64"]  # this code and the ones after it
_NUMPY_BY_CODE: list = []  # numpy dtype (or None) by dtype code, once torch is here
_CALL_REPLICATED = 14  # messages.Op.CALL_REPLICATED (messages imports this module's users)
_INT64 = (-(1 << 63), (1 << 63) - 1)


class _NotFast(Exception):
    """A value the binary forms do not carry: the message is pickled instead."""


def pack_u64s(values) -> bytes:
    """``values`` (ints) as little-endian u64s."""
    n = len(values)
    return (_U64S[n] if n <= 64 else struct.Struct(f"<{n}Q")).pack(*values)


def unpack_u64s(data, offset: int, n: int) -> tuple:
    """``n`` little-endian u64s of ``data`` from ``offset``."""
    if not n:
        return ()
    return (_U64S[n] if n <= 64 else struct.Struct(f"<{n}Q")).unpack_from(data, offset)


class Encoder:
    """Pickles values for one direction of one interpreter link.

    ``arena`` receives copies of outbound tensors; ``placed`` collects the
    offsets allocated while encoding (the caller frees or keeps them).
    ``returnable`` is a segment the receiver owns: tensors already in it cross
    by reference (a result passed back as an argument is not copied).
    ``reuse_arena`` lets tensors already in ``arena`` cross by reference too
    (the host's side only: its arena blocks are reference-counted, so a block
    viewed twice is not freed under either view).
    """

    def __init__(self, arena: Arena | None, *, returnable: Segment | None = None,
                 reuse_arena: bool = False) -> None:
        self.arena = arena
        self.returnable = returnable
        self.reuse_arena = reuse_arena
        self.placed: list[int] = []
        self.links = None  # cuda_link.HostLinks / InterpreterLinks: CUDA tensors through a link
        self.handles: tuple | None = None  # (Obj type, obj -> handle id) for this request
        # One pickler reused for every message (building one costs more than a small
        # message), with tensors and handles in its dispatch table: a C-level type lookup,
        # so the other objects of a message cost no Python call.
        self._buf = io.BytesIO()
        self._pickler = pickle.Pickler(self._buf, protocol=5)
        self._table = copyreg.dispatch_table.copy()
        self._pickler.dispatch_table = self._table
        self._tensor_type = None
        self._parameter_type = None
        self._strided = None
        self._codes: dict = {}  # torch dtype -> its code in the binary forms

    def encode(self, value: Any, /, where: str = "value", pickled: bool = True) -> bytes | None:
        """Encode ``value``; tensors go to the arena (offsets in ``placed``).

        ``None``, a bool, an int64, a float or a CPU tensor takes the binary form
        :data:`FAST_VALUE`; anything else is pickled, or, with ``pickled=False``,
        ``None`` is returned (nothing left placed).  ``where`` names the value in
        errors (``"result"``; ``"request"`` for a request tuple, whose culprit is
        named as the caller wrote it: "argument 2 of the call").

        >>> Encoder(None).encode(7)
        b'\\x01\\x03\\x07\\x00\\x00\\x00\\x00\\x00\\x00\\x00'
        >>> Decoder(None).decode(Encoder(None).encode([1, 2.5]))
        [1, 2.5]
        >>> Encoder(None).encode([1, 2.5], pickled=False) is None
        True
        """
        self.placed = []
        if self._tensor_type is None and "torch" in sys.modules:
            self._know_torch()
        item = self._item(value)
        if item is not None:
            return b"\x01" + item  # FAST_VALUE
        if self.placed:
            self._unplace()
        return self._pickle(value, where) if pickled else None

    def encode_request(self, op: int, args: tuple, drop: tuple, freed: tuple,
                       pickled: bool = True) -> bytes | None:
        """Encode the request ``(op, args, drop, freed)`` (see ``messages.Request``).

        A call of a replicated object that is already loaded, with positional
        tensor and scalar arguments only and nothing to drop, takes the binary
        form :data:`FAST_CALL`; any other request is pickled, or, with
        ``pickled=False``, ``None`` is returned (nothing left placed).

        >>> Encoder(None).encode_request(14, (3, None, (1,), {"k": 1}, 1, None), (), (), False) is None
        True
        """
        self.placed = []
        if self._tensor_type is None and "torch" in sys.modules:
            self._know_torch()
        if op == _CALL_REPLICATED and not drop and len(args) == 6:
            if _c_pack_call is not None:  # the extension's: the whole call in one C call
                data = _c_pack_call(args, freed, self.returnable, self.arena, self.reuse_arena,
                                    self.placed)
                if data is not None:
                    return data
                if self.placed:
                    self._unplace()
            rid, method, positional, kwargs, grad, recipe = args
            if (recipe is None and not kwargs and type(positional) is tuple
                    and type(rid) is int and (grad is None or type(grad) is int)
                    and (method is None or type(method) is str)):
                parts = [b"", b"" if method is None else method.encode(),
                         pack_u64s(freed) if freed else b""]
                item = self._item
                for value in positional:
                    encoded = item(value)
                    if encoded is None:
                        break
                    parts.append(encoded)
                else:
                    if len(positional) < 65536 and len(parts[1]) < 65535 and _INT64[0] <= rid <= _INT64[1]:
                        parts[0] = _CALL_HEAD.pack(FAST_CALL, 255 if grad is None else grad,
                                                   len(positional),
                                                   65535 if method is None else len(parts[1]),
                                                   rid, len(freed))
                        return b"".join(parts)
                if self.placed:
                    self._unplace()
        return self._pickle((op, args, drop, freed), "request") if pickled else None

    def _know_torch(self) -> None:
        torch = sys.modules["torch"]
        self._tensor_type = torch.Tensor
        self._parameter_type = torch.nn.Parameter
        self._strided = torch.strided
        self._codes = {_dtype(name): code for code, name in enumerate(_FAST_DTYPES)}
        if _native_tensors is None:
            native_tensors()
        # Parameters cross as plain tensors too: detached, like every tensor.
        self._table[torch.Tensor] = self._table[torch.nn.Parameter] = self._reduce_tensor

    def _unplace(self) -> None:
        """Give back the blocks of a binary encoding that was abandoned for a pickle."""
        for offset in self.placed:
            self.arena.free(offset)
        self.placed = []

    def _item(self, value) -> bytes | None:
        """``value`` as an item of the binary forms, or ``None`` when it must be pickled."""
        kind = type(value)
        if kind is self._tensor_type or kind is self._parameter_type:
            if _tensor_item is not None:  # the extension's: a few thousand instructions
                encoded = _tensor_item(value, self.returnable, self.arena, self.reuse_arena,
                                       self.placed)
                if encoded is not None:
                    return encoded
            # describe's checks, with the fewest calls into torch (each costs about as
            # much as a Python function call): a dtype without a code (quantized ones
            # included), another device (CUDA: links and IPC) or layout (sparse) takes
            # the pickle path, which says why when it cannot carry the tensor either.
            code = self._codes.get(value.dtype)
            if code is None or not value.is_cpu or value.layout is not self._strided:
                return None
            if value.is_neg() or (code >= _COMPLEX and value.is_conj()):
                desc = self.describe(value)  # the bits resolved into a copy first
            else:
                desc = self._placed(value, _FAST_DTYPES[code], value.shape)
            seg, offset, nbytes, _, shape, stride, storage_offset = desc
            ndim = len(shape)
            if ndim > _MAX_DIMS:
                return None  # pickled: the caller gives back what was placed
            dims = _DIMS[ndim]
            head = _TENSOR_HEAD.pack(_I_TENSOR, _SEG_CODES[seg], code, ndim, stride is not None,
                                     offset, nbytes, storage_offset) + dims.pack(*shape)
            return head if stride is None else head + dims.pack(*stride)
        if kind is float:
            return _ITEM_FLOAT.pack(_I_FLOAT, value)
        if kind is int:
            return _ITEM_INT.pack(_I_INT, value) if _INT64[0] <= value <= _INT64[1] else None
        if kind is bool:
            return _SMALL_ITEMS[1 + value]
        if value is None:
            return b"\x00"
        return None

    def _pickle(self, value: Any, where: str) -> bytes:
        if self.handles is not None:
            self._table[self.handles[0]] = self._reduce_handle
        buf, pickler = self._buf, self._pickler
        buf.seek(0)
        buf.truncate()
        try:
            pickler.dump(value)
        except MultipyError:
            raise  # already says what went wrong (an Obj of another session, ...)
        except Exception as exc:
            if where == "request":
                raise TransportError(describe_request(value, exc, self._table)) from exc
            raise TransportError(describe_unpicklable(value, exc, where, self._table)) from exc
        finally:
            pickler.clear_memo()  # the memo would keep the message's objects alive
        return buf.getvalue()

    def _reduce_handle(self, obj):
        if self.handles is None:
            raise TransportError(f"{obj!r} cannot be sent outside its session")
        return (_rebuild, ((HANDLE, self.handles[1](obj)),))

    def _reduce_tensor(self, t):
        if t.is_cuda:
            if self.links is not None:
                desc = self.links.place(t)
                if desc is not None:
                    return (_rebuild, (desc,))
            return cuda.reduce_cuda(t)
        desc = self.describe(t)
        if desc is None:
            return t.__reduce_ex__(5)
        return (_rebuild, (desc,))

    def describe(self, t) -> tuple | None:
        """Descriptor for tensor ``t``, copying its bytes into the arena if needed.

        ``stride`` is ``None`` in a descriptor of a contiguous block.
        """
        if not t.is_cpu or t.layout is not (self._strided or _strided()) or t.is_quantized:
            if not t.is_cpu:
                raise TransportError(
                    f"a {t.device.type} tensor cannot cross the process boundary "
                    "(CPU tensors cross through shared memory, CUDA tensors by CUDA IPC); "
                    "move it to the CPU first (.cpu())")
            return None  # sparse and quantized tensors are pickled by value
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        return self._placed(t, _dtype_name(t.dtype), tuple(t.shape))

    def _placed(self, t, dtype: str, shape) -> tuple:
        """:meth:`describe` for a strided CPU tensor without a conjugate or negative
        bit, whose dtype name and shape the caller has read already."""
        nbytes = t.nbytes
        if nbytes == 0:
            return (EMPTY, 0, 0, dtype, shape, None, 0)
        returnable = self.returnable
        address = t.data_ptr()
        # Segment.contains, inlined (once or twice per tensor)
        if returnable is not None and returnable.address <= address < returnable.address + returnable.size:
            return _in_place(t, RETURNED, returnable, address, nbytes, dtype, shape)
        arena = self.arena
        if arena is None:
            raise TransportError("tensors cannot cross this link")
        segment = arena.segment
        if self.reuse_arena and segment.address <= address < segment.address + segment.size:
            # Already in our own arena (a result that came back as a view of an
            # argument): the receiver maps it there, no copy.
            return _in_place(t, OUTBOUND, segment, address, nbytes, dtype, shape)
        offset = arena.alloc(nbytes)
        self.placed.append(offset)
        segment = arena.segment  # alloc may have grown (and so remapped) it
        if t.is_contiguous():
            _copy(segment.address + offset, address, nbytes)
        else:
            dst = view_tensor(segment.view(offset, nbytes), dtype, shape, None, 0)
            dst.copy_(t.detach())
        return (OUTBOUND, offset, nbytes, dtype, shape, None, 0)


def _know_numpy() -> None:
    global _from_numpy, _ndarray
    import numpy
    import torch

    _from_numpy = torch.from_numpy
    _ndarray = numpy.ndarray
    _NUMPY_BY_CODE[:] = [_numpy_dtype(name) for name in _FAST_DTYPES]
    if _native_tensors is None:
        native_tensors()


def native_tensors(exchange_api: bool = True) -> str:
    """Let the extension encode and read tensor items of the binary forms (torch is
    imported); returns how: ``"exchange API"`` (DLPack's C exchange API of torch,
    no Python call at all), ``"capsules"`` (torch's DLPack capsules, for a torch
    without that API, or ``exchange_api=False``) or ``"Python"`` (no extension, or
    one without these functions: the codec's Python path).

    >>> import torch
    >>> native_tensors() in ("exchange API", "capsules", "Python")
    True
    """
    global _native_tensors, _tensor_item, _tensor_read, _c_read_call, _c_pack_call, _tensor_value
    global _watch_block
    from .channel import _native_module

    torch = sys.modules["torch"]
    if _native_module is None or not hasattr(_native_module, "tensor_setup"):
        _native_tensors, _tensor_item, _tensor_read, _c_read_call, _c_pack_call = \
            "Python", None, None, None, None
        _tensor_value = None
        return _native_tensors
    api = None
    if exchange_api:
        api = getattr(torch.Tensor, "__dlpack_c_exchange_api__", None)
        if api is None and hasattr(torch._C, "_dlpack_exchange_api"):
            api = torch._C._dlpack_exchange_api()
    used = _native_module.tensor_setup(torch.Tensor, torch.nn.Parameter, api,
                                       torch._C._to_dlpack, torch._C._from_dlpack)
    # The extension maps DLPack's types to the dtype codes: check that this torch
    # exports each as expected (an empty tensor's item names its dtype, no block).
    for code, name in enumerate(_FAST_DTYPES):
        item = _native_module.tensor_item(torch.empty(0, dtype=_dtype(name)), None, None, False, [])
        if item is None or item[2] != code:
            _native_tensors, _tensor_item, _tensor_read, _c_read_call, _c_pack_call = \
                "Python", None, None, None, None
            _tensor_value = None
            return _native_tensors
    _tensor_item, _tensor_read = _native_module.tensor_item, _native_module.tensor_read
    _tensor_value, _watch_block = _native_module.tensor_value, _native_module.watch_block
    _c_read_call, _c_pack_call = _native_module.read_call, _native_module.pack_call
    _native_tensors = "exchange API" if used else "capsules"
    return _native_tensors


_native_tensors: str | None = None  # how tensor items are encoded and read (native_tensors)
_tensor_item = None  # multipy._native.tensor_item, once set up
_tensor_read = None  # multipy._native.tensor_read, likewise
_tensor_value = None  # multipy._native.tensor_value, likewise
_watch_block = None  # multipy._native.watch_block, likewise
_c_read_call = None  # multipy._native.read_call, likewise
_c_pack_call = None  # multipy._native.pack_call, likewise


_from_numpy = None  # torch.from_numpy, once a binary tensor item was read
_ndarray = None     # numpy.ndarray, likewise


def _in_place(t, seg: str, segment: Segment, address: int, nbytes: int, dtype: str,
              shape: tuple) -> tuple:
    """The descriptor of ``t``, whose bytes are in ``segment`` already.  Its block
    starts where its storage does; a contiguous tensor that starts there too is
    described as a plain block (the receiver views it without ``as_strided``)."""
    if t.storage_offset() == 0 and t.is_contiguous():
        return (seg, address - segment.address, nbytes, dtype, shape, None, 0)
    storage = t.untyped_storage()
    return (seg, storage.data_ptr() - segment.address, storage.nbytes(), dtype, shape,
            tuple(t.stride()), t.storage_offset())


class Decoder:
    """Unpickles values, viewing tensor descriptors in place.

    ``outbound`` is the peer's arena segment (mapped here); ``own`` is this
    side's arena segment (for tensors handed back by reference); ``open_shared``
    maps an ident to a :class:`Segment`.  ``released`` (a deque) receives the
    offset (or the weak reference) of a block of ``outbound`` once the last
    tensor over it dies (read them with :meth:`released_offsets`); without it,
    ``received`` collects ``(offset, array)`` of the blocks decoded by the last
    call.  ``held`` (from :func:`~multipy.transport.shm.held_blocks`) counts the
    views of blocks of ``own`` handed back (``on_return`` is then its ``add``).
    """

    def __init__(self, outbound: Segment | None, *, own: Segment | None = None,
                 open_shared: Callable[[tuple], Segment] | None = None,
                 released: "collections.deque | None" = None,
                 resolve_handle: Callable[[int], Any] | None = None,
                 on_return: Callable[[int, Any], None] | None = None,
                 own_cuda: bool = False, held=None) -> None:
        if held is not None and on_return is None:
            on_return = held.add
        # The extension's books, which a tensor's holder tells of its death itself.
        self._held = held if type(held).__name__ == "HeldBlocks" else None
        self.outbound = outbound
        self.own_cuda = own_cuda
        self.links = None  # where CUDA link blocks ("c" descriptors) are read from
        self.on_return = on_return
        self.resolve_handle = resolve_handle
        self.own = own
        self.open_shared = open_shared
        self.released = released
        self.received: list = []
        self._watched: dict[int, Any] = {}
        # A block's death runs no Python code: the weak reference's callback is the
        # deque's C-level append (a Python callback cost more than the rest of a
        # result tensor's deallocation).
        self._died = None if released is None else released.append

    def _watch(self, array, offset: int) -> None:
        """Put ``array``'s reference (or a TensorBlock's offset) in ``released`` once
        it (and every tensor over it) dies."""
        if _tensor_value is not None and _watch_block(array, offset, self._died):
            return  # the extension's holder reports its own death
        ref = self._watched[offset] = BlockRef(array, self._died)
        ref.offset = offset

    def released_offsets(self) -> tuple:
        """The offsets of the blocks whose last tensor died since the last call
        (taken from ``released``, which may also hold plain offsets put there by
        its owner).

        >>> import collections
        >>> released = collections.deque([128])
        >>> Decoder(None, released=released).released_offsets()
        (128,)
        """
        released, watched, out = self.released, self._watched, []
        while released:
            try:
                item = released.popleft()
            except IndexError:  # another thread took the last one
                break
            if type(item) is not int:
                ref, item = item, item.offset
                if watched.get(item) is ref:
                    del watched[item]
            out.append(item)
        return tuple(out)

    def decode(self, data: bytes, /, *, lenient: bool = False) -> Any:
        """Decode ``data`` (a binary form or a pickle).  ``lenient`` stands a stub in
        for every class that cannot be found (to read the rest of a message whose
        arguments cannot be rebuilt)."""
        self.received = []
        first = data[0] if data else _PICKLE
        if first == FAST_VALUE and _tensor_value is not None and self._died is not None:
            # A result that is one tensor, the common reply: read by the extension,
            # whose holder tells released or held of its death itself.  None (not
            # one whole tensor) is what _tensor_read would say too: read below.
            tensor = _tensor_value(data, self.outbound, self.own, self._died, self._held)
            if tensor is not None:
                return tensor
        elif first == FAST_VALUE and _tensor_read is not None:
            # A result that is one tensor, the common reply: read by the extension,
            # its books kept here (_read_item and _book, inlined).
            read = _tensor_read(data, 1, self.outbound, self.own)
            if read is not None and read[4] == len(data):
                tensor, holder, seg, offset, _ = read
                if seg == 0:
                    if self._died is not None:
                        self._watch(holder, offset)
                    else:
                        self.received.append((offset, holder))
                elif self.on_return is not None:
                    self.on_return(offset, holder)
                return tensor
        if first == FAST_CALL or first == FAST_VALUE:
            try:
                if first == FAST_CALL:
                    return self._decode_call(data)
                value, end = self._read_item(data, 1)
            except (struct.error, IndexError, UnicodeDecodeError) as exc:
                raise TransportError(f"corrupt binary message ({len(data)} bytes): {exc}") from None
            if end != len(data):
                raise TransportError(f"{len(data) - end} stray bytes after a binary value")
            return value
        previous = getattr(decoding, "decoder", None)
        decoding.decoder = self
        try:
            value = _Lenient(io.BytesIO(data)).load() if lenient else pickle.loads(data)
        except BaseException:
            settle_sparse(check=False)
            raise
        finally:
            decoding.decoder = previous
        settle_sparse()
        return value

    def _decode_call(self, data) -> tuple:
        """A :data:`FAST_CALL` request as the request tuple ``(op, args, drop, freed)``."""
        rid, method, positional, grad, freed = self._read_call(data, 0)
        return (_CALL_REPLICATED, (rid, method, positional, {}, grad, None), (), freed)

    def decode_call(self, data, start: int = 0, /) -> tuple:
        """The :data:`FAST_CALL` request at ``data[start:]`` as ``(rid, method,
        positional, grad mode, freed)``: the interpreter's common call, without
        the request tuple it stands for (``decode`` returns that).

        >>> enc = Encoder(None)
        >>> Decoder(None).decode_call(enc.encode_request(14, (3, "f", (1, 2.5), {}, 1, None), (), (64,)))
        (3, 'f', (1, 2.5), 1, (64,))
        """
        self.received = []
        try:
            if data[start] != FAST_CALL:
                raise TransportError(f"not a binary call (first byte {data[start]:#x})")
            return self._read_call(data, start)
        except (struct.error, IndexError, UnicodeDecodeError) as exc:
            raise TransportError(f"corrupt binary message ({len(data) - start} bytes): {exc}") from None

    def _read_call(self, data, pos: int) -> tuple:
        if _c_read_call is not None:  # the extension's, when it reads every item itself
            read = _c_read_call(data, pos, self.outbound, self.own)
            if read is not None:
                rid, method, positional, grad, freed, blocks = read
                for seg, offset, holder in blocks:
                    self._book(seg, offset, holder)
                return rid, method, positional, grad, freed
        _, grad, nargs, mlen, rid, nfreed = _CALL_HEAD.unpack_from(data, pos)
        pos += _CALL_HEAD.size
        if mlen == 65535:
            method = None
        else:
            method = bytes(data[pos:pos + mlen]).decode()
            pos += mlen
        if nfreed:
            freed = unpack_u64s(data, pos, nfreed)
            pos += 8 * nfreed
        else:
            freed = ()
        if nargs == 1:  # the common case: no list to build
            value, pos = self._read_item(data, pos)
            positional = (value,)
        else:
            read = self._read_item
            items = []
            for _ in range(nargs):
                value, pos = read(data, pos)
                items.append(value)
            positional = tuple(items)
        if pos != len(data):
            raise TransportError(f"{len(data) - pos} stray bytes after a binary call")
        return rid, method, positional, None if grad == 255 else grad, freed

    def _read_item(self, data, pos: int):
        """``(value, next position)`` of the binary item at ``pos``."""
        tag = data[pos]
        if tag == _I_TENSOR:
            if not _NUMPY_BY_CODE:
                _know_numpy()
            if _tensor_read is not None:  # the extension's: no numpy, no Python call into torch
                read = _tensor_read(data, pos, self.outbound, self.own)
                if read is not None:
                    tensor, holder, seg, offset, pos = read
                    self._book(seg, offset, holder)
                    return tensor, pos
            _, seg, code, ndim, strided, offset, nbytes, storage_offset = \
                _TENSOR_HEAD.unpack_from(data, pos)
            dims = _DIMS[ndim]
            pos += _TENSOR_HEAD.size
            shape = dims.unpack_from(data, pos)
            pos += dims.size
            stride = None
            if strided:
                stride = dims.unpack_from(data, pos)
                pos += dims.size
            if seg > 2:
                raise TransportError(f"unknown segment {seg} in a binary tensor item")
            if seg == 2 and 0 not in shape:  # EMPTY: never allocate what a corrupt item says
                raise TransportError(f"an empty tensor item of shape {shape}")
            np_dtype = _NUMPY_BY_CODE[code] if stride is None and seg != 2 else None
            if np_dtype is None:  # empty, strided, or no numpy twin (bfloat16)
                return self.rebuild((_SEGS[seg], offset, nbytes, _FAST_DTYPES[code], shape,
                                     stride, storage_offset)), pos
            # Decoder.rebuild and hold_tensor, inlined for a plain block (the path without
            # the extension, or for an item it declined): once per tensor.
            # One numpy constructor over the mapping (a slice, a view and a reshape
            # were three calls); its nbytes check stands in for the reshape's.
            segment = self.outbound if seg == 0 else self.own
            end = offset + nbytes
            if end > segment.size:
                segment.ensure(end)
            holder = _ndarray(shape, np_dtype, segment.mm, offset)
            if holder.nbytes != nbytes:
                raise TransportError(f"a tensor item of {nbytes} bytes has shape {shape}")
            if offset % np_dtype.itemsize:
                raise _misaligned(offset, np_dtype.itemsize)
            self._book(seg, offset, holder)
            return _from_numpy(holder), pos
        if tag == _I_INT:
            return _ITEM_INT.unpack_from(data, pos)[1], pos + _ITEM_INT.size
        if tag == _I_FLOAT:
            return _ITEM_FLOAT.unpack_from(data, pos)[1], pos + _ITEM_FLOAT.size
        if tag <= _I_TRUE:
            return (None, False, True)[tag], pos + 1
        raise TransportError(f"unknown item {tag} in a binary message")

    def _book(self, seg: int, offset: int, holder) -> None:
        """Keep the books of a block that a decoded tensor views (``holder`` keeps it
        alive): a block of the peer's arena is watched (or listed in ``received``),
        one of this side's own arena handed back is reported to ``on_return``."""
        if seg == 0:
            if self._died is not None:
                self._watch(holder, offset)
            else:
                self.received.append((offset, holder))
        elif self.on_return is not None:
            self.on_return(offset, holder)

    def rebuild(self, pid):
        if pid[0] == HANDLE:
            return self.resolve_handle(pid[1])
        if pid[0] == CUDA_BLOCK:
            return self.links.take(pid)
        seg, offset, nbytes, dtype, shape, stride, storage_offset = pid
        if seg == EMPTY:
            import torch

            t = torch.empty(shape, dtype=_dtype(dtype))
        else:
            if seg == OUTBOUND:
                segment = self.outbound
            elif seg == RETURNED:
                segment = self.own
            else:
                segment = self.open_shared(seg)
            itemsize = _dtype(dtype).itemsize
            if offset % itemsize:
                raise _misaligned(offset, itemsize)
            t, holder = hold_tensor(segment.view(offset, nbytes), dtype, shape, stride, storage_offset)
            if seg == OUTBOUND:
                if self._died is not None:
                    self._watch(holder, offset)
                else:
                    self.received.append((offset, holder))
            elif seg == RETURNED and self.on_return is not None:
                self.on_return(offset, holder)
        return t


def _misaligned(offset: int, itemsize: int) -> TransportError:
    """A block that does not start on an element: torch's kernels would fault on it
    (blocks start on 64 bytes; only a corrupt descriptor names such an offset)."""
    return TransportError(f"a tensor block at offset {offset}, not a multiple of its "
                          f"{itemsize}-byte elements")


def settle_sparse(*, check: bool = True) -> None:
    """Check, then forget, the sparse tensors the last unpickling rebuilt.

    torch's sparse rebuild queues every sparse tensor it makes in
    ``torch._utils._sparse_tensors_to_validate`` for ``torch.load`` to check and
    clear; plain unpickling never clears it, so each sparse tensor that crossed
    would stay alive (with the shared block it views) for the life of the process.
    ``check=False`` only forgets them (the unpickling failed).
    """
    global _sparse_queue
    queued = _sparse_queue
    if queued is None:
        torch = sys.modules.get("torch")
        if torch is None:
            return
        queued = _sparse_queue = torch._utils._sparse_tensors_to_validate
    if queued:
        if check:
            sys.modules["torch"]._utils._validate_loaded_sparse_tensors()  # clears it
        else:
            queued.clear()


_sparse_queue: list | None = None  # torch's list, once torch is imported


class _Stub:
    """Stands in for a class that cannot be found; accepts whatever rebuilds it."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


class _Lenient(pickle.Unpickler):
    """Reads a message whatever its objects do: a class that cannot be found
    and a function that raises when called to rebuild an object give stubs."""

    def find_class(self, module, name):
        try:
            found = super().find_class(module, name)
        except Exception:
            return _Stub
        if isinstance(found, type) or not callable(found):
            return found

        def tolerant(*args, **kwargs):
            try:
                return found(*args, **kwargs)
            except Exception:
                return _Stub()

        return tolerant


class PersistentUnpickler(pickle.Unpickler):
    """An unpickler whose persistent ids are resolved by ``load(pid)``.

    A subclass because Python 3.13 made the C unpickler's ``persistent_load``
    read-only on instances.
    """

    def __init__(self, file, load: Callable[[Any], Any]) -> None:
        super().__init__(file)
        self._load = load

    def persistent_load(self, pid):
        return self._load(pid)


def _rebuild(pid):
    """Unpickling hook for tensors and handles: asks the decoder of this thread."""
    decoder = getattr(decoding, "decoder", None)
    if decoder is None:
        raise TransportError("a multipy tensor descriptor can only be unpickled by a Decoder")
    return decoder.rebuild(pid)


RESULT_ADVICE = ("Return plain values, tensors or picklable objects, or keep the object in the "
                 "interpreter and use an Obj handle (session.global_ / Obj.attr) instead.")
ARGUMENT_ADVICE = ("Pass plain values, tensors or picklable objects (of classes the interpreters "
                   "can import), or create the object inside the interpreter and pass its Obj "
                   "handle (session.global_(...)(...)) instead.")


def describe_unpicklable(value: Any, exc: BaseException, where: str = "value",
                         table: dict | None = None,
                         probe: Callable[[Any], bool] | None = None,
                         advice: str = RESULT_ADVICE) -> str:
    """Find the first part of ``value`` that cannot be pickled and name it.

    >>> describe_unpicklable({"f": lambda: 0}, Exception("x"), "result").split(":")[0]
    "result['f'] is a function that cannot be pickled"
    """
    path, bad = _find_unpicklable(value, where, probe or _Probe(table))
    return _unpicklable(path, bad, exc, advice)


def _unpicklable(path: str, bad: Any, exc: BaseException, advice: str) -> str:
    kind = type(bad)
    name = f"{kind.__module__}.{kind.__qualname__}" if kind.__module__ != "builtins" else kind.__qualname__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"{path} is {article} {name} that cannot be pickled: {exc}. {advice}"


def describe_request(request: tuple, exc: BaseException, table: dict | None = None,
                     probe: Callable[[Any], bool] | None = None) -> str:
    """Name the part of a request's arguments that cannot be pickled the way the
    caller wrote it: "argument 2 of the call", "keyword argument 'mask' of the
    call", else "the arguments of <operation>".

    >>> describe_request((6, (None, (1, lambda: 0), {}, None, False)), Exception("x")).split(":")[0]
    'argument 2 of the call is a function that cannot be pickled'
    """
    from .messages import Op, call_arguments

    op, args = request[0], request[1]
    probe = probe or _Probe(table)
    located = call_arguments(op, args)
    if located is not None:
        positional, keyword = located
        named = [(f"argument {i + 1} of the call", v) for i, v in enumerate(positional)]
        named += [(f"keyword argument {k!r} of the call", v) for k, v in keyword.items()]
        for name, part in named:
            if not probe(part):
                path, bad = _find_unpicklable(part, "", probe)
                return _unpicklable(name + (f" at {path}" if path else ""), bad, exc,
                                    ARGUMENT_ADVICE)
    try:
        what = f"the arguments of {Op(op).name.lower()}"
    except ValueError:
        what = "the arguments"
    return describe_unpicklable(args, exc, what, probe=probe, advice=ARGUMENT_ADVICE)


class _Probe:
    """Tries to pickle one part of a message the way the encoder would: tensors
    and handles (in ``table``) count as crossing."""

    def __init__(self, table: dict | None) -> None:
        self.table = table or {}

    def __call__(self, obj) -> bool:
        if type(obj) in self.table and type(obj).__module__ != "builtins":
            return True
        pickler = pickle.Pickler(io.BytesIO(), protocol=5)
        pickler.dispatch_table = {**copyreg.dispatch_table,
                                  **{t: _harmless for t in self.table if t.__module__ != "builtins"}}
        try:
            pickler.dump(obj)
            return True
        except Exception:
            return False


def _harmless(obj):
    return (type(None), ())


def _find_unpicklable(value: Any, where: str, probe: Callable[[Any], bool], depth: int = 0):
    if depth < 20:
        items = ()
        if isinstance(value, dict):
            items = ((f"{where}[{k!r}]", v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            items = ((f"{where}.{k}", v) for k, v in vars(value).items())
        for sub_where, sub in items:
            if not probe(sub):
                return _find_unpicklable(sub, sub_where, probe, depth + 1)
    return where, value
