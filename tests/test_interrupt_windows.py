"""A Ctrl-C inside the load balancer or a batch's top-up changes nothing, or
changes what its caller is then told.

CPython runs a signal handler (Ctrl-C's ``KeyboardInterrupt``) right after a
call returns (a lock's ``__exit__`` at the end of a ``with`` block included)
and when a Python function is entered.  A profile hook raising
``KeyboardInterrupt`` at those events, inside the function under test, stands
for a Ctrl-C landing there.  Each test records the points one call passes,
then interrupts a fresh call at each of them in turn and checks the state the
interrupted call left behind:

* ``LoadBalancer.acquire``/``acquire_room``/``release``: a call that raises
  leaves every count as it was (its caller, who holds nothing new or still holds
  what it tried to give back, then gives back exactly what it holds);
* ``BatchedObj.top_up``: every request is exactly once in the batch or in the
  queue, and a request whose future was started is in the batch, or queued as
  a retry (which does not start its future again).

Manager-level tests of the same windows, with interpreters, are in
``test_dispatch_interrupts.py``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import gc
import operator
import sys
import threading

import pytest
import torch

import multipy
from _interrupting import assert_nothing_stranded, balancer_counts
from _rows import movable_rows
from _wait import wait_for
from multipy.backends import base
from multipy.backends.base import Worker, _PostedCall
from multipy.runtime import dispatch
from multipy.runtime import manager as manager_module
from multipy.runtime.balancer import LoadBalancer
from multipy.runtime.batching import BatchedObj
from multipy.runtime.dispatch import Request, _Started
from multipy.runtime.manager import InterpreterManager
from multipy.transport import channel
from multipy.transport.messages import Drop, Op


def _name(event, frame, arg) -> str:
    if event == "c_return":
        return f"{getattr(arg, '__name__', '?')} in {frame.f_code.co_name}"
    return f"{frame.f_code.co_name} from {frame.f_back.f_code.co_name}"


def _inside(codes, event, frame) -> bool:
    """A point at which a signal handler would raise in one of ``codes``: a C
    call returning there, or a Python function entered from there."""
    if event == "c_return":
        return frame.f_code in codes
    if event == "call":
        return frame.f_back is not None and frame.f_back.f_code in codes
    return False


def _interrupt_at(n: int, codes, action):
    """Run ``action()`` with a KeyboardInterrupt raised at its ``n``-th point in
    ``codes``: ``(point, None)`` when interrupted, ``(None, result)`` when it
    never got that far."""
    count = [0]
    hit = []

    def hook(frame, event, arg):
        if hit or not _inside(codes, event, frame):
            return
        if count[0] == n:
            hit.append(_name(event, frame, arg))
            raise KeyboardInterrupt(hit[0])
        count[0] += 1

    # No collection meanwhile: a weakref callback it runs would count as a point, and
    # the KeyboardInterrupt raised there would be swallowed as unraisable.
    collecting = gc.isenabled()
    gc.disable()
    sys.setprofile(hook)
    try:
        result = action()
    except KeyboardInterrupt:
        return hit[0], None
    finally:
        sys.setprofile(None)
        if collecting:
            gc.enable()
    return None, result


def _every_point(codes, make):
    """``(point, result, state)`` for a fresh ``make() -> (action, state)``
    interrupted at each point in turn, until one run is not interrupted."""
    n = 0
    runs = []
    while True:
        action, state = make()
        point, result = _interrupt_at(n, codes, action)
        runs.append((point, result, state))
        if point is None:
            return runs
        n += 1


# -- the load balancer ---------------------------------------------------------------
def _busy_balancer():
    """Three interpreters, loads [1, 2, 0], the next in turn (0) busy: a choice
    that goes past the usual case."""
    lb = LoadBalancer(3)
    for _ in range(3):
        lb.acquire()
    lb.acquire()
    lb.release(2)
    return lb


def _loads(lb):
    return [lb.in_flight(i) for i in range(3)]


_TAKES = {
    "acquire": lambda lb: lb.acquire(),
    "acquire with usable": lambda lb: lb.acquire(usable=lambda i: i != 2),
    "acquire_room": lambda lb: lb.acquire_room(lambda i: 2, lambda i: True),
    "acquire_idle": lambda lb: lb.acquire_idle(lambda i: True),
}


@pytest.mark.parametrize("how", list(_TAKES))
def test_a_ctrl_c_in_a_balancer_choice_keeps_no_count(how):
    take = _TAKES[how]
    codes = {LoadBalancer.acquire.__code__, LoadBalancer.acquire_room.__code__}

    def make():
        lb = _busy_balancer()
        return (lambda: take(lb)), (lb, _loads(lb))

    runs = _every_point(codes, make)
    assert len(runs) > 1, f"{how} passed no point"
    for point, index, (lb, before) in runs:
        after = _loads(lb)
        if point is not None:
            assert after == before, f"{how} interrupted at {point} kept a count: {before} -> {after}"
        else:
            before[index] += 1
            assert after == before


def test_a_ctrl_c_in_a_release_gives_back_nothing():
    codes = {LoadBalancer.release.__code__}
    released = []

    def make():
        lb = _busy_balancer()
        lb.on_release = lambda: released.append(1)
        return (lambda: lb.release(1, notify=False)), (lb, _loads(lb))

    runs = _every_point(codes, make)
    assert len(runs) > 1
    for point, _, (lb, before) in runs:
        after = _loads(lb)
        if point is not None:
            assert after == before, f"release interrupted at {point} gave back: {before} -> {after}"
            lb.release(1, notify=False)  # what the caller does on an interrupt: given back once
        assert _loads(lb) == [2, 0, 0]
    assert not released


# -- a batch's top-up ----------------------------------------------------------------
class _Batcher(BatchedObj):
    """Just what top_up reads of a BatchedObj (no manager)."""

    def __init__(self, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size


def _request(batcher, key, rows=1):
    request = Request(Op.CALL_REPLICATED, (0, None, (), {}, 0),
                      future=concurrent.futures.Future())
    request.batch = (batcher, key, rows)
    return request


def _line(batcher):
    """A batch's first request and a queue of requests that can join it or not
    (another key, too many rows, cancelled)."""
    first = _request(batcher, "k")
    first.future.set_running_or_notify_cancel()
    cancelled = _request(batcher, "k")
    cancelled.future.cancel()
    pending = collections.deque([_request(batcher, "k"), _request(batcher, "other"), cancelled,
                                 _request(batcher, "k", rows=9), _request(batcher, "k"),
                                 _request(batcher, "k")])
    return first, pending


def _future(request):
    future = request.future
    return future.inner if isinstance(future, _Started) else future


def test_a_ctrl_c_in_a_top_up_leaves_each_request_once_in_the_batch_or_the_queue():
    batcher = _Batcher(max_batch_size=3)
    # (set_running_or_notify_cancel's own: a Ctrl-C as it lets its lock go, the future started)
    codes = {BatchedObj.top_up.__code__, concurrent.futures.Future.set_running_or_notify_cancel.__code__}

    def make():
        first, pending = _line(batcher)
        group = [first]
        everyone = [first] + list(pending)
        return (lambda: batcher.top_up(group, pending)), (group, pending, everyone)

    runs = _every_point(codes, make)
    assert len(runs) > 5, f"top_up passed only {len(runs) - 1} points"
    for point, _, (group, pending, everyone) in runs:
        where = collections.Counter(id(_future(r)) for r in list(group) + list(pending))
        for request in everyone:
            future = request.future
            if future.cancelled():
                assert where[id(future)] <= 1, point
                continue
            assert where[id(future)] == 1, (
                f"interrupted at {point}: a request is {where[id(future)]} times in the batch "
                f"and the queue")
            if future.running() and all(_future(r) is not future for r in group):
                queued = next(r for r in pending if _future(r) is future)
                assert isinstance(queued.future, _Started), (
                    f"interrupted at {point}: a started request was queued to be started again")
        if point is None:
            assert len(group) == 3 and sum(r.batch[2] for r in group) == 3


# -- the bell watch of the posted calls ------------------------------------------------
class _BellEnd:
    """A HostEnd as BellWatch sees it: replies in the slots of ``answered``; counts
    the watches armed."""

    bell_closed = False

    def __init__(self, answered=()):
        self.answered = set(answered)
        self.armed = 0

    def watch_bell(self, completions, replied, callback, drain=True):
        self.armed += 1

    def ready(self, slot):
        return slot in self.answered

    def drain_bell(self):
        pass


class _Posted:
    """A posted call as BellWatch sees it; ``finished`` counts its finishes."""

    def __init__(self, slot, completions):
        self.slot, self.completions, self.handed, self.finished = slot, completions, False, 0

    def finish(self, event):
        self.finished += 1


_BELL_CODES = {channel.BellWatch.watch.__code__, channel.BellWatch._arm.__code__,
               channel.BellWatch.on_bell.__code__, channel._hand_over.__code__}


def _bell_watch(answered):
    completions = object()
    watch = channel.BellWatch(_BellEnd(answered), lambda entry: entry.slot)
    for slot in range(3):
        watch.posted[slot] = _Posted(slot, completions)
    return watch, completions


def test_a_ctrl_c_in_a_bell_watch_leaves_it_armed_or_not_marked():
    def make():
        watch, _ = _bell_watch(())
        return watch.watch, watch

    runs = _every_point(_BELL_CODES, make)
    assert len(runs) > 1
    for point, _, watch in runs:
        # Marked watching only with a watch armed: else no reply would be handed over.
        assert watch.end.armed or watch.watching is None, point
        watch.watch()  # the next post's
        assert watch.end.armed and watch.watching is not None, point


def test_a_ctrl_c_in_a_bell_hand_over_still_finishes_the_others_and_watches_again():
    def make():
        watch, completions = _bell_watch((0, 1))
        watch.watch()
        return (lambda: watch.on_bell(completions, "ready")), (watch, completions)

    runs = _every_point(_BELL_CODES, make)
    assert len(runs) > 3
    for point, _, (watch, completions) in runs:
        if watch.watching is None:
            watch.watch()
        assert watch.watching is completions, point  # call 2 is still watched
        if point is not None:
            watch.on_bell(completions, "ready")  # the bell rings again (or the watch's left-over ring)
        entries = list(watch.posted.values())
        # Each answered call finished once, but one whose own hand-over raised as
        # it began; the unanswered one waits, watched.
        unfinished = [e.slot for e in entries[:2] if e.finished != 1]
        own = point is not None and point.split()[0] in ("_hand_over", "finish")
        assert len(unfinished) == (1 if own else 0), (point, unfinished)
        assert all(e.finished <= 1 for e in entries), point
        assert not entries[2].handed and not entries[2].finished, point


# -- a first load's call ---------------------------------------------------------------
class _LoadingWorker:
    """A Worker as a first load's _PostedCall sees it: its lock held by the load."""

    materialized = frozenset()
    let_go_after = Worker.let_go_after

    def __init__(self):
        self.lock = threading.Lock()
        self.lock.acquire()
        self._tally = threading.Lock()


