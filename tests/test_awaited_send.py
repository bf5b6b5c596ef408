"""A served request's send in C (``_native.post_awaited``): an awaited call read on
its loop (``submit_async(..., on_loop=True)``) whose common case -- nothing queued,
an idle interpreter or room in one's queue, the process backend's call channel, an
object loaded there, plain arguments -- is sent in one C call; anything else goes
through ``Dispatcher.submit``.  These tests count which path each send took and
check that both leave the same statistics, errors and interpreter state.

Calls that must stay in flight wait inside the interpreter for a gate file
(``_gated.gated(x, token)``: plain arguments, so they take the C send), so nothing
here depends on timing.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal

import pytest
import torch

import multipy
from _gated import clean, open_gate, started_pid
from _awaited import books as _state, call_on_loop as _call, delta as _delta, idle
from _wait import wait_for
from multipy.runtime import dispatch

INTERPRETERS = 2

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

_tokens = itertools.count(os.getpid() * 1000 + 1)


@pytest.fixture(scope="module")
def model(manager, backend):
    if backend != "process" or dispatch._post_awaited is None:
        pytest.skip("the send in C is the process backend's, on the call channel")
    with manager.acquire_one() as s:
        return s.create_movable(s.global_("_gated", "gated"))


@pytest.fixture
def token():
    t = next(_tokens)
    yield t
    open_gate(t)  # (a test that failed half-way leaves no call waiting)
    clean(t)


@pytest.fixture
def sends(monkeypatch, request):
    """What each awaited send did: [Python path, sent in C]; ``off()`` sends every
    request down the Python path.  With the module's model, counted from after a
    few calls that load it everywhere and carry the releases left by earlier tests
    (both go with the Python path's send)."""
    if dispatch._post_awaited is None:
        pytest.skip("the send in C needs the extension (MULTIPY_NATIVE=0: the Python path only)")
    if "model" in request.fixturenames:
        model = request.getfixturevalue("model")
        _all_at_once(model, 4 * INTERPRETERS)  # (one at a time go to one interpreter)
        _one_at_a_time(model, 2)
    class Taken(list):
        def off(self):
            monkeypatch.setattr(dispatch, "_post_awaited", None)

    real, taken = dispatch._post_awaited, Taken([0, 0])

    def counting(dispatcher, request):
        done = real(dispatcher, request)
        taken[done] += 1
        return done

    monkeypatch.setattr(dispatch, "_post_awaited", counting)
    return taken





IDLE = idle(INTERPRETERS)


def _one_at_a_time(model, n):
    async def main():
        return [await _call(model, torch.full((2,), float(i))) for i in range(n)]

    return asyncio.run(main())


def _all_at_once(model, n):
    async def main():
        return await asyncio.gather(*(_call(model, torch.full((2,), float(i))) for i in range(n)))

    return asyncio.run(main())


@pytest.mark.parametrize("run", [_one_at_a_time, _all_at_once], ids=["lone", "64-in-flight"])
def test_sends_in_c_leave_the_python_paths_results_and_statistics(model, manager, sends, run):
    n = 30 if run is _one_at_a_time else 64
    before = _state(manager)
    outs = run(model, n)
    in_c = _delta(before, _state(manager))
    assert [o[0].item() for o in outs] == [i * 2 + 1 for i in range(n)]
    # lone: every send; 64 at once: those while an interpreter has room
    assert sends[1] >= (n if run is _one_at_a_time else INTERPRETERS), sends

    sends.off()
    before = _state(manager)
    outs = run(model, n)
    in_python = _delta(before, _state(manager))
    assert [o[0].item() for o in outs] == [i * 2 + 1 for i in range(n)]
    assert in_c == in_python == {"calls": n, "latencies": n, "failures": 0, **IDLE}


def test_an_error_reply_of_a_call_sent_in_c_keeps_its_type(model, manager, sends):
    async def main():
        with pytest.raises(TypeError) as info:
            await _call(model, "not a tensor", 0)  # a string: the Python path's send
        with pytest.raises(RuntimeError) as info:
            await _call(model, torch.zeros(2), torch.zeros(3))  # the model's own error
        return info.value

    before = _state(manager)
    error = asyncio.run(main())
    assert sends[1] >= 1
    assert _delta(before, _state(manager)) == {"calls": 2, "latencies": 2, "failures": 2, **IDLE}
    assert error.__cause__ is not None  # the interpreter's traceback, as for any call


def test_the_first_call_of_an_object_is_sent_by_python_then_the_next_ones_in_c(
        manager, sends, backend):
    if backend != "process" or dispatch._post_awaited is None:
        pytest.skip("the send in C is the process backend's")
    with manager.acquire_one() as s:
        fresh = s.create_movable(s.global_("_gated", "gated"))
    try:
        outs = _one_at_a_time(fresh, 2 * INTERPRETERS + 2)
        assert [o[0].item() for o in outs] == [i * 2 + 1 for i in range(2 * INTERPRETERS + 2)]
        # (one first load per interpreter at most: the recipe goes with the Python path's send)
        assert sends[0] <= INTERPRETERS and sends[1] >= 2
        assert sorted(fresh.loaded_in()) == list(range(INTERPRETERS)) or sends[0] < INTERPRETERS
    finally:
        del fresh


def test_a_call_cancelled_in_flight_is_dropped_there_counted_and_the_pool_usable(
        model, manager, sends, token, assert_usable):
    async def main():
        slow = asyncio.ensure_future(_call(model, torch.zeros(1), token))
        await asyncio.to_thread(wait_for, lambda: started_pid(token), "the call to start")
        assert sends[1] == 1
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        open_gate(token)
        # its reply is still read (on this loop, free while the thread waits): the
        # interpreter comes back
        await asyncio.to_thread(wait_for, lambda: not any(manager._balancer._load),
                                "the interpreter to be given back")

    before = _state(manager)
    asyncio.run(main())
    assert _delta(before, _state(manager)) == {"calls": 1, "latencies": 1, "failures": 0, **IDLE}
    assert_usable(manager)


def test_a_call_cancelled_while_queued_behind_full_interpreters_is_never_sent(
        model, manager, sends, token):
    depth = manager._workers[0].posted_depth
    held = INTERPRETERS * depth  # every interpreter running one call, its queue full

    async def main():
        calls = [asyncio.ensure_future(_call(model, torch.zeros(1), token)) for _ in range(held)]
        await asyncio.to_thread(wait_for, lambda: started_pid(token), "a held call to start")
        queued = asyncio.ensure_future(_call(model, torch.full((1,), 5.0)))
        await asyncio.sleep(0)  # it runs to its await: no room anywhere, queued
        assert sends == [1, held], sends
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        open_gate(token)
        return await asyncio.gather(*calls)

    before = _state(manager)
    outs = asyncio.run(main())
    assert [o.item() for o in outs] == [1.0] * held
    # the cancelled call never reached an interpreter: only the held ones ran
    assert _delta(before, _state(manager)) == {"calls": held, "latencies": held, "failures": 0,
                                               **IDLE}


def test_a_timeout_around_a_call_sent_in_c_leaves_the_interpreter_usable(
        model, manager, sends, token):
    async def main():
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(_call(model, torch.zeros(1), token), 0.05)
        open_gate(token)
        await asyncio.to_thread(wait_for, lambda: not any(manager._balancer._load),
                                "the interpreter to be given back")
        return await _call(model, torch.ones(1))

    assert asyncio.run(main()).item() == 3.0
    assert sends[1] == 2


def test_an_interpreter_killed_mid_call_fails_the_call_sent_in_c_at_once(
        model, manager, sends, token):
    async def main():
        call = asyncio.ensure_future(_call(model, torch.zeros(1), token))
        await asyncio.to_thread(wait_for, lambda: started_pid(token), "the call to start")
        os.kill(started_pid(token), signal.SIGKILL)
        with pytest.raises(multipy.InterpreterCrashedError):
            await asyncio.wait_for(call, 120)  # the bell's end-of-file, not a timeout

    asyncio.run(main())
    assert sends[1] == 1
    wait_for(lambda: all(w.dead_reason is None and w._started for w in manager._workers),
             "the replacement to start")
    outs = _one_at_a_time(model, 2 * INTERPRETERS + 2)
    assert [o[0].item() for o in outs] == [i * 2 + 1 for i in range(2 * INTERPRETERS + 2)]
    assert sends[1] >= 1 + INTERPRETERS  # (the replacement's first load: Python's send)


def test_an_interrupt_before_the_send_gives_back_the_interpreter(model, manager, sends,
                                                                 monkeypatch):
    """A Python call made by the C send (the dispatcher's usable test) raising
    KeyboardInterrupt: raised to the caller, nothing sent, nothing left taken."""
    dispatcher = manager._dispatcher

    def interrupted(index):
        raise KeyboardInterrupt

    async def main():
        with pytest.raises(KeyboardInterrupt):
            await _call(model, torch.zeros(1))

    before = _state(manager)
    monkeypatch.setattr(dispatcher, "_usable", interrupted)
    asyncio.run(main())
    monkeypatch.undo()
    assert _delta(before, _state(manager)) == {"calls": 0, "latencies": 0, "failures": 0, **IDLE}
    assert [o[0].item() for o in _one_at_a_time(model, 2)] == [1.0, 3.0]


def test_a_closed_manager_refuses_the_call_with_its_error(sends, backend):
    if backend != "process" or dispatch._post_awaited is None:
        pytest.skip("the send in C is the process backend's")
    with multipy.InterpreterManager(1, backend=backend) as m:
        with m.acquire_one() as s:
            obj = s.create_movable(s.global_("_gated", "gated"))
        assert _one_at_a_time(obj, 3)[2][0].item() == 5.0
    with pytest.raises(multipy.ManagerClosedError):
        _one_at_a_time(obj, 1)
    assert sends[1] >= 1
