"""Which interpreter the calling code runs in (``multipy.interpreter_id()``)."""

from __future__ import annotations

import threading

_process_index: int | None = None
_local = threading.local()


def interpreter_id() -> int | None:
    """The index of the interpreter running the caller, or ``None`` in the host.

    torch::deploy exposed the same number as ``torch.version.interp``; use it
    to spread work over devices (interpreter *i* on GPU *i mod n*).

    >>> interpreter_id() is None   # in the host
    True
    """
    return getattr(_local, "index", _process_index)


def set_process_interpreter(index: int) -> None:
    global _process_index
    _process_index = index


def set_thread_interpreter(index: int | None) -> None:
    _local.index = index
