"""Several calls in flight on one interpreter (the process backend).

A blocking call holds its interpreter's lock only while its request is sent;
it then waits for its own reply, so other threads' requests queue up in the
interpreter meanwhile.  These tests check that this happens, that every
caller still gets its own answer (whatever the payload sizes: in the ring and
slots, or spilled to the pipes), and that the failure model holds with
several calls in flight: a SIGKILL fails at once the calls the interpreter
had taken and re-sends to the replacement those it never took (the call
channel knows which; on the pipes a request written is a request taken), a
timeout kills and restarts, and a caller interrupted by a signal leaves a
reply that reaches nobody.

They run on the C call channel and, in ``make test``, once more with
``MULTIPY_NATIVE=0`` on the pipes, where a call holds its interpreter until
its reply (one in flight at a time): there, the same faults must leave every
caller with its own answer or a clear error too.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import multipy
from _faults import replicated_run
from _interrupting import (Gate, interrupted_while_waiting,  # noqa: F401 (a fixture)
                          sigusr1_raises_keyboard_interrupt)
from _wait import wait_for
from multipy.backends import process
from multipy.backends.base import Worker
from multipy.transport import channel as chan

INTERPRETERS = 1


@pytest.fixture(scope="module")
def manager():
    with multipy.InterpreterManager(1, backend="process", call_timeout=120) as m:
        yield m


@pytest.fixture(scope="module")
def run(manager):
    return replicated_run(manager)


def _worker(manager):
    worker = manager._workers[0]
    worker.ready()
    return worker


def _in_threads(calls):
    """Run each ``call()`` in its own thread; returns ``(threads, results)``, where
    ``results[i]`` is the value or the exception of ``calls[i]``."""
    results: list = [None] * len(calls)

    def body(i, call):
        try:
            results[i] = call()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            results[i] = exc

    threads = [threading.Thread(target=body, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    return threads, results


def _join(threads):
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a caller hangs"


def _held_call(run, value):
    """A call that runs in the interpreter until released: ``(gate, thread, results)``."""
    gate = Gate()
    threads, results = _in_threads([lambda: run("gate", gate.dir, value)])
    with open(os.path.join(gate.dir, "started")) as f:  # the interpreter runs it now
        f.read()
    return gate, threads[0], results


def _release(gate):
    with open(os.path.join(gate.dir, "release"), "w") as f:
        f.write("r")


def assert_own_answers(run, n: int = 10) -> None:
    for i in range(n):
        x = torch.full((3,), float(i))
        assert torch.equal(run("echo", x), x), f"call {i} did not get its own answer"


def _queued(worker, n: int) -> None:
    """Wait until ``n`` calls are in flight (on the channel; the pipes send one at a time)."""
    if chan.NATIVE:
        wait_for(lambda: len(worker._owed) == n, f"{n} calls in flight")


def test_calls_from_other_threads_are_sent_while_one_runs(manager, run):
    if not chan.NATIVE:
        pytest.skip("on the pipes a call holds its interpreter until its reply")
    worker = _worker(manager)
    gate, held, held_result = _held_call(run, "held")
    try:
        # Each of these is sent while the held call still runs: none waits for the lock.
        threads, results = _in_threads([lambda i=i: run("echo", i) for i in range(5)])
        wait_for(lambda: len(worker._owed) == 6, "the 5 calls to be in flight beside the held one")
    finally:
        _release(gate)
        gate.close()
    _join(threads + [held])
    assert held_result == ["held"]
    assert results == list(range(5))
    assert not worker._owed


def test_a_hundred_callers_of_one_interpreter_are_all_sent_at_once(manager, run):
    # Each waits on a reply slot of its own.  With one slot too few, a caller waited
    # for one while holding the worker lock, and every caller behind it waited too.
    if not chan.NATIVE:
        pytest.skip("on the pipes a call holds its interpreter until its reply")
    worker = _worker(manager)
    callers = 100
    gate, held, held_result = _held_call(run, "held")
    try:
        threads, results = _in_threads([lambda i=i: run("echo", i) for i in range(callers)])
        wait_for(lambda: len(worker._owed) == callers + 1,
                 f"the {callers} calls to be in flight beside the held one", 30)
    finally:
        _release(gate)
        gate.close()
    _join(threads + [held])
    assert held_result == ["held"]
    assert results == list(range(callers))
    assert not worker._owed


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.lists(st.sampled_from([0, 1, 200, 5_000, 70_000, 200_000]),
                               min_size=1, max_size=4), min_size=2, max_size=8))
def test_many_threads_with_random_payload_sizes_each_get_their_own_answer(manager, run, sizes):
    # 70 kB replies do not fit a reply slot and 200 kB requests not the ring: both
    # cross the pipes beside the channel, in reply order, among the small ones.
    def caller(index, plan):
        def call():
            wrong = []
            for n, size in enumerate(plan):
                payload = bytes([index, n % 256]) * (size // 2)
                if run("echo", payload) != payload:
                    wrong.append((index, n, size))
            return wrong
        return call

    threads, results = _in_threads([caller(i, plan) for i, plan in enumerate(sizes)])
    _join(threads)
    assert results == [[] for _ in sizes]
    assert not _worker(manager)._owed


def test_sigkill_with_several_calls_in_flight(manager, run):
    worker = _worker(manager)
    pid = worker.pid
    gate, held, held_result = _held_call(run, "held")
    try:
        threads, results = _in_threads([lambda i=i: run("echo", i) for i in range(6)])
        _queued(worker, 7)  # 6 calls queued behind the running one
        os.kill(pid, signal.SIGKILL)
        _join(threads + [held])
    finally:
        gate.close()
    # The call the interpreter ran fails at once.
    assert isinstance(held_result[0], multipy.InterpreterCrashedError), held_result
    assert "SIGKILL(-9)" in str(held_result[0])
    # The interpreter never took the queued ones (the channel knows it; on the pipes
    # they were never sent): they went to its replacement.
    assert results == list(range(6))
    assert_own_answers(run)
    assert run("echo", b"y" * 200_000) == b"y" * 200_000
    assert worker.pid != pid


def test_a_timeout_with_calls_queued_behind_it_restarts_and_they_are_answered_or_failed(manager, run):
    worker = _worker(manager)
    pid = worker.pid
    marker = os.path.join(tempfile.mkdtemp(prefix="multipy-started-"), "started")
    slow = run.with_timeout(2.0)
    threads, results = _in_threads([lambda: slow("started_then_sleep", marker, 3600.0)])
    wait_for(lambda: os.path.exists(marker), "the slow call to start")
    others, answers = _in_threads([lambda i=i: run("echo", i) for i in range(3)])
    _join(threads + others)
    assert isinstance(results[0], multipy.CallTimeoutError), results
    assert answers == list(range(3))  # never taken by the killed interpreter: re-sent
    assert_own_answers(run)
    assert worker.pid != pid


def test_an_interrupted_caller_among_calls_in_flight_shifts_no_answer(manager, run):
    worker = _worker(manager)
    generation = worker.generation

    # The main thread's gated call is interrupted while 4 other calls wait behind it.
    def call(gate_dir):
        before = worker._next_call  # call ids grow: the gated call is the next one
        threads, results = _in_threads([lambda i=i: _after_sent(worker, before, i, run)
                                        for i in range(4)])
        call.joined = threads, results
        return run("gate", gate_dir, torch.zeros(2))

    interrupted_while_waiting(call)
    threads, results = call.joined
    _join(threads)
    for i, result in enumerate(results):
        assert torch.equal(result, torch.full((2,), float(i))), results
    assert worker.generation == generation  # the left reply was settled, not killed for
    assert_own_answers(run)
    assert not worker._owed


def _after_sent(worker, before: int, i: int, run):
    """``run("echo", ...)`` once the call after call id ``before`` was sent (queued
    behind it, unless that one already ended)."""
    wait_for(lambda: worker._next_call > before or not chan.NATIVE, "the gated call to be sent")
    return run("echo", torch.full((2,), float(i)))


def test_blocking_calls_after_a_posted_one_leave_the_bell_silent(manager, run):
    # The bell pipe wakes the completion thread for posted calls; it must not keep
    # ringing (and fill up) for the blocking calls made after one.
    if not chan.NATIVE:
        pytest.skip("the bell pipe belongs to the native call channel")
    end = _worker(manager)._end

    def rung() -> bool:
        try:
            return len(os.read(end.bell_r, 1 << 16)) > 0
        except BlockingIOError:
            return False

    assert run.submit("echo", 1).result(timeout=60) == 1
    rung()  # empties what the posted call rang
    for i in range(50):
        assert run("echo", i) == i
    assert not rung()


def test_close_with_several_calls_in_flight_fails_each_with_manager_closed():
    with multipy.InterpreterManager(1, backend="process") as m:
        with m.acquire_one() as s:
            run = s.create_movable(s.global_("_faults", "run"))
        worker = _worker(m)
        gate, held, held_result = _held_call(run, "held")
        try:
            threads, results = _in_threads([lambda i=i: run("echo", i) for i in range(3)])
            _queued(worker, 4)  # 3 calls queued behind the held one
            m.close(timeout=0.5)  # the held call never ends by itself
            _join(threads + [held])
        finally:
            gate.close()
    for result in held_result + results:
        assert isinstance(result, multipy.ManagerClosedError), held_result + results


def test_calls_sent_while_a_caller_starts_waiting_leave_its_wait_intact(manager, run):
    # A waiting caller runs without a lock, so at each point where it may give up
    # the GIL (each return from a builtin) another thread may send a call.  Here one
    # does, at every such point of the wait's set-up, and the caller must still get
    # its answer (looking at the calls in flight must survive them changing).
    if not chan.NATIVE:
        pytest.skip("on the pipes a call holds its interpreter until its reply")
    worker = _worker(manager)
    assert run("echo", 0) == 0  # loaded: the gated call below is sent and awaited alone
    waiting = threading.Event()  # the caller reached its wait (or left)
    sent: list = []  # (threads, results) of the calls sent from the hook

    def hook(frame, event, arg):
        if waiting.is_set():
            return
        if ((event == "call" and frame.f_code is chan.HostEnd.wait.__code__)
                or (event == "c_call" and getattr(arg, "__name__", None) == "finish")):
            waiting.set()  # (the extension's Caller.finish sets its wait up without the GIL)
        elif (event == "c_return" and len(sent) < 16
              and (frame.f_code in _SETTING_UP
                   or (frame.f_code is Worker._request_in_flight.__code__  # the lock let go
                       and getattr(arg, "__name__", None) == "__exit__"))):
            before = worker._next_call
            sent.append(_in_threads([lambda i=len(sent): run("echo", i)]))
            wait_for(lambda: worker._next_call > before, "a call sent from another thread")

    gate = Gate()

    def release_once_waiting():
        with open(os.path.join(gate.dir, "started")) as f:  # the interpreter runs it now
            f.read()
        wait_for(waiting.is_set, "the gated caller to wait")
        _release(gate)

    keeper = threading.Thread(target=release_once_waiting, daemon=True)
    keeper.start()
    sys.setprofile(hook)
    try:
        try:
            answer = run("gate", gate.dir, "gated")
        finally:
            sys.setprofile(None)
            waiting.set()
    finally:
        keeper.join(60)
        gate.close()
    assert answer == "gated"
    assert sent, "no call was sent while the caller set up its wait"
    for n, (threads, results) in enumerate(sent):
        _join(threads)
        assert results == [n]
    assert_own_answers(run)
    assert not worker._owed


_SETTING_UP = (process.ProcessWorker._channel_reply.__code__,
               process.ProcessWorker._await_call.__code__)


def _announced_free():
    """The worker's ``on_free`` during the test below (the dispatcher's wake-up)."""


# Points between the end of the send and the start of the wait for the reply, where
# a signal handler may raise (Ctrl-C): (function, profile event, C function name).
_AFTER_SEND = {
    "the request is written": (process.ProcessWorker._send, "return", None),
    "the ticket is returned": (process.ProcessWorker._send_call, "return", None),
    "the worker lock is released": (Worker._request_in_flight, "c_return", "__exit__"),
    "the worker is announced free": (_announced_free, "call", None),
    "the wait is entered": (process.ProcessWorker._await_call, "call", None),
    "the reply is awaited": (process.ProcessWorker._finish, "call", None),
    "the extension waits": (process.ProcessWorker._await_call, "c_call", "finish"),
    "the extension settled the reply": (process.ProcessWorker._await_call, "c_return", "finish"),
}


@pytest.mark.parametrize("point", list(_AFTER_SEND))
def test_a_caller_interrupted_between_send_and_wait_leaves_nothing_held(manager, run, point):
    # A KeyboardInterrupt at any point between the send and the wait must leave the
    # call to be settled by whoever reads its reply: its slot freed, its caller gone
    # from the calls in flight (a restart waits for those to leave).
    worker = _worker(manager)
    assert run("echo", 0) == 0  # loaded: the call below is one request
    function, event, c_name = _AFTER_SEND[point]
    code = function.__code__
    hit = []

    def hook(frame, ev, arg):
        if (ev == event and frame.f_code is code and not hit
                and (c_name is None or getattr(arg, "__name__", None) == c_name)):
            hit.append(ev)
            raise KeyboardInterrupt(point)

    on_free, worker.on_free = worker.on_free, _announced_free
    sys.setprofile(hook)
    raised = False
    try:
        # A tensor's reply the extension settles itself; an int's goes to _finish.
        run("echo", 1 if function is process.ProcessWorker._finish else torch.ones(4))
    except KeyboardInterrupt:
        raised = True
    finally:
        sys.setprofile(None)
        worker.on_free = on_free
    if not hit:
        pytest.skip(f"no call passes there on this transport ({point})")
    assert raised
    assert not worker._callers, "the interrupted caller is still counted as waiting"
    assert worker._drain(0)  # a restart would not wait for it
    assert_own_answers(run, 3)
    wait_for(lambda: not worker._owed, "the interrupted call to be settled")
    assert not worker._slots and not worker._left


def test_on_the_pipes_a_caller_spins_only_while_no_other_thread_is_in_a_call(manager, run):
    # On the pipes a call holds its interpreter until its reply: the callers behind it
    # wait for the worker lock.  The one that sends next must not spin on poll(0) for
    # its reply while another still waits (each poll gives up the GIL).
    if chan.NATIVE:
        pytest.skip("on the call channel the extension decides (test_channel)")
    from multipy.backends.base import in_calls

    worker = _worker(manager)
    assert run("echo", 0) == 0
    gate, held, held_result = _held_call(run, "held")
    waiter, spins = worker._waiter, {}
    wait = waiter.wait

    def recording(*args, spin=True, **kwargs):
        spins.setdefault(threading.get_ident(), []).append(spin)
        return wait(*args, spin=spin, **kwargs)

    waiter.wait = recording
    try:
        threads, results = _in_threads([lambda i=i: run("echo", i) for i in (1, 2)])
        wait_for(lambda: len(in_calls) >= 3, "two callers queued behind the held call")
        _release(gate)
        _join(threads + [held])
    finally:
        waiter.wait = wait
        gate.close()
    assert held_result == ["held"] and results == [1, 2]
    queued = [spins[t.ident] for t in threads]
    assert [False] in queued, queued  # the first of the two sent while the other waited
