"""Ctrl-C while the dispatcher sends a posted call: nothing is stranded.

CPython runs a signal handler (Ctrl-C's ``KeyboardInterrupt``) right after a
call returns and when a Python function is entered.  A profile hook raising
``KeyboardInterrupt`` at those events in the dispatcher's own code stands for a
Ctrl-C landing there.  Each test records the events one posted call passes in
the main thread, then interrupts a fresh call at each of them in turn and checks
that the pump, the interpreters' locks and the balancer's counts were given
back, that whatever the pump had taken is sent after all, and that every kind of
posted call still gets its answer.

Not covered (no Python code can close it): the instant a non-blocking
``acquire()`` of an interpreter's lock returns (its result is lost with the
exception).  The inside of ``Worker.post`` (and the pump that it runs once the
call is sent) has its own test in ``test_interrupt_windows.py``.
"""

from __future__ import annotations

import sys

import pytest
import torch

from _interrupting import assert_nothing_stranded, balancer_counts
from _rows import movable_rows
from multipy.backends.base import Worker
from multipy.runtime import balancer as balancer_module
from multipy.runtime import dispatch

INTERPRETERS = 2

_HERE = dispatch.__file__
_POST = Worker.post.__code__
# (event, name) where an interrupt cannot be undone: see the module docstring.
# (The pump itself is claimed without such a window.)
_UNCOVERED = {("c_return", "acquire in _post_now"), ("c_return", "acquire in _dispatch"),
              ("c_return", "acquire in _dispatch_pinned")}


def _name(event, frame, arg) -> str:
    """What returned, and where (c_return); what is entered (call)."""
    if event == "c_return":
        return f"{getattr(arg, '__name__', '?')} in {frame.f_code.co_name}"
    return frame.f_code.co_name


def _in_dispatcher(event, frame) -> bool:
    """An event at which a signal handler would raise in the dispatcher's code
    (not in a pump that ``Worker.post`` runs once it sent the call)."""
    if event == "c_return":
        here = frame.f_code.co_filename == _HERE
    elif event == "call":
        caller = frame.f_back
        here = caller is not None and caller.f_code.co_filename == _HERE
    else:
        return False
    while here and frame is not None:
        if frame.f_code is _POST:
            return False
        frame = frame.f_back
    return here


def _points(action) -> list[tuple[str, str]]:
    """The (event, name) of every interruptible point ``action`` passes."""
    seen = []

    def hook(frame, event, arg):
        if _in_dispatcher(event, frame):
            seen.append((event, _name(event, frame, arg)))

    sys.setprofile(hook)
    try:
        future = action()
    finally:
        sys.setprofile(None)
    future.result(timeout=60)
    return seen


def _interrupt_at(n: int, action) -> tuple[str, str] | None:
    """Run ``action`` with a KeyboardInterrupt raised at its ``n``-th point; the
    point, or ``None`` when it never got that far."""
    count = [0]
    hit = []

    def hook(frame, event, arg):
        if hit or not _in_dispatcher(event, frame):
            return
        point = (event, _name(event, frame, arg))
        if count[0] == n:
            hit.append(point)
            if point not in _UNCOVERED:
                raise KeyboardInterrupt(f"at {point}")
        count[0] += 1

    sys.setprofile(hook)
    try:
        future = action()
    except KeyboardInterrupt:
        return hit[0]
    finally:
        sys.setprofile(None)
    future.result(timeout=60)  # not interrupted (an uncovered point, or not reached)
    return hit[0] if hit else None


@pytest.fixture(scope="module")
def model(manager):
    return movable_rows(manager)


@pytest.fixture(scope="module")
def session(manager):
    with manager.acquire_one() as s:
        yield s


def _posts(model, session):
    batched = model.batched(max_batch_size=4, max_delay_ms=0)
    rows = session.global_("_rows", "rows")
    return {
        "submit": lambda: model.submit(torch.ones(1)),           # sent at once: _post_now
        "batched": lambda: batched.submit(torch.ones(1)),        # through the queue: _dispatch
        "session": lambda: rows.submit(torch.ones(1)),           # pinned: _dispatch_pinned
    }


def _answer(future):
    value = future.result(timeout=60)
    return value.deref() if hasattr(value, "deref") else value