@pytest.mark.parametrize("sent", [True, False, None], ids=["sent", "not sent", "unmarked"])
def test_a_first_load_whose_call_raises_ends_the_call_once(sent):
    """The load succeeded; sending the call raised.  Sent anyway: the exception goes
    on and the call ends through its own finish only.  Not sent: the call ends
    with the error, once, and the interpreter's lock is free."""
    worker = _LoadingWorker()
    ended = []
    load = _PostedCall(worker, lambda value, error: ended.append(error), "obj", None)
    error = KeyboardInterrupt("as the call was sent")
    if sent is not None:
        error.multipy_sent = sent

    def send_the_call():
        if sent is False:
            worker.lock.release()  # what _send_posted does before it marks one not sent
        raise error

    load.then = send_the_call
    if sent:
        with pytest.raises(KeyboardInterrupt):
            load._end(None, None)
        assert ended == [] and worker.lock.locked()  # the sent call holds it until its reply
    else:
        load._end(None, None)
        assert ended == [error] and not worker.lock.locked()


# -- Worker.post, through a manager ----------------------------------------------------
_WORKER = {Worker.post.__code__, Worker._send_posted.__code__, Worker._now_free.__code__}
_DISPATCH = dispatch.__file__


def _in_post(event, frame) -> bool:
    """A point in Worker.post's own code (the backend's _post, which sends, not
    included), or in the dispatcher's pump that it runs once the call is sent."""
    if event not in ("c_return", "call"):
        return False
    if event == "call" and frame.f_code is Worker.post.__code__:
        return True  # as post is entered: its caller gives the lock back (Worker.let_go_after)
    here = frame if event == "c_return" else frame.f_back
    if here is None:
        return False
    if here.f_code in _WORKER:
        return True
    if here.f_code.co_filename != _DISPATCH:
        return False
    outer = here.f_back
    while outer is not None:  # the pump of on_free, under a post
        if outer.f_code is Worker._send_posted.__code__:
            return True
        outer = outer.f_back
    return False


