"""Pickling an object out of one interpreter so that any other can load it.

Tensors go out of band into one new shared segment (every interpreter that
loads the object maps it copy-on-write: one copy of the weights).  Classes and
functions defined inside a torch.package archive are named by the package
they came from, so the receiving interpreter resolves them through its own
importer for that package::

    obj ──pickle──▶ bytes + [tensors] ──copy──▶ memfd segment
                    class <torch_package_3>.model.Net  ▶  (package 7, "model", "Net")
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import types

from ..transport import tensors
from ..transport.codec import PersistentUnpickler, settle_sparse, view_tensor
from ..transport.messages import MovablePayload
from ..transport.shm import ALIGN, Segment

_MOVABLE = "m"


def _package_global(package_id: int, module: str, qualname: str):
    from .state import current_state

    importer = current_state().package_importer_by_id(package_id)
    obj = importer.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class MovablePickler(pickle.Pickler):
    """Pickles an object with its CPU tensors out of band (``tensors``: offsets in
    the segment to come, ``size`` bytes in all) and names the classes of the
    packages it uses (``used``) so that another interpreter imports them first.
    The thread backend subclasses it to keep the tensors themselves."""

    def __init__(self, file, prefixes: dict[str, int]) -> None:
        super().__init__(file, protocol=5)
        self.prefixes = prefixes
        self.tensors: list = []
        self.used: set[int] = set()
        self.size = 0
        self._torch = sys.modules.get("torch")

    def persistent_id(self, obj):
        torch = self._torch
        if torch is None or type(obj) is not torch.Tensor:
            return None
        if obj.device.type != "cpu" or obj.layout != torch.strided or obj.is_quantized:
            return None
        t = obj.detach().resolve_conj().resolve_neg()
        offset = self.size
        nbytes = t.nbytes
        self.size += (nbytes + ALIGN - 1) & ~(ALIGN - 1)
        self.tensors.append((offset, t))
        return (_MOVABLE, offset, nbytes, str(t.dtype), tuple(t.shape), None, 0,
                bool(obj.requires_grad))

    def reducer_override(self, obj):
        # Classes and functions only: an instance (a callable nn.Module too) inherits
        # its class's __module__ but is pickled by value.
        module = obj.__module__ if isinstance(obj, (type, types.FunctionType)) else None
        if isinstance(module, str) and module.startswith("<torch_package_"):
            prefix, _, rest = module.partition(".")
            package_id = self.prefixes.get(prefix)
            if package_id is not None:
                self.used.add(package_id)
                return (_package_global, (package_id, rest, obj.__qualname__))
        return NotImplemented


def make_movable(obj, prefixes: dict[str, int]) -> tuple[MovablePayload, Segment | None, tuple]:
    """Pickle ``obj``; returns the payload, the segment holding its tensors
    (the caller keeps it open until the host has adopted it) and the ids of
    the packages whose classes it refers to."""
    buf = io.BytesIO()
    pickler = MovablePickler(buf, prefixes)
    pickler.dump(obj)
    segment = None
    if pickler.tensors:
        segment = Segment.create(pickler.size, name="multipy-movable")
        for offset, t in pickler.tensors:
            nbytes = t.nbytes
            if nbytes:
                dst = view_tensor(segment.view(offset, nbytes), str(t.dtype), tuple(t.shape),
                                  None, 0)
                dst.copy_(t)
    payload = MovablePayload(buf.getvalue(), segment.ident() if segment else None)
    return payload, segment, tuple(sorted(pickler.used))


def load_movable(payload: MovablePayload):
    """Rebuild an object from a payload; its tensors map the shared segment."""
    segment = None
    if payload.segment is not None:
        pid, fd, inode = payload.segment
        segment = Segment.open(pid, fd, inode, private=True)

    def persistent_load(pid):
        tag, offset, nbytes, dtype, shape, stride, storage_offset, grad = pid
        if nbytes == 0:
            import torch

            t = torch.empty(shape, dtype=tensors.dtype(dtype))
        else:
            t = view_tensor(segment.view(offset, nbytes), dtype, shape, stride, storage_offset)
        if grad:
            t.requires_grad_(True)
        return t

    unpickler = PersistentUnpickler(io.BytesIO(payload.data), persistent_load)
    try:
        value = unpickler.load()
    except BaseException:
        settle_sparse(check=False)
        raise
    finally:
        if segment is not None:
            os.close(segment.fd)  # the mapping stays alive with the tensors over it
    settle_sparse()
    return value