@pytest.mark.parametrize("kind", ["submit", "batched", "session"])
def test_a_ctrl_c_anywhere_in_the_dispatcher_strands_nothing(manager, model, session, kind):
    posts = _posts(model, session)
    action = posts[kind]
    points = _points(action)
    counts = balancer_counts(manager)  # the session holds a count of its own
    assert points, "the call passed no point of the dispatcher"
    interrupted = []
    for n in range(len(points)):
        point = _interrupt_at(n, action)
        if point is None:
            continue
        if point not in _UNCOVERED:
            interrupted.append(point)
        assert_nothing_stranded(manager, point, counts)
        for name, post in posts.items():
            assert torch.equal(_answer(post()), torch.full((1,), 3.0)), (point, name)
    assert interrupted, f"no point was interrupted among {points}"


def test_a_ctrl_c_before_a_batch_is_sent_fails_only_the_interrupted_callers_request(
        manager, model, monkeypatch):
    # The thread that submits a batchable request sends the batch it joins (its own
    # request with the ones other threads queued).  A Ctrl-C there before the batch
    # is sent reaches that thread and fails its own request; the other callers'
    # requests go back to the queue and get their answers.
    dispatcher = manager._dispatcher
    batched = model.batched(max_batch_size=8, max_delay_ms=0)
    counts = balancer_counts(manager)
    xs = [torch.full((1,), float(i)) for i in range(4)]
    others = [batched._request((x,), {}) for x in xs[:3]]
    own = batched._request((xs[3],), {})
    interrupted = []

    def interrupting(post):
        def once(*args, **kwargs):  # a Ctrl-C as Worker.post is entered (nothing sent)
            if not interrupted:
                interrupted.append(args)
                raise KeyboardInterrupt("as the batch was sent")
            return post(*args, **kwargs)
        return once

    for worker in manager._workers:
        monkeypatch.setattr(worker, "post", interrupting(worker.post))
    # Queued by other threads (their pumps found it busy): the next pump pass sends them.
    dispatcher._incoming.extend(others)
    dispatcher._empty = False
    with pytest.raises(KeyboardInterrupt):
        dispatcher.submit(own)
    assert len(interrupted) == 1 and batched.statistics().batch_sizes == {4: 1}  # one batch of the four
    # (exception(), not result(): a KeyboardInterrupt raised here would stop pytest)
    assert isinstance(own.future.exception(timeout=60), KeyboardInterrupt)
    for x, request in zip(xs, others):
        assert request.future.exception(timeout=60) is None
        assert torch.equal(request.future.result(), x * 2 + 1)
    assert_nothing_stranded(manager, "the batch's post", counts)


# -- a second Ctrl-C, inside the recovery from the first -----------------------------------
_RECOVERY_FILES = {_HERE, balancer_module.__file__}
_LET_GO_AFTER = Worker.let_go_after.__code__


def _in_recovery(event, frame) -> bool:
    """A point in the dispatcher's code or in what it calls to give back what it
    took (the balancer's release, ``Worker.let_go_after``)."""
    if event == "c_return":
        code = frame.f_code
    elif event == "call" and frame.f_back is not None:
        code = frame.f_back.f_code
    else:
        return False
    return code.co_filename in _RECOVERY_FILES or code is _LET_GO_AFTER


def _interrupted_twice(manager, monkeypatch, first: str, m: int, action):
    """Run ``action()`` with a KeyboardInterrupt raised by the first call of
    ``first`` ("_post": the dispatcher's send step, "post": ``Worker.post``, each
    as it is entered: nothing sent) and a second one at the ``m``-th point after
    it; returns the second's point (``None``: never reached) and the requests
    submitted meanwhile."""
    dispatcher = manager._dispatcher
    raised, hit, count, submitted = [], [], [0], []

    def interrupting(original):
        def once(*args, **kwargs):
            if not raised:
                raised.append(first)
                raise KeyboardInterrupt(f"as {first} was entered")
            return original(*args, **kwargs)
        return once

    submit = dispatcher.submit

    def recording(request):
        submitted.append(request)
        return submit(request)

    def hook(frame, event, arg):
        if not raised or hit or not _in_recovery(event, frame):
            return
        if count[0] == m:
            hit.append(_name(event, frame, arg))
            raise KeyboardInterrupt(f"at {hit[0]}, after one as {first} was entered")
        count[0] += 1

    with monkeypatch.context() as patch:
        patch.setattr(dispatcher, "submit", recording)
        if first == "_post":
            patch.setattr(dispatcher, "_post", interrupting(dispatcher._post))
        else:
            for worker in manager._workers:
                patch.setattr(worker, "post", interrupting(worker.post))
        sys.setprofile(hook)
        try:
            action()
        except KeyboardInterrupt:
            pass
        finally:
            sys.setprofile(None)
    assert raised, f"{first} was never entered"
    return (hit[0] if hit else None), submitted


