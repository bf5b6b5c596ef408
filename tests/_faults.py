"""Fault injection for the reliability tests: objects that raise or crash the
process at one chosen stage of a call.  Importable by the same name in the host
and in every interpreter (the tests directory is on both paths)."""

from __future__ import annotations

import ctypes
import os
import time

import multipy


def inside() -> bool:
    return multipy.interpreter_id() is not None


def act(action: str) -> None:
    if action == "raise":
        raise RuntimeError("injected fault")
    if action == "interrupt":
        raise KeyboardInterrupt("injected interrupt")
    if action == "exit":
        os._exit(13)
    if action == "abort":
        os.abort()
    if action == "segv":
        ctypes.string_at(0)
    raise AssertionError(f"unknown action {action}")


def _on_load(where: str, action: str) -> "OnLoad":
    if (where == "interpreter") == inside():
        act(action)
    return OnLoad(where, action)


class OnLoad:
    """Faults when unpickled in ``where`` ("host" or "interpreter")."""

    def __init__(self, where: str, action: str) -> None:
        self.where, self.action = where, action

    def __reduce__(self):
        return (_on_load, (self.where, self.action))


class OnDump:
    """Faults when pickled in ``where``."""

    def __init__(self, where: str, action: str) -> None:
        self.where, self.action = where, action

    def __reduce__(self):
        if (self.where == "interpreter") == inside():
            act(self.action)
        return (OnDump, (self.where, self.action))


#: The faults that raise (no crash), one per stage of a call: ``(stage, run's
#: arguments, expected exception type, words its message holds)``.  Every backend
#: must fail only that call and keep serving.
RAISES = [
    ("pickling arguments (host)", lambda: ("echo", OnDump("host", "raise")),
     multipy.TransportError, "injected fault"),
    ("unpickling arguments", lambda: ("echo", OnLoad("interpreter", "raise")),
     RuntimeError, "injected fault"),
    ("in the model", lambda: ("model", "raise"), RuntimeError, "injected fault"),
    ("pickling the result", lambda: ("result_dump", "interpreter", "raise"),
     multipy.TransportError, "injected fault"),
    ("unpickling the result (host)", lambda: ("result_load", "host", "raise"),
     multipy.TransportError, "could not be rebuilt in the host"),
]


def run(stage: str, *args):
    """The entry point a test calls inside an interpreter."""
    if stage == "echo":
        return args[0]
    if stage == "model":
        act(args[0])
    if stage == "result_dump":
        return OnDump(*args)
    if stage == "result_load":
        return OnLoad(*args)
    if stage == "sleep":
        time.sleep(args[0])
        return args[0]
    if stage == "started_then_sleep":  # (marker path, seconds): see _wait.wait_started
        from _wait import mark_started

        mark_started(args[0])
        time.sleep(args[1])
        return args[1]
    if stage == "pid":
        return os.getpid()
    if stage == "gate":
        return gate(*args)
    raise AssertionError(stage)


def gate(directory: str, value):
    """Inside an interpreter: say "started" through the FIFO ``directory/started``,
    then wait until the host writes to ``directory/release``; returns ``value``.
    Lets a test act at a known point of a call (while the caller waits)."""
    with open(os.path.join(directory, "started"), "w") as f:
        f.write("s")
    with open(os.path.join(directory, "release")) as f:
        f.read()
    return value


def _slow_load(seconds: float) -> "SlowToLoad":
    if inside():
        time.sleep(seconds)  # the work of loading a big model, not synchronisation
    return SlowToLoad(seconds)


class SlowToLoad:
    """Takes ``seconds`` to unpickle inside an interpreter (a model slow to load);
    calling it returns its argument."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __reduce__(self):
        return (_slow_load, (self.seconds,))

    def __call__(self, value):
        return value


def replicated_run(manager):
    """A ReplicatedObj of :func:`run` in ``manager`` (host side): being made from
    a global of the interpreter, it survives every restart."""
    with manager.acquire_one() as s:
        return s.create_movable(s.global_("_faults", "run"))
