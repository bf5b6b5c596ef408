"""Fork servers: where process interpreters are forked from.

::

    host ──connect──▶ fork server ──fork──▶ interpreter 0
                      (imported numpy,  ──fork──▶ interpreter 1
                       torch and the         ...
                       shared imports)

A fork server is a Python process that imported torch (and numpy, and the
worker loop) but never ran an op, so no thread pool exists for ``fork`` to
break; every interpreter is forked from it, so starting N interpreters costs
about one ``import torch``, and the pages of everything the server imported are
shared by all of them (copy-on-write) instead of being built N times.

There is one server per set of *shared imports* (a manager's ``preload=``
modules) and ``sys.path``, started on first use and stopped when the last
interpreter forked from it is closed; the plain one (no shared imports) is
kept for the host's lifetime, like the standard library's single fork server
(which multipy leaves alone for the host's own use).  A module in the set that cannot be imported
there (``ImportError``) is left out by the server and imported per interpreter.

A module that starts threads or initialises CUDA when imported must not be
imported before a fork: the child would inherit locks held by threads that do
not exist in it.  :mod:`._shared_imports` takes a count of the server's
threads before the shared imports; each interpreter compares it with the
server's count when it starts, and if it grew (or CUDA is initialised) it exits
at once with an exit code that says why (:data:`UNSAFE_THREADS`,
:data:`UNSAFE_CUDA`).  The host then stops
using that server, starts the interpreter from the plain one, imports the
modules per interpreter, and says so in ``statistics().notes``.
"""

from __future__ import annotations

import collections
import io
import json
import os
import sys
import threading
from multiprocessing import forkserver, popen_forkserver, reduction, spawn, util
from multiprocessing.context import ForkServerProcess, set_spawning_popen

from ._shared_imports import UNSAFE_CUDA, UNSAFE_THREADS  # noqa: F401  (exit codes)

BASE_IMPORTS = ("multipy.backends._process_main", "numpy", "torch")
PLAIN = ((), None)  # the key of the server without shared imports

PATH_VARIABLE = "MULTIPY_SHARED_IMPORTS_PATH"

_lock = threading.Lock()
_spawn_lock = threading.Lock()
_servers: dict[tuple, forkserver.ForkServer] = {}
_unsafe: dict[tuple, str] = {}   # server key -> why its shared imports are not shared
_users: collections.Counter = collections.Counter()  # server key -> interpreters using it
_starting = threading.local()    # the server the current thread starts a worker from


def server_key(shared: tuple[str, ...], sys_path: tuple[str, ...]) -> tuple:
    """The server that interpreters with these shared imports start from.  A key
    whose server proved unsafe (or failed) maps to the plain server, which
    imports numpy and torch from the host's ``sys.path`` (interpreters set their
    environment's path when they start)."""
    key = (tuple(shared), tuple(sys_path))
    if not shared or key in _unsafe:
        return PLAIN
    return key


def why_not_shared(shared: tuple[str, ...], sys_path: tuple[str, ...]) -> str | None:
    """Why these shared imports are imported per interpreter (``None``: they are not)."""
    return _unsafe.get((tuple(shared), tuple(sys_path)))


def mark_unsafe(shared: tuple[str, ...], sys_path: tuple[str, ...], why: str) -> None:
    """Stop forking from the server of these shared imports (see the module docstring)."""
    with _lock:
        _unsafe.setdefault((tuple(shared), tuple(sys_path)), why)
        server = _servers.pop((tuple(shared), tuple(sys_path)), None)
    if server is not None:
        server._stop()  # its interpreters have exited; nothing else forks from it


def hold(key: tuple) -> None:
    """An interpreter is forked from the server of ``key`` (see :func:`release`)."""
    with _lock:
        _users[key] += 1


def release(key: tuple) -> None:
    """That interpreter is closed: stop the server when nothing uses it any more
    (the plain server stays, as the standard library's does)."""
    with _lock:
        _users[key] -= 1
        if _users[key] > 0 or key == PLAIN:
            return
        del _users[key]
        server = _servers.pop(key, None)
    if server is not None:
        server._stop()


def _server(key: tuple) -> forkserver.ForkServer:
    with _lock:
        server = _servers.get(key)
        if server is None:
            server = _servers[key] = forkserver.ForkServer()
            shared, _ = key
            server.set_forkserver_preload(
                list(BASE_IMPORTS) + ["multipy.backends._shared_imports", *shared])
        return server


def ensure_running(key: tuple) -> forkserver.ForkServer:
    """Start the server for ``key`` unless it runs (see :func:`release` for how long)."""
    server = _server(key)
    with starting(key), _spawn_lock:
        # The server imports its shared modules from the environment's path:
        # _shared_imports sets it from this variable (and removes the variable).
        if key[1] is not None:
            os.environ[PATH_VARIABLE] = json.dumps(list(key[1]))
        try:
            server.ensure_running()
        finally:
            os.environ.pop(PATH_VARIABLE, None)
    return server


class starting:
    """While a thread starts a worker: which server, and the preparation data
    it gets (no ``__main__``)."""

    def __init__(self, key: tuple) -> None:
        self.key = key

    def __enter__(self):
        self._outer = getattr(_starting, "key", None)
        _starting.key = self.key
        return self

    def __exit__(self, *exc) -> None:
        _starting.key = self._outer


def preparation(data: dict) -> dict:
    """multiprocessing's start data for a worker or a server started by this thread.

    multiprocessing re-runs the parent's main script in every child so that
    functions defined there can be unpickled.  An interpreter never needs the
    host's ``__main__``, and re-running it costs start-up time and breaks
    scripts without an ``if __name__ == "__main__"`` guard, so it is left out.
    """
    key = getattr(_starting, "key", None)
    if key is not None:
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        data.pop("main_path", None)
    return data


class _Popen(popen_forkserver.Popen):
    """The standard library's forkserver Popen, connecting to this thread's server
    instead of the process-wide one (the body is the stdlib's ``_launch``)."""

    def _launch(self, process_obj):
        server = ensure_running(_starting.key)
        prep_data = spawn.get_preparation_data(process_obj._name)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        self.sentinel, w = server.connect_to_new_process(self._fds)
        parent_w = os.dup(w)
        self.finalizer = util.Finalize(self, util.close_fds, (parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class WorkerProcess(ForkServerProcess):
    """A process forked from the server chosen with :class:`starting`."""

    @staticmethod
    def _Popen(process_obj):
        return _Popen(process_obj)


def available() -> bool:
    import multiprocessing

    return "forkserver" in multiprocessing.get_all_start_methods() and sys.platform != "win32"