@pytest.fixture(scope="module")
def model(manager):
    return movable_rows(manager)


_TRIES = 10  # runs to reach one point of a post whose path varies by a point
_RECORDINGS = 5  # posts recorded to find the usual (shortest) path


@pytest.mark.parametrize("timeout", [None, 60.0])
def test_a_ctrl_c_inside_a_post_ends_the_call_once(manager, model, timeout, monkeypatch):
    # The interrupt reaches the caller.  Before the send, the call fails with it
    # (its future holds it); after it, the call ends as usual: either way once, with
    # the interpreter's lock, the balancer's count and the count of calls in flight
    # given back (once: twice would show in the counts).
    calls = []
    monkeypatch.setattr(manager, "_call_timeout", timeout)  # a deadline timer per call

    def action():
        future = model.submit(torch.ones(1))
        calls.append(future)
        return future

    # The path recorded is the shortest of a few posts: a post that took a longer
    # branch once (a reply read before its send returned) would name a point that
    # the usual path never reaches.
    paths = []
    for _ in range(_RECORDINGS):
        path = []

        def record(frame, event, arg, path=path):
            if _in_post(event, frame):
                path.append(event)

        sys.setprofile(record)
        try:
            action()
        finally:
            sys.setprofile(None)
        calls.pop().result(timeout=60)
        paths.append(path)
    seen = min(paths, key=len)
    assert seen, "the call passed no point of Worker.post"
    counts = balancer_counts(manager)
    reported = []
    hook, sys.unraisablehook = sys.unraisablehook, reported.append  # the completion thread's
    try:
        interrupted = 0
        for n in range(len(seen)):
            # A post's path can be a point shorter than the one recorded (an early
            # reply takes another branch): a run that never reaches point n ends
            # as a plain call, and the next run tries again.
            for _ in range(_TRIES):
                hit = []

                def interrupt(frame, event, arg, n=n, count=[0]):  # noqa: B006 (one count per run)
                    if hit or not _in_post(event, frame):
                        return
                    if count[0] == n:
                        hit.append(_name(event, frame, arg) if event == "c_return"
                                   else frame.f_code.co_name)
                        raise KeyboardInterrupt(hit[0])
                    count[0] += 1

                # No collection meanwhile (as in _interrupt_at): a gc callback (one
                # hypothesis registers) would count as a point and swallow the interrupt.
                collecting = gc.isenabled()
                gc.disable()
                sys.setprofile(interrupt)
                try:
                    action()
                except KeyboardInterrupt:
                    interrupted += 1
                finally:
                    sys.setprofile(None)
                    if collecting:
                        gc.enable()
                point = hit[0] if hit else None
                assert not calls or point is None, f"the interrupt at {point} never reached the caller"
                for future in calls:  # not interrupted: its answer
                    assert torch.equal(future.result(timeout=60), torch.full((1,), 3.0))
                calls.clear()
                assert_nothing_stranded(manager, point, counts)
                assert [model(torch.ones(1)) for _ in range(3)] == [torch.full((1,), 3.0)] * 3
                assert torch.equal(model.submit(torch.ones(1)).result(timeout=60), torch.full((1,), 3.0))
                if hit:
                    break
        assert interrupted == len(seen), f"{interrupted} of {len(seen)} points were interrupted"
    finally:
        sys.unraisablehook = hook
    assert not reported, [r.exc_value for r in reported]


