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
