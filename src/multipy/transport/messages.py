"""The wire vocabulary between the host and an interpreter.

A request names one operation (:class:`Op`) and its arguments; a reply carries
either a value or a :class:`RemoteException`.  Both are tiny frozen records
(named tuples).  On the wire they travel as plain tuples of their fields: a
named tuple costs a class lookup on each side, about 4 µs a round trip, which
is a tenth of the whole dispatch budget.  Piggy-backed housekeeping
(objects the host dropped, result blocks it freed) rides on requests so that it
never needs a round trip of its own.

**Call ids.**  Every request frame starts with the host's number for the call
(:data:`CALL_ID`, 8 bytes, outside the pickle so that a request whose
arguments cannot be unpickled is still answered under its id), and the reply
repeats it.  A reply is only ever handed to the caller whose id it carries;
see ``ProcessWorker._reply_for`` for what the host does with any other::

    request frame:  length | call id | pickle(op, args, drop, freed)
    reply frame:    length | call id | pickle(value, error, pinned, unpinned, output, blocks)

**Binary forms.**  The common call skips pickle's machinery on both sides: a
request calling a replicated object with tensor and scalar arguments is encoded
by ``codec.Encoder.encode_request`` in a fixed binary layout, and a reply without
an error is packed by :func:`encode_reply` as a fixed header and its block lists,
the value last (itself a binary item or a pickle, see ``codec``).  The first byte
after the call id tells the forms apart (a pickle starts with 0x80)::

    reply frame:    length | call id | 0x01 | flags | npinned | nunpinned | nblocks
                    | pinned[] | unpinned[] | blocks[] | value
"""

from __future__ import annotations

import dataclasses
import enum
import pickle
import struct
from typing import NamedTuple

from ..errors import TransportError
from .channel import _native_module
from .codec import _U64S  # n little-endian u64s, by n

#: The call id at the start of every request and reply payload.
CALL_ID = struct.Struct("<Q")
_ID_BYTES = CALL_ID.size
_unpack_id = CALL_ID.unpack_from
_loads = pickle.loads


class Op(enum.IntEnum):
    """Operations an interpreter performs for the host."""

    PING = 0
    REGISTER_MODULE = 1      # (name, source)
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


def call_arguments(op: int, args: tuple) -> tuple[tuple, dict] | None:
    """The user's ``(positional, keyword)`` arguments inside a request's ``args``
    (``CALL`` and ``CALL_REPLICATED``), or ``None`` for other operations: what
    an error names as "argument 2 of the call"."""
    if op == Op.CALL and len(args) > 2:
        return args[1], args[2]
    if op == Op.CALL_REPLICATED and len(args) > 3:
        return args[2], args[3]
    return None


class Drop(enum.IntEnum):
    """What a ``(kind, ident)`` item of a request's ``drop`` releases; sent as a
    plain int, like :class:`Op`."""

    OBJECT = 0       # an Obj's entry in the interpreter's object table
    REPLICATED = 1   # an interpreter's copy of a ReplicatedObj
    PACKAGE = 2      # an interpreter's importer of a Package