@pytest.mark.parametrize("kind, first", [("submit", "_post"), ("session", "_post"),
                                         ("batch", "_post"), ("batch", "post")])
def test_a_second_ctrl_c_while_the_dispatcher_recovers_from_one_strands_nothing(
        manager, model, session, kind, first, monkeypatch):
    # The first Ctrl-C stops a send before anything went out; the second lands at each
    # point in turn of what gives back the interpreter's lock, the balancer's count and
    # the requests.  Nothing is stranded, and every request but the interrupted
    # caller's own is answered.
    dispatcher = manager._dispatcher
    batched = model.batched(max_batch_size=8, max_delay_ms=0)
    rows = session.global_("_rows", "rows")
    counts = balancer_counts(manager)
    xs = [torch.full((1,), float(i)) for i in range(4)]
    others = []

    def action():
        if kind == "submit":
            return model.submit(xs[0])
        if kind == "session":
            return rows.submit(xs[0])
        # Queued by other threads (their pumps found it busy): this one sends all four.
        others[:] = [batched._request((x,), {}) for x in xs[:3]]
        dispatcher._incoming.extend(others)
        dispatcher._empty = False
        return dispatcher.submit(batched._request((xs[3],), {}))

    points = []
    for m in range(200):
        point, submitted = _interrupted_twice(manager, monkeypatch, first, m, action)
        where = f"{point}, after one as {first} was entered"
        assert_nothing_stranded(manager, where, counts)
        for x, request in zip(xs, others):
            assert torch.equal(request.future.result(timeout=60), x * 2 + 1), where
        if kind == "session":  # queued again, then sent
            assert torch.equal(submitted[0].future.result(timeout=60).deref(), xs[0] * 2 + 1), where
        if point is None:
            break
        points.append(point)
    else:
        raise AssertionError("the recovery never ended")
    assert points, "no second interrupt landed in the recovery"
    for post in _posts(model, session).values():
        assert torch.equal(_answer(post()), torch.full((1,), 3.0))


def test_a_ctrl_c_as_another_callers_request_is_sent_does_not_fail_it(manager, model, monkeypatch):
    # The thread that submits a request runs the pump, which sends the request another
    # caller queued before it.  A Ctrl-C there before that send reaches this thread
    # only: the other caller's request goes back to the queue and gets its answer.
    dispatcher = manager._dispatcher
    counts = balancer_counts(manager)
    other = manager._replicated_request(model, None, (torch.full((1,), 5.0),), {}, None)
    interrupted = []

    def interrupting(post):
        def once(*args, **kwargs):  # a Ctrl-C as Worker.post is entered (nothing sent)
            if not interrupted:
                interrupted.append(args)
                raise KeyboardInterrupt("as the other caller's request was sent")
            return post(*args, **kwargs)
        return once

    for worker in manager._workers:
        monkeypatch.setattr(worker, "post", interrupting(worker.post))
    dispatcher._incoming.append(other)  # queued by another thread (its pump found it busy)
    dispatcher._empty = False
    with pytest.raises(KeyboardInterrupt):
        dispatcher.submit(manager._replicated_request(model, None, (torch.ones(1),), {}, None))
    assert len(interrupted) == 1
    # (exception(), not result(): a KeyboardInterrupt raised here would stop pytest)
    assert other.future.exception(timeout=60) is None
    assert torch.equal(other.future.result(), torch.full((1,), 11.0))
    assert_nothing_stranded(manager, "the other caller's post", counts)
