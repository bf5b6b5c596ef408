"""The dispatcher on its own, driving stand-in workers: what it does with a
request that no interpreter took, and its "nothing queued" state.

No interpreter starts here: each ``_Dead`` worker answers every post the way a
backend does when the interpreter it sent to died before taking the request
(``RequestNotSent``), either at once from ``post`` or later through ``done``.
"""

from __future__ import annotations

import sys
import threading

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from multipy.backends.base import MAX_SENDS, RequestNotSent
from multipy.backends.completions import Completions
from multipy.errors import InterpreterCrashedError
from multipy.runtime.balancer import LoadBalancer
from multipy.runtime.dispatch import Dispatcher, Request
from multipy.transport.messages import Op


class _Dead:
    """A worker whose interpreter always dies before taking what is sent to it."""

    posted_depth = 1
    posted_in_flight = 0

    def __init__(self, index: int, *, later: bool) -> None:
        self.index = index
        self.lock = threading.Lock()
        self.on_free = None
        self.later = later  # answered through done() on the completion thread, not raised
        self.posts = 0
        self.completions = None

    def post(self, op, args, *, completions, done, **_):
        self.posts += 1
        error = RequestNotSent(InterpreterCrashedError(
            f"interpreter {self.index} died before it took this call", index=self.index))
        self.lock.release()  # Worker.post's contract: released when nothing was sent
        if not self.later:
            raise error
        completions.call_soon(lambda: done(None, error))
        return None


@pytest.fixture
def completions():
    c = Completions("multipy-completion-test")
    yield c
    c.close()


@pytest.mark.parametrize("later", [False, True], ids=["raised-by-post", "through-done"])
def test_a_posted_call_no_interpreter_takes_fails_after_max_sends(completions, later):
    workers = [_Dead(i, later=later) for i in range(2)]
    dispatcher = Dispatcher(workers, LoadBalancer(2), completions, lambda i: True)
    future = dispatcher.submit(Request(Op.CALL_REPLICATED, ()))
    with pytest.raises(InterpreterCrashedError, match="died before it took this call"):
        future.result(timeout=60)
    assert sum(w.posts for w in workers) == MAX_SENDS
    assert dispatcher._empty and not dispatcher._retries
    assert not any(w.lock.locked() for w in workers)


def test_a_request_that_may_not_be_resent_fails_at_the_first_dead_interpreter(completions):
    workers = [_Dead(i, later=True) for i in range(2)]
    dispatcher = Dispatcher(workers, LoadBalancer(2), completions, lambda i: True)
    future = dispatcher.submit(Request(Op.CALL_REPLICATED, (), resend=False))
    with pytest.raises(InterpreterCrashedError):
        future.result(timeout=60)
    assert sum(w.posts for w in workers) == 1


def test_a_completion_callback_that_raises_is_reported_and_later_ones_still_run(
        completions, monkeypatch, capfd):
    # Under Python's own unraisable hook (pytest replaces it), which accepts only its
    # own argument type: the report must not end the completion thread.
    monkeypatch.setattr("sys.unraisablehook", sys.__unraisablehook__)

    raised = threading.Event()

    def broken():
        raised.set()
        raise ValueError("a bug in a completion")

    completions.call_soon(broken)
    assert raised.wait(60)
    ran = threading.Event()
    completions.call_soon(ran.set)
    assert ran.wait(60), "the completion thread stopped after a callback raised"
    assert completions._thread.is_alive()
    err = capfd.readouterr().err
    assert "multipy: a completion callback raised" in err
    assert "ValueError: a bug in a completion" in err


