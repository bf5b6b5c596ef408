"""``close()`` racing calls in flight: every caller gets its own answer or
:class:`~multipy.ManagerClosedError`, never an ``OSError`` from a descriptor
closed (or reused) under it.

Each repetition starts a two-interpreter manager, has ``CALLERS`` host threads
call it in a loop, and closes it with ``timeout=0`` (kill at once) once they
are calling: the close lands at a different point of a call each time.  In one
repetition in three, one caller's call is certainly being waited on.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading

import torch

import multipy
from _wait import wait_started

REPETITIONS = 12
CALLERS = 8


def _caller(run, long_call: str | None, calling: threading.Event, outcomes: list) -> None:
    n = 0
    while True:
        x = torch.full((4,), float(n))
        try:
            if long_call:
                out = run("started_then_sleep", long_call, 30.0)  # cut short by close()
                outcomes.append(("answer", out == 30.0))
            else:
                out = run("echo", x)
                outcomes.append(("answer", torch.equal(out, x)))
                if n == 3:
                    calling.set()
        except multipy.ManagerClosedError:
            outcomes.append(("closed", True))
            return
        except BaseException as exc:  # anything else is the bug
            outcomes.append(("unexpected", repr(exc)))
            return
        n += 1


def test_close_racing_calls_gives_each_caller_its_answer_or_manager_closed(backend):
    for rep in range(REPETITIONS):
        long_call = None
        calling = threading.Event()
        if rep % 3 == 0:  # close while the caller certainly waits for the reply
            long_call = os.path.join(tempfile.mkdtemp(prefix="multipy-close-"), "started")
        manager = multipy.InterpreterManager(2, backend=backend)
        try:
            with manager.acquire_one() as s:
                run = s.create_movable(s.global_("_faults", "run"))
            outcomes: list = []
            callers = [threading.Thread(target=_caller, args=(run, long_call if i == 0 else None,
                                                               calling, outcomes))
                       for i in range(CALLERS)]
            for caller in callers:
                caller.start()
            assert calling.wait(60), "no caller started calling"
            if long_call:
                wait_started(long_call)
            manager.close(timeout=0)
            for caller in callers:
                caller.join(60)
            assert not any(c.is_alive() for c in callers), \
                f"repetition {rep}: a caller hangs after close()"
        finally:
            manager.close()
            if long_call:
                shutil.rmtree(os.path.dirname(long_call), ignore_errors=True)
        unexpected = [o for o in outcomes if o[0] == "unexpected"]
        assert unexpected == [], f"repetition {rep}: {unexpected}"
        assert all(ok for _, ok in outcomes), f"repetition {rep}: a wrong answer: {outcomes}"
        assert outcomes.count(("closed", True)) == CALLERS  # each caller ends with it
