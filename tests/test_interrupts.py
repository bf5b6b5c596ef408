"""A reply reaches only its caller: a call interrupted at any point never
shifts the answers of later calls.

The interrupts are real, at known points of a call:

* before the request is written: an argument whose pickling in the host raises
  ``KeyboardInterrupt`` (:class:`_faults.OnDump`);
* while the caller waits: the interpreter runs :func:`_faults.gate`, which says
  through a FIFO that the call started and then waits to be released; the test
  then sends ``SIGUSR1`` to the caller's thread, whose handler raises
  ``KeyboardInterrupt`` (what Ctrl-C does), and releases the call only once the
  caller has left, so the reply arrives with nobody waiting for it
  (``_interrupting.py``);
* while the result is unpickled in the host (:class:`_faults.OnLoad`).

After each, 20 calls must each get their own answer, on the same interpreter
(``INTERPRETERS = 1``).  A hypothesis test interleaves such interrupts with
calls from several threads.  The subinterpreter backend has its own file
(``test_subinterpreter_interrupts.py``, CPython 3.13).
"""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _faults import OnDump, OnLoad, replicated_run
from _interrupting import (interrupted_while_waiting,  # noqa: F401 (a fixture)
                          sigusr1_raises_keyboard_interrupt)

INTERPRETERS = 1


@pytest.fixture(scope="module")
def run(manager):
    return replicated_run(manager)


def gated_call_interrupted(run, result) -> None:
    """``run("gate", ...)`` returning ``result``, interrupted while the caller waits."""
    interrupted_while_waiting(lambda directory: run("gate", directory, result))


def assert_own_answers(run, n: int = 20) -> None:
    for i in range(n):
        x = torch.full((3,), float(i))
        try:
            out = run("echo", x)
        except KeyboardInterrupt as exc:  # would end the test session: fail this test only
            pytest.fail(f"call {i} was interrupted by another call's result: {exc!r}")
        assert torch.equal(out, x), f"call {i} got {out}, not its own answer {x}"


def generation(manager) -> int:
    return manager.statistics().interpreters[0].generation


def test_interrupted_before_the_request_is_written(manager, run):
    before = generation(manager)
    with pytest.raises(KeyboardInterrupt):
        run("echo", OnDump("host", "interrupt"))
    assert_own_answers(run)
    assert generation(manager) == before  # nothing was sent: nothing to restart


def test_interrupted_while_waiting_for_the_reply(manager, run):
    before = generation(manager)
    gated_call_interrupted(run, torch.full((3,), 7.0))
    assert_own_answers(run)
    assert generation(manager) == before  # the left reply was drained, not killed for


def test_interrupted_while_the_result_is_unpickled(manager, run):
    before = generation(manager)
    with pytest.raises(KeyboardInterrupt):
        run("result_load", "host", "interrupt")
    assert_own_answers(run)
    assert generation(manager) == before


def test_the_reply_of_a_caller_that_left_is_never_unpickled(manager, run):
    # Its value raises when unpickled in the host; the next caller must not see that.
    gated_call_interrupted(run, OnLoad("host", "interrupt"))
    assert_own_answers(run)


def test_interrupted_twice_in_a_row_then_answers_stay_in_order(manager, run):
    gated_call_interrupted(run, torch.full((3,), 7.0))
    gated_call_interrupted(run, torch.full((3,), 8.0))
    assert_own_answers(run)


# -- random interleavings --------------------------------------------------------

WORKER_STEPS = st.sampled_from(["call", "call", "interrupt-arguments", "interrupt-result"])


def _worker(run, index: int, steps: list[str], start: threading.Barrier, wrong: list) -> None:
    start.wait()
    for n, step in enumerate(steps):
        try:
            if step == "call":
                x = torch.tensor([float(index), float(n)])
                out = run("echo", x)
                if not torch.equal(out, x):
                    wrong.append((index, n, out))
            elif step == "interrupt-arguments":
                run("echo", OnDump("host", "interrupt"))
                wrong.append((index, n, "no KeyboardInterrupt"))
            else:
                run("result_load", "host", "interrupt")
                wrong.append((index, n, "no KeyboardInterrupt"))
        except KeyboardInterrupt:
            if step == "call":
                wrong.append((index, n, "an uninterrupted call was interrupted"))


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(plans=st.lists(st.lists(WORKER_STEPS, max_size=6), min_size=2, max_size=3),
       main_steps=st.lists(st.booleans(), min_size=1, max_size=3))
def test_random_interrupts_among_threads_never_shift_answers(manager, run, plans, main_steps):
    wrong: list = []
    start = threading.Barrier(len(plans) + 1)
    workers = [threading.Thread(target=_worker, args=(run, i, plan, start, wrong))
               for i, plan in enumerate(plans)]
    for t in workers:
        t.start()
    start.wait()
    try:
        for n, interrupt in enumerate(main_steps):
            if interrupt:  # the main thread is interrupted by a signal while it waits
                gated_call_interrupted(run, torch.full((2,), -1.0))
            else:
                x = torch.tensor([-1.0, float(n)])
                assert torch.equal(run("echo", x), x)
    finally:
        for t in workers:
            t.join(120)
    assert not any(t.is_alive() for t in workers), "a worker thread hangs"
    assert wrong == []
    assert_own_answers(run, 3)
