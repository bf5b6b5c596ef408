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

import copyreg
import ctypes
import io
import pickle
import sys
import weakref
from typing import Any, Callable

from ..errors import MultipyError, TransportError
from . import cuda
from .cuda_link import CUDA_BLOCK
from .shm import Arena, Segment
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

    def encode(self, value: Any, /, where: str = "value") -> bytes:
        """Pickle ``value``; tensors go to the arena (offsets in ``placed``).

        ``where`` names the value in errors (``"result"``; ``"request"`` for a
        request tuple, whose culprit is named as the caller wrote it: "argument 2
        of the call").
        """
        self.placed = []
        if self._tensor_type is None and "torch" in sys.modules:
            torch = sys.modules["torch"]
            self._tensor_type = torch.Tensor
            # Parameters cross as plain tensors too: detached, like every tensor.
            self._table[torch.Tensor] = self._table[torch.nn.Parameter] = self._reduce_tensor
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
        if not t.is_cpu or t.layout is not _strided() or t.is_quantized:
            if not t.is_cpu:
                raise TransportError(
                    f"a {t.device.type} tensor cannot cross the process boundary "
                    "(CPU tensors cross through shared memory, CUDA tensors by CUDA IPC); "
                    "move it to the CPU first (.cpu())")
            return None  # sparse and quantized tensors are pickled by value
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        dtype = _dtype_name(t.dtype)
        shape = tuple(t.shape)
        nbytes = t.nbytes
        if nbytes == 0:
            return (EMPTY, 0, 0, dtype, shape, None, 0)
        returnable = self.returnable
        if returnable is not None or self.reuse_arena:
            storage = t.untyped_storage()
            address = storage.data_ptr()
            if returnable is not None and returnable.contains(address):
                return (RETURNED, address - returnable.address, storage.nbytes(), dtype,
                        shape, tuple(t.stride()), t.storage_offset())
            if self.reuse_arena and self.arena.segment.contains(address):
                # Already in our own arena (a result that came back as a view of an
                # argument): the receiver maps it there, no copy.
                segment = self.arena.segment
                return (OUTBOUND, address - segment.address, storage.nbytes(), dtype,
                        shape, tuple(t.stride()), t.storage_offset())
        if self.arena is None:
            raise TransportError("tensors cannot cross this link")
        offset = self.arena.alloc(nbytes)
        self.placed.append(offset)
        segment = self.arena.segment
        if t.is_contiguous():
            ctypes.memmove(segment.address + offset, t.data_ptr(), nbytes)
        else:
            dst = view_tensor(segment.view(offset, nbytes), dtype, shape, None, 0)
            dst.copy_(t.detach())
        return (OUTBOUND, offset, nbytes, dtype, shape, None, 0)


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
                 resolve_handle: Callable[[int], Any] | None = None,
                 on_return: Callable[[int, Any], None] | None = None,
                 own_cuda: bool = False) -> None:
        self.outbound = outbound
        self.own_cuda = own_cuda
        self.links = None  # where CUDA link blocks ("c" descriptors) are read from
        self.on_return = on_return
        self.resolve_handle = resolve_handle
        self.own = own
        self.open_shared = open_shared
        self.on_release = on_release
        self.received: list = []
        self._watched: dict[int, Any] = {}

    def _watch(self, array, offset: int) -> None:
        """Report ``offset`` to ``on_release`` once ``array`` (and every tensor over it) dies."""
        watched, release = self._watched, self.on_release

        def died(ref, offset=offset):
            watched.pop(offset, None)
            release(offset)

        watched[offset] = weakref.ref(array, died)

    def decode(self, data: bytes, /, *, lenient: bool = False) -> Any:
        """Unpickle ``data``.  ``lenient`` stands a stub in for every class that
        cannot be found (to read the rest of a message whose arguments cannot be
        rebuilt)."""
        self.received = []
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
            t, holder = hold_tensor(segment.view(offset, nbytes), dtype, shape, stride, storage_offset)
            if seg == OUTBOUND:
                if self.on_release is not None:
                    self._watch(holder, offset)
                else:
                    self.received.append((offset, holder))
            elif seg == RETURNED and self.on_return is not None:
                self.on_return(offset, holder)
        return t


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