# -- a blocking call -----------------------------------------------------------------
_BLOCKING = {InterpreterManager._call_replicated.__code__}


@pytest.mark.parametrize("declined", [False, True], ids=["given back", "give_back declined"])
@pytest.mark.parametrize("down", [False, True], ids=["common", "first choice down"])
def test_a_ctrl_c_anywhere_in_a_blocking_call_keeps_no_count(manager, model, down, declined,
                                                             monkeypatch):
    # The manager's blocking call takes a count in the balancer (the extension's
    # take_turn, or LoadBalancer.acquire), skips an interpreter that is down, and
    # gives the count back.  Interrupted at any point, it leaves every count as it
    # was, and queued posted calls are still sent.
    x = torch.ones(1)

    def call():
        return manager._call_replicated(model, None, (x,), {}, None)

    counts = balancer_counts(manager)
    if declined:  # the extension's give_back declines (its lock busy): release gives it back
        if manager_module.give_back is None:
            pytest.skip("no extension: no give_back")
        monkeypatch.setattr(manager_module, "give_back", operator.is_)  # a C call, False
    if down:  # interpreter 0 looks down (restarting): each call moves on to another one
        monkeypatch.setattr(manager._workers[0], "dead_reason", "down for this test")

    def make():
        manager._balancer._start = 0  # interpreter 0 first in turn
        return call, None

    runs = _every_point(_BLOCKING, make)
    assert len(runs) > 2, f"the blocking call passed only {len(runs) - 1} points"
    for point, result, _ in runs:
        if point is None:
            assert torch.equal(result, torch.full((1,), 3.0))
        assert_nothing_stranded(manager, point, counts)
    assert torch.equal(model.submit(x).result(timeout=60), torch.full((1,), 3.0))


