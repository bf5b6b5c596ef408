"""Values, movables and package weights shared by reference between the host
and the interpreters of one process (the ``thread`` backend).

::

    plain data  (None, bool, int, float, str, bytes, dtype, Handle, ...)  ─▶ as is
    tensor                      ─▶ the same tensor (detached if it requires grad)
    tuple / list / dict of those ─▶ a new container of the same items
    Obj (an argument)           ─▶ the object it names in the interpreter's table
    anything else               ─▶ Pickled: the whole value pickled, with every tensor
                                   and Obj kept out of band, by reference

Pickling what is not plain data keeps the ``process`` backend's semantics
(values are copies; a result whose type exists only in the interpreters cannot
reach the host, and says so) while tensors never move.  The sender pickles and
the receiver unpickles, so a class is looked up by the side that owns it.

Package weights: every interpreter has its own ``PackageImporter`` (its own
copies of the package's modules), but all importers of one archive take their
storages from one process-wide mapping of the file, so two interpreters'
copies of a model hold the same storage (same ``data_ptr``).  Movables pickle
the object and keep its tensors themselves.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import sys
import threading
import weakref
from typing import Any

from ..errors import MultipyError, TransportError
from ..transport.codec import PersistentUnpickler, describe_request, describe_unpicklable
from ..interp.modules import current_thread_modules, registered_global
from ..interp.movable import MovablePickler
from ..interp.packages import StorageSource, open_package
from ..transport.messages import GradMode, Handle, MovablePayload, Op, RemoteException

_MAX_DEPTH = 64


@dataclasses.dataclass(frozen=True, slots=True)
class SharedMovable(MovablePayload):
    """A movable whose tensors are kept, by reference, instead of a shared segment."""

    tensors: tuple = ()

    def __reduce__(self):
        return (SharedMovable, (self.data, self.segment, self.tensors))


_PLAIN: set = {type(None), bool, int, float, complex, str, bytes, Handle, GradMode, Op,
               RemoteException, SharedMovable}
_TENSOR: Any = None
_PARAMETER: Any = None   # crosses as its detached data, like any tensor that requires grad


def _torch_types() -> None:
    """Learn torch's types once torch is imported (it may be imported later)."""
    global _TENSOR, _PARAMETER
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "Size") and hasattr(torch, "nn"):
        _PLAIN.update((torch.dtype, torch.device, torch.Size, torch.layout, torch.memory_format))
        _PARAMETER = torch.nn.Parameter
        _TENSOR = torch.Tensor


class _NotPlain(Exception):
    pass


def _share(t):
    """The tensor that crosses for ``t``: ``t`` itself, detached when it requires
    grad; conjugate and negative views are resolved (a copy), as on the wire."""
    if t.requires_grad:
        t = t.detach()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    return t


def _copy(value, obj_type, resolve, depth: int):
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is _TENSOR or kind is _PARAMETER:
        return _share(value)
    if depth > _MAX_DEPTH:
        raise _NotPlain
    if kind is tuple:
        return tuple(_copy_items(value, obj_type, resolve, depth + 1))
    if kind is list:
        return _copy_items(value, obj_type, resolve, depth + 1)
    if kind is dict:
        if not value:
            return {}
        keys = value.keys()
        for k in keys:
            if type(k) not in _PLAIN:
                raise _NotPlain
        return dict(zip(keys, _copy_items(value.values(), obj_type, resolve, depth + 1)))
    if kind is obj_type and obj_type is not None:
        return resolve(value)
    raise _NotPlain


def _copy_items(items, obj_type, resolve, depth: int) -> list:
    # The common leaves inline: a call per item costs more than the copy.
    out = []
    append = out.append
    plain = _PLAIN
    for v in items:
        kind = type(v)
        if kind in plain:
            append(v)
        elif kind is _TENSOR and not v.requires_grad and not v.is_conj() and not v.is_neg():
            append(v)
        else:
            append(_copy(v, obj_type, resolve, depth))
    return out


class Pickled:
    """A value that is not plain data: its pickle, with tensors and Obj handles
    out of band (``refs``: the tensors themselves)."""

    __slots__ = ("data", "refs")

    def __init__(self, data: bytes, refs: list) -> None:
        self.data = data
        self.refs = refs

    def load(self, objects: dict | None = None) -> Any:
        refs = self.refs

        def persistent_load(pid):
            return refs[pid] if type(pid) is int else objects[pid[1]]

        return PersistentUnpickler(io.BytesIO(self.data), persistent_load).load()


class _RefPickler(pickle.Pickler):
    def __init__(self, file, obj_type, handle_of) -> None:
        super().__init__(file, protocol=5)
        self.obj_type = obj_type
        self.handle_of = handle_of
        self.refs: list = []

    def persistent_id(self, obj):
        kind = type(obj)
        if kind is _TENSOR or kind is _PARAMETER:
            self.refs.append(_share(obj))
            return len(self.refs) - 1
        if kind is self.obj_type and kind is not None:
            return ("h", self.handle_of(obj))
        return None