def test_a_descriptor_watched_again_after_it_was_closed_and_its_number_reused(completions):
    # The completion thread re-arms a descriptor it watched before (a one-shot
    # registration stays in its epoll once it fired); one closed meanwhile left the
    # epoll, and the same number may now be another pipe: it is watched all the same.
    import os

    def watched(fd: int, w: int) -> bool:
        got = threading.Event()
        completions.watch(fd, lambda event: got.set() if event == "ready" else None)
        os.write(w, b"x")
        fired = got.wait(60)
        os.read(fd, 1)
        return fired

    r, w = os.pipe()
    r2, w2 = os.pipe()
    try:
        assert watched(r, w) and watched(r, w)  # the second time: re-armed
        os.close(r)  # the epoll forgets it ...
        os.dup2(r2, r)  # ... and the number is another pipe's now
        assert watched(r, w2), "a reused descriptor number was never watched"
    finally:
        for fd in (r, w, r2, w2):
            os.close(fd)


# -- the queues, the pump and "nothing queued", under any order of events ----------


class _Held:
    """A worker whose posted calls stay in flight until the test ends them."""

    posted_depth = 1

    def __init__(self, index: int) -> None:
        self.index = index
        self.lock = threading.Lock()
        self.on_free = None
        self.in_flight: list = []  # (done, args) of the calls sent here, oldest first

    @property
    def posted_in_flight(self) -> int:
        return len(self.in_flight)

    def post(self, op, args, *, completions, done, **_):
        self.in_flight.append((done, args))  # the lock stays held until the call ends
        return None

    def end_one(self) -> None:
        done, args = self.in_flight.pop(0)
        self.lock.release()  # as Worker.post's completion does, before done()
        done(args[0], None)


class DispatcherMachine(RuleBasedStateMachine):
    """Plain and pinned posted calls, cancellations and completions in any order:
    every future gets its own answer once, nothing waits while an interpreter that
    could take it is free, and ``_empty`` says exactly whether anything is queued."""

    def __init__(self) -> None:
        super().__init__()
        self.completions = Completions("multipy-completion-machine")
        self.workers = [_Held(i) for i in range(2)]
        self.balancer = LoadBalancer(2)
        self.dispatcher = Dispatcher(self.workers, self.balancer, self.completions,
                                     lambda i: True)
        self.futures: list = []  # (future, value)
        self.n = 0

    def _submit(self, index):
        self.n += 1
        future = self.dispatcher.submit(Request(Op.CALL_REPLICATED, (self.n,), index=index))
        self.futures.append((future, self.n))

    @rule()
    def submit(self):
        self._submit(None)

    @rule(index=st.integers(0, 1))
    def submit_pinned(self, index):
        self._submit(index)

    @rule(index=st.integers(0, 1))
    def end_a_call(self, index):
        worker = self.workers[index]
        if worker.in_flight:
            worker.end_one()

    @rule(data=st.data())
    def cancel(self, data):
        if self.futures:
            future, _ = data.draw(st.sampled_from(self.futures))
            future.cancel()

    @invariant()
    def empty_says_whether_anything_is_queued(self):
        d = self.dispatcher
        queued = bool(d._incoming or d._pending or d._retries or any(d._pinned))
        assert d._empty == (not queued)
        assert d._n_pinned == sum(len(q) for q in d._pinned)
        assert not d._pumping

    @invariant()
    def nothing_waits_while_an_interpreter_could_take_it(self):
        d = self.dispatcher
        live = [r for r in d._pending if not r.future.cancelled()]
        if live:
            assert all(w.in_flight for w in self.workers), "a free interpreter and a queued call"
        for worker, queue in zip(self.workers, d._pinned):
            if any(not g.requests[0].future.cancelled() for g in queue):
                assert worker.in_flight, "a free interpreter and a call queued for it"

    @invariant()
    def each_answer_reaches_its_own_caller(self):
        for future, value in self.futures:
            if future.done() and not future.cancelled():
                assert future.result() == value

    def teardown(self):
        for worker in self.workers:
            while worker.in_flight:
                worker.end_one()
        for future, value in self.futures:
            assert future.cancelled() or future.result(timeout=10) == value
        self.completions.close()


DispatcherMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40,
                                               deadline=None)
test_the_dispatcher_under_any_order_of_events = DispatcherMachine.TestCase