# -- the releases a request carries ------------------------------------------------------
def test_a_ctrl_c_in_drain_takes_nothing():
    items = [(0, i) for i in range(5)]

    def make():
        queue = collections.deque(items)
        return (lambda: base.drain(queue)), queue

    runs = _every_point({base.drain.__code__}, make)
    assert len(runs) > 1
    for point, taken, queue in runs:
        if point is None:
            assert list(taken) == items and not queue
        else:
            assert list(queue) == items, f"interrupted at {point}, drain took {items[len(queue):]}"


_REQUEST = {Worker.request.__code__, Worker._request_in_flight.__code__, Worker._checked.__code__,
            base.drain.__code__}


def test_a_ctrl_c_in_a_blocking_request_loses_no_release(manager, model, monkeypatch):
    # A request carries the releases queued on its worker (objects the host dropped):
    # interrupted anywhere, each release is sent with it or still queued, never lost.
    worker = manager._workers[0]
    model(torch.ones(1))  # loaded (no load request in the way)
    sent = []
    for name in ("_send_call", "_roundtrip"):
        original = getattr(worker, name)

        def sending(op, args, drop, *rest, original=original):
            sent.extend(drop)
            return original(op, args, drop, *rest)

        monkeypatch.setattr(worker, name, sending)
    releases = [(int(Drop.REPLICATED), -i) for i in range(1, 4)]  # ids nobody has: harmless

    call = lambda: worker.request(Op.CALL_REPLICATED, (model._id, None, (torch.ones(1),), {}, 0),  # noqa: E731
                                  materializes=model._id, recipe=model._recipe)
    n = 0
    while True:
        sent.clear()
        worker.drops.clear()
        worker.drops.extend(releases)
        point, result = _interrupt_at(n, _REQUEST, call)
        kept = list(worker.drops) + sent
        assert all(r in kept for r in releases), (
            f"interrupted at {point}: releases lost: {[r for r in releases if r not in kept]}")
        if point is None:
            assert torch.equal(result, torch.full((1,), 3.0))
            break
        n += 1
    assert n > 3, f"the request passed only {n} points"
    worker.drops.clear()
    assert torch.equal(model(torch.ones(1)), torch.full((1,), 3.0))