def _pickle(value, obj_type=None, handle_of=None, op: Op | None = None) -> Pickled:
    buf = io.BytesIO()
    pickler = _RefPickler(buf, obj_type, handle_of)
    try:
        pickler.dump(value)
    except MultipyError:
        raise
    except Exception as exc:
        raise TransportError(_describe(value, exc, obj_type, handle_of, op)) from exc
    return Pickled(buf.getvalue(), pickler.refs)


def _describe(value, exc: BaseException, obj_type, handle_of, op: Op | None) -> str:
    """Name the first part of ``value`` that cannot cross (tensors and Obj can):
    for a request's arguments (``op`` given) as the caller wrote it."""
    def crosses(part) -> bool:
        try:
            _RefPickler(io.BytesIO(), obj_type, handle_of).dump(part)
            return True
        except Exception:
            return False

    if op is not None:
        return describe_request((op, value), exc, probe=crosses)
    return describe_unpicklable(value, exc, "result", probe=crosses)


def to_interpreter(op: Op, args: tuple, handles: tuple | None, objects: dict) -> Any:
    """The caller's ``args`` of ``op`` as the interpreter receives them (in the caller's thread).

    ``handles`` is ``(Obj type, obj -> handle id)``: an ``Obj`` becomes the object
    it names in ``objects`` (the interpreter's table); the id function raises
    :class:`~multipy.errors.OwnershipError` for another session's ``Obj``.
    """
    if _TENSOR is None:
        _torch_types()
    if handles is None:
        obj_type = handle_of = resolve = None
    else:
        obj_type, handle_of = handles
        resolve = lambda obj: objects[handle_of(obj)]  # noqa: E731
    try:
        return _copy(args, obj_type, resolve, 0)
    except _NotPlain:
        return _pickle(args, obj_type, handle_of, op)


def to_host(value: Any) -> Any:
    """A result as the host receives it (in the interpreter's thread)."""
    if _TENSOR is None:
        _torch_types()
    try:
        return _copy(value, None, None, 0)
    except _NotPlain:
        return _pickle(value)


# -- movables ---------------------------------------------------------------------


class _ByReferencePickler(MovablePickler):
    """The movable pickler (classes of packages named by package), tensors kept,
    and what registered modules define named by module: the interpreter that
    loads the movable resolves it in its own copy of the module."""

    def __init__(self, file, prefixes: dict[str, int]) -> None:
        super().__init__(file, prefixes)
        modules = current_thread_modules()
        self.registered = modules.sources if modules is not None else {}

    def reducer_override(self, obj):
        if self.registered and (isinstance(obj, type) or callable(obj)):
            module = getattr(obj, "__module__", None)
            qualname = getattr(obj, "__qualname__", None)
            if module in self.registered and isinstance(qualname, str):
                try:
                    found = registered_global(module, qualname)
                except Exception:
                    found = None
                if found is obj:
                    return (registered_global, (module, qualname))
        return super().reducer_override(obj)

    def persistent_id(self, obj):
        torch = self._torch
        if torch is None or type(obj) is not torch.Tensor:
            return None
        self.tensors.append(obj.detach())
        return (len(self.tensors) - 1, bool(obj.requires_grad))


def make_movable(obj, prefixes: dict[str, int]) -> tuple[SharedMovable, None, tuple]:
    """``(payload, no segment, ids of the packages it refers to)`` for ``obj``."""
    buf = io.BytesIO()
    pickler = _ByReferencePickler(buf, prefixes)
    pickler.dump(obj)
    return SharedMovable(buf.getvalue(), None, tuple(pickler.tensors)), None, tuple(sorted(pickler.used))


def load_movable(payload: SharedMovable):
    """This interpreter's copy of a movable; its tensors alias the original's storage."""
    tensors = payload.tensors

    def persistent_load(pid):
        index, grad = pid
        t = tensors[index].detach()
        if grad:
            t.requires_grad_(True)
        return t

    return PersistentUnpickler(io.BytesIO(payload.data), persistent_load).load()


# -- package weights ----------------------------------------------------------------


_sources_lock = threading.Lock()
_sources: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def open_package_shared(path: str):
    """A ``PackageImporter`` for ``path`` whose storages are those of every other
    importer of the same file in this process (same storage, same ``data_ptr``):
    the file is mapped once per process, not once per interpreter."""
    return open_package(path, _shared_source)


def _shared_source(path: str) -> StorageSource:
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _sources_lock:
        source = _sources.get(key)
        if source is None:
            source = _sources[key] = StorageSource(path)
        return source
