"""Waiting on a condition, never for a guessed time.

``wait_for`` polls a condition until it holds and fails the test with what it
waited for when it does not within a generous limit (the limit only bounds a
broken run; a passing run waits exactly as long as the condition takes).
``mark_started(path)`` and ``wait_started(path)`` let a test know that a call is
running inside an interpreter: the call creates the file first thing.
"""

from __future__ import annotations

import os
import time

LIMIT = 60.0


def wait_for(condition, what: str, seconds: float = LIMIT) -> None:
    """Return once ``condition()`` is true; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: its files and pipes are closed)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # reaped before, or between open and read
        return True


def mark_started(path: str) -> None:
    """Called inside an interpreter at the start of a call: creates ``path``."""
    with open(path, "w"):
        pass


def wait_started(path) -> None:
    """Wait until the call that was given ``path`` runs."""
    wait_for(lambda: os.path.exists(path), f"the call to start ({path})")