def test_a_ctrl_c_as_a_blocking_call_is_sent_reports_each_freed_block_once(manager, backend, model):
    # A request reports the result blocks whose host tensors died (the interpreter
    # frees them): interrupted as it is sent, each is reported by the request that
    # went out, or kept for the next one if none did; never both (a block reported
    # twice would be freed again after the interpreter reused it for a new result).
    from multipy.backends.process import ProcessWorker

    if backend != "process":
        pytest.skip("the blocking call sent in C is the process backend's")
    worker = manager._workers[0]
    if worker._caller is None:
        pytest.skip("the blocking call is sent in C on the call channel only")
    blocks = [1 << 40, (1 << 40) + 64]  # offsets no arena has: the interpreter ignores them
    call = lambda: worker.request(  # noqa: E731
        Op.CALL_REPLICATED, (model._id, None, (torch.ones(1),), {}, 0),
        materializes=model._id, recipe=model._recipe)
    call()  # loaded there: the request below is the common call
    n = 0
    points = []
    try:
        while True:
            worker._freed.clear()
            worker._freed.extend(blocks)
            before = worker._next_call
            point, result = _interrupt_at(n, {ProcessWorker._send_call.__code__}, call)
            kept = [b for b in blocks if b in worker._freed]
            if point is None:
                assert torch.equal(result, torch.full((1,), 3.0)) and not kept
                break
            sent = worker._next_call != before
            points.append((point, sent))
            assert kept == ([] if sent else blocks), (
                f"interrupted at {point} ({'sent' if sent else 'not sent'}): kept {kept} "
                "for the next request")
            n += 1
    finally:
        for block in blocks:  # (not blocks of its arena: never reported to it again)
            while block in worker._freed:
                worker._freed.remove(block)
    assert ("send in _send_call", True) in points, points  # the common call, sent in C
    assert torch.equal(call(), torch.full((1,), 3.0))


def test_a_ctrl_c_as_a_posted_call_is_sent_reports_each_freed_block_once(manager, backend, model):
    # The same for a posted call sent in C: a block is reported by the call that went
    # out or kept for the next one, never both; and a call that went out ends as one
    # interrupted after its send (its future gets its answer, nothing stays in flight).
    from multipy.backends.process import ProcessWorker

    if backend != "process":
        pytest.skip("the posted call sent in C is the process backend's")
    worker = manager._workers[0]
    if worker._caller is None:
        pytest.skip("the posted call is sent in C on the call channel only")
    counts = balancer_counts(manager)
    blocks = [1 << 40, (1 << 40) + 64]  # offsets no arena has: the interpreter ignores them
    manager.debug_limit_interpreters(1)  # every posted call to interpreter 0
    try:
        model(torch.ones(1))  # loaded there: the request below is the common call
        n = 0
        points = []
        while True:
            wait_for(lambda: not worker.lock.locked(), "the interpreter to be free")
            worker._freed.clear()
            worker._freed.extend(blocks)
            before = worker._next_call
            point, future = _interrupt_at(n, {ProcessWorker._post.__code__},
                                          lambda: model.submit(torch.ones(1)))
            kept = [b for b in blocks if b in worker._freed]
            if point is None:
                assert torch.equal(future.result(timeout=60), torch.full((1,), 3.0)) and not kept
                break
            sent = worker._next_call != before
            points.append((point, sent))
            assert kept == ([] if sent else blocks), (
                f"interrupted at {point} ({'sent' if sent else 'not sent'}): kept {kept} "
                "for the next request")
            if sent:
                wait_for(lambda: not worker._posted and worker.posted_in_flight == 0,
                         f"the call sent before the interrupt at {point} to end")
            n += 1
        assert ("post in _post", True) in points, points  # the common call, sent in C
        assert_nothing_stranded(manager, "the posts", counts)
    finally:
        manager.debug_limit_interpreters(len(manager))
        for block in blocks:
            while block in worker._freed:
                worker._freed.remove(block)
