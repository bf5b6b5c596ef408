"""Host-side helpers for the interrupt tests: a signal handler that raises
``KeyboardInterrupt`` (what Ctrl-C does) and a gate that interrupts a caller at
a known point of its call.

The interpreter side of the gate is a function that writes to the FIFO
``<dir>/started`` and then reads ``<dir>/release`` (``_faults.gate``, or a
registered module on backends without the tests directory).  The host signals
the caller's thread once the call started, and releases the call once the
caller has left, so the reply comes back with nobody waiting for it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time

import pytest

from _wait import wait_for

_ARMED = threading.Event()  # the next SIGUSR1 raises KeyboardInterrupt; later ones do nothing


@contextlib.contextmanager
def sigusr1_interrupts():
    """While active, an armed SIGUSR1 raises KeyboardInterrupt in the main thread."""

    def interrupt(signum, frame):
        if _ARMED.is_set():
            _ARMED.clear()
            raise KeyboardInterrupt("SIGUSR1")

    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, previous)


def arm() -> None:
    """Make the next SIGUSR1 raise (e.g. before ``signal.raise_signal``)."""
    _ARMED.set()


class Gate:
    """Two FIFOs in a fresh directory (``dir``), passed to the interpreter's gate."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="multipy-gate-")
        for name in ("started", "release"):
            os.mkfifo(os.path.join(self.dir, name))
        self.left = threading.Event()  # set once the interrupted caller has left

    def interrupt_when_started(self, thread_ident: int) -> threading.Thread:
        """Once the gated call runs in the interpreter, signal ``thread_ident`` until
        its caller has left; then release the call.

        The signal is sent again until the caller has left because a signal that
        arrives just before a thread blocks in a system call is only handled when
        that call returns (CPython runs handlers between bytecodes); only the first
        one raises.  Gives up after a minute, so nothing hangs."""

        def act():
            with open(os.path.join(self.dir, "started")) as f:
                f.read()
            _ARMED.set()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                signal.pthread_kill(thread_ident, signal.SIGUSR1)
                if self.left.wait(0.01):
                    break
            _ARMED.clear()
            with open(os.path.join(self.dir, "release"), "w") as f:
                f.write("r")

        thread = threading.Thread(target=act, name="gate-keeper", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def interrupted_while_waiting(call, *args) -> None:
    """``call(gate_dir, *args)`` from this (the main) thread, interrupted by SIGUSR1
    while it waits; asserts that the KeyboardInterrupt reached the caller."""
    gate = Gate()
    keeper = gate.interrupt_when_started(threading.get_ident())
    try:
        with pytest.raises(KeyboardInterrupt):
            call(gate.dir, *args)
    finally:
        gate.left.set()
        keeper.join(60)
        gate.close()


@pytest.fixture(scope="module", autouse=True)
def sigusr1_raises_keyboard_interrupt():
    """Module fixture (import it into a test module): SIGUSR1 interrupts while the module runs."""
    with sigusr1_interrupts():
        yield


def balancer_counts(manager) -> list[int]:
    """The load balancer's count of users of each interpreter."""
    return [manager._balancer.in_flight(i) for i in range(len(manager))]


def assert_nothing_stranded(manager, point, counts) -> None:
    """After an interrupt at ``point``: the dispatcher's pump and queues, every
    interpreter's lock and posted calls in flight, and the balancer's counts
    (back to ``counts``) were given back."""
    dispatcher = manager._dispatcher
    wait_for(lambda: not dispatcher._pumping, f"the pump to be given back after {point}")
    wait_for(lambda: dispatcher._empty and not dispatcher._retries and not dispatcher._pending,
             f"what the pump took to be sent after {point}")
    for worker in manager._workers:
        wait_for(lambda: not worker.lock.locked() and worker.posted_in_flight == 0,
                 f"interpreter {worker.index}'s lock and calls in flight after {point}")
    wait_for(lambda: balancer_counts(manager) == counts,
             f"the balancer's counts to return to {counts} after {point} "
             f"(not {balancer_counts(manager)})")
