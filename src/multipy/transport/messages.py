"""The wire vocabulary between the host and an interpreter.

A request names one operation (:class:`Op`) and its arguments; a reply carries
either a value or a :class:`RemoteException`.  Both are tiny frozen records
(named tuples).  On the wire they travel as plain tuples of their fields: a
named tuple costs a class lookup on each side, about 4 µs a round trip, which
is a tenth of the whole dispatch budget.  Piggy-backed housekeeping
(objects the host dropped, result blocks it freed) rides on requests so that it
never needs a round trip of its own.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import NamedTuple


class Op(enum.IntEnum):
    """Operations an interpreter performs for the host."""

    PING = 0
    REGISTER_MODULE = 1      # (name, source)
    OPEN_PACKAGE = 2         # (package_id, path) -> None
    PACKAGE_IMPORTER = 3     # (package_id,) -> handle of the PackageImporter
    LOAD_PICKLE = 4          # (package_id, package, resource) -> handle
    GLOBAL = 5               # (module, name) -> handle
    CALL = 6                 # (target, args, kwargs, grad_mode, want_handle)
    ATTR = 7                 # (handle, name) -> handle
    HASATTR = 8              # (handle, name) -> bool
    DEREF = 9                # (handle,) -> value
    MAKE_MOVABLE = 10        # (handle,) -> MovablePayload
    MATERIALIZE = 11         # (replicated_id, recipe) -> None
    REPLICATED_HANDLE = 12   # (replicated_id,) -> handle
    UNLOAD = 13              # (replicated_id,) -> None
    CALL_REPLICATED = 14     # (replicated_id, method, args, kwargs, grad_mode, recipe|None)
    HASATTR_REPLICATED = 15  # (replicated_id, name, recipe|None) -> bool
    EXEC = 16                # (source,) -> value of `result` global; tests and tools
    IMPORT = 17              # (module,) -> None; preloading at start
    CUDA_LINK = 18           # (((device, pieces), ...),) -> None; map CUDA link buffers (cuda_link)


class GradMode(enum.IntEnum):
    """The caller's autograd mode, re-established around a call."""

    GRAD = 0
    NO_GRAD = 1
    INFERENCE = 2


@dataclasses.dataclass(frozen=True, slots=True)
class Handle:
    """Names an object in one interpreter's object table."""

    id: int

    def __reduce__(self):
        return (Handle, (self.id,))


class Request(NamedTuple):
    """One operation for an interpreter.

    ``op`` is an :class:`Op` sent as a plain int (an enum member costs a global
    lookup to unpickle); ``args`` is the argument tuple; ``drop`` lists
    object-table ids and replicated ids the host released; ``freed`` lists
    result-arena blocks whose host tensors were garbage collected.
    """

    op: int
    args: tuple
    drop: tuple = ()
    freed: tuple = ()


@dataclasses.dataclass(frozen=True, slots=True)
class RemoteException:
    """An exception raised inside an interpreter, in a form that always crosses.

    ``pickled`` is the exception pickled by the interpreter when that worked,
    else ``None``; ``type_name`` and ``traceback`` are always present.
    """

    type_name: str
    message: str
    traceback: str
    pickled: bytes | None

    def __reduce__(self):
        return (RemoteException, (self.type_name, self.message, self.traceback, self.pickled))


class Reply(NamedTuple):
    """The outcome of one request.

    ``value`` is the encoded result (``None`` for ``None``); ``pinned`` lists
    argument blocks the interpreter still references after the call (the host
    must not reuse them); ``unpinned`` lists blocks it let go of; ``output``
    says the interpreter wrote to stdout/stderr (the host drains it before
    returning, so prints appear in order).
    """

    value: bytes | None = None
    error: RemoteException | None = None
    pinned: tuple = ()
    unpinned: tuple = ()
    output: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class MovablePayload:
    """An object pickled out of one interpreter with its tensors in shared memory.

    ``data`` is the pickle; ``segment`` names the shared segment holding its
    tensor bytes (``None`` when it has none) as ``(pid, fd, inode, size)``.
    """

    data: bytes
    segment: tuple | None

    def __reduce__(self):
        return (MovablePayload, (self.data, self.segment))


def parse_reply(frame: bytes, /) -> Reply:
    """Decode a reply frame, checking its shape.

    Anything else (corrupt bytes, a desynchronised stream) raises
    :class:`~multipy.errors.TransportError`; nothing in the frame can make this
    hang or raise another type.
    """
    import pickle

    from ..errors import TransportError

    try:
        fields = pickle.loads(frame)
        reply = Reply._make(fields) if type(fields) is tuple and len(fields) == 5 else None
        ok = (reply is not None and type(reply.output) is bool
              and (reply.value is None or type(reply.value) is bytes)
              and (reply.error is None or type(reply.error) is RemoteException)
              and type(reply.pinned) is tuple and type(reply.unpinned) is tuple
              and all(type(o) is int for o in reply.pinned + reply.unpinned))
    except Exception as exc:
        raise TransportError(f"malformed reply frame ({len(frame)} bytes): {exc!r}") from None
    if not ok:
        raise TransportError(f"malformed reply frame ({len(frame)} bytes): not a Reply")
    return reply


def parse_request(fields) -> Request:
    """A decoded request tuple as a :class:`Request`; ``TypeError`` if it is not one."""
    if type(fields) is not tuple or len(fields) != 4 or type(fields[0]) is not int \
            or type(fields[1]) is not tuple:
        raise TypeError(f"malformed request: got {type(fields).__name__}, not a request tuple")
    return Request._make(fields)
