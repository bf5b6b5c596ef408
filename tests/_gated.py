"""A model whose calls can be held in their interpreter with plain arguments only
(a tensor and an int), so that the calls take the extension's common send, which
leaves keyword and string arguments to the Python path.  Importable by the same
name in the host and in every interpreter (the tests directory is on both paths).

``gated(x, token)``: ``x * 2 + 1``; with ``token`` > 0 it first writes its pid to
:func:`started_file` and waits until :func:`gate_file` exists; ``token`` < 0 ends
the interpreter (``os._exit``) once started.
"""

from __future__ import annotations

import os
import tempfile
import time


def started_file(token: int) -> str:
    return os.path.join(tempfile.gettempdir(), f"multipy-gated-{abs(token)}.started")


def gate_file(token: int) -> str:
    return os.path.join(tempfile.gettempdir(), f"multipy-gated-{abs(token)}.gate")


def gated(x, token=0):
    if token:
        tmp = f"{started_file(token)}.{os.getpid()}"  # (several calls may share a token)
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.replace(tmp, started_file(token))
        if token < 0:
            os._exit(3)
        while not os.path.exists(gate_file(token)):
            time.sleep(0.001)
    return x * 2 + 1


def started_pid(token: int) -> int | None:
    """In the host: the pid of the interpreter running the call ``token``, once started."""
    try:
        with open(started_file(token)) as f:
            return int(f.read())
    except FileNotFoundError:
        return None


def open_gate(token: int) -> None:
    with open(gate_file(token), "w"):
        pass


def clean(token: int) -> None:
    for path in (started_file(token), gate_file(token)):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