class Recipe(enum.IntEnum):
    """How an interpreter loads a replicated object: the first field of its
    recipe tuple, sent as a plain int."""

    PICKLE = 0    # (PICKLE, package_id, path, package, resource, map_location, storages)
    MOVABLE = 1   # (MOVABLE, MovablePayload, ((package_id, path), ...))


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

    ``call`` is the id of the request it answers; ``value`` is the encoded result (``None`` for ``None``); ``pinned`` lists
    argument blocks the interpreter still references after the call (the host
    must not reuse them); ``unpinned`` lists blocks it let go of; ``output``
    says the interpreter wrote to stdout/stderr (the host drains it before
    returning, so prints appear in order); ``blocks`` lists the result-arena
    blocks that ``value`` occupies, so that the host can free them without
    unpickling a value nobody waits for any more.
    """

    call: int
    value: bytes | None = None
    error: RemoteException | None = None
    pinned: tuple = ()
    unpinned: tuple = ()
    output: bool = False
    blocks: tuple = ()


@dataclasses.dataclass(frozen=True, slots=True)
class MovablePayload:
    """An object pickled out of one interpreter with its tensors in shared memory.

    ``data`` is the pickle; ``segment`` names the shared segment holding its
    tensor bytes (``None`` when it has none) as ``(pid, fd, inode)``: the process
    that holds the segment as descriptor ``fd`` (see :func:`~multipy.transport.shm.open_descriptor`).
    """

    data: bytes
    segment: tuple | None

    def __reduce__(self):
        return (MovablePayload, (self.data, self.segment))


def stamp(call: int, body: bytes, /) -> bytes:
    """A frame payload: ``body`` (a pickle) after the call id it belongs to.

    >>> split_call(stamp(7, b"body"))
    (7, b'body')
    """
    return CALL_ID.pack(call) + body


def split_call(payload: bytes, /) -> tuple[int, bytes]:
    """``(call id, body)`` of a frame payload; ``ValueError`` if it is too short for an id."""
    if len(payload) < CALL_ID.size:
        raise ValueError(f"a frame of {len(payload)} bytes is too short to carry a call id")
    return CALL_ID.unpack_from(payload)[0], payload[CALL_ID.size:]


#: First byte after the call id of a reply in the binary form (a pickle starts with 0x80).
FAST_REPLY = 0x01
_REPLY_HEAD = struct.Struct("<QBBHHH")  # call id, FAST_REPLY, flags, npinned, nunpinned, nblocks
_OUTPUT, _VALUE = 1, 2                   # flags
_dumps = pickle.dumps


def encode_reply(call: int, value: bytes | None, error: RemoteException | None, pinned: tuple,
                 unpinned: tuple, output: bool, blocks: tuple, /) -> bytes:
    """A reply frame payload (call id first): the binary form unless there is an
    error or a block list too long for it, else the pickled fields.

    >>> parse_reply(encode_reply(3, b"v", None, (64,), (), True, (128, 192)))
    Reply(call=3, value=b'v', error=None, pinned=(64,), unpinned=(), output=True, blocks=(128, 192))
    """
    if error is None and len(pinned) <= 16 and len(unpinned) <= 16 and len(blocks) <= 16:
        if _c_pack_reply is not None:
            return _c_pack_reply(call, value, pinned, unpinned, output, blocks)
        head = _REPLY_HEAD.pack(call, FAST_REPLY, (_OUTPUT if output else 0)
                                | (0 if value is None else _VALUE),
                                len(pinned), len(unpinned), len(blocks))
        if pinned or unpinned or blocks:
            head += (_U64S[len(pinned)].pack(*pinned) + _U64S[len(unpinned)].pack(*unpinned)
                     + _U64S[len(blocks)].pack(*blocks))
        return head if value is None else head + value
    return CALL_ID.pack(call) + _dumps((value, error, pinned, unpinned, output, blocks), protocol=5)


def _parse_fast_reply(frame) -> Reply:
    try:
        call, _, flags, npinned, nunpinned, nblocks = _REPLY_HEAD.unpack_from(frame)
        pos = _REPLY_HEAD.size
        pinned = unpinned = blocks = ()
        if npinned or nunpinned or nblocks:
            pinned = _U64S[npinned].unpack_from(frame, pos)
            pos += 8 * npinned
            unpinned = _U64S[nunpinned].unpack_from(frame, pos)
            pos += 8 * nunpinned
            blocks = _U64S[nblocks].unpack_from(frame, pos)
            pos += 8 * nblocks
    except (struct.error, IndexError) as exc:
        raise TransportError(f"malformed reply frame ({len(frame)} bytes): {exc}") from None
    if flags & ~(_OUTPUT | _VALUE) or (pos != len(frame) and not flags & _VALUE) \
            or (flags & _VALUE and pos >= len(frame)):
        raise TransportError(f"malformed reply frame ({len(frame)} bytes): not a Reply")
    value = bytes(frame[pos:]) if flags & _VALUE else None
    return _new_reply(Reply, (call, value, None, pinned, unpinned, bool(flags & _OUTPUT), blocks))


def parse_reply(frame: bytes, /) -> Reply:
    """Decode a reply frame (call id, then the pickled fields), checking its shape.

    Anything else (corrupt bytes, a desynchronised stream) raises
    :class:`~multipy.errors.TransportError`; nothing in the frame can make this
    hang or raise another type.  Runs once per call: no helper calls, no
    generator unless the reply lists blocks.

    >>> parse_reply(stamp(3, pickle.dumps((None, None, (), (), False, ())))).call
    3
    """
    if len(frame) > _ID_BYTES and frame[_ID_BYTES] == FAST_REPLY:
        if _c_unpack_reply is None:
            return _parse_fast_reply(frame)
        try:
            return _new_reply(Reply, _c_unpack_reply(frame))
        except ValueError as exc:
            raise TransportError(str(exc)) from None
    try:
        if len(frame) < _ID_BYTES:
            raise ValueError(f"a frame of {len(frame)} bytes is too short to carry a call id")
        fields = _loads(memoryview(frame)[_ID_BYTES:])
        if type(fields) is not tuple or len(fields) != 6:
            raise TransportError(f"malformed reply frame ({len(frame)} bytes): not a Reply")
        value, error, pinned, unpinned, output, blocks = fields
        ok = (type(output) is bool and (value is None or type(value) is bytes)
              and (error is None or type(error) is RemoteException)
              and type(pinned) is tuple and type(unpinned) is tuple and type(blocks) is tuple
              and (not (pinned or unpinned or blocks)
                   or all(type(o) is int for o in pinned + unpinned + blocks)))
        reply = _new_reply(Reply, (_unpack_id(frame)[0],) + fields)
    except TransportError:
        raise
    except Exception as exc:
        raise TransportError(f"malformed reply frame ({len(frame)} bytes): {exc!r}") from None
    if not ok:
        raise TransportError(f"malformed reply frame ({len(frame)} bytes): not a Reply")
    return reply


_new_reply = tuple.__new__  # Reply(...) without its generated __new__ (a Python call)

# The binary reply's header packed and read by the extension where it is loaded
# (the same layout as _REPLY_HEAD and the code above, which is its pure-Python twin):
# a few hundred instructions a call instead of several thousand.
_c_pack_reply = getattr(_native_module, "pack_reply", None)
_c_unpack_reply = getattr(_native_module, "unpack_reply", None)

#: ``unpack_fast_reply(frame)``: a binary reply's fields (``FAST_REPLY`` after the
#: call id) as a plain tuple in :class:`Reply`'s order, read by the extension
#: (``ValueError`` when malformed); ``None`` without it.  For the host's hot path,
#: which indexes the fields: no ``Reply`` built, no Python frame.
unpack_fast_reply = _c_unpack_reply


def parse_request(fields) -> Request:
    """A decoded request tuple as a :class:`Request`; ``TypeError`` if it is not one."""
    if type(fields) is not tuple or len(fields) != 4 or type(fields[0]) is not int \
            or type(fields[1]) is not tuple:
        raise TypeError(f"malformed request: got {type(fields).__name__}, not a request tuple")
    return Request._make(fields)
