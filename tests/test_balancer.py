"""The load balancer's choice, and the extension's one-step version of its common
case (``balancer.take_turn`` and ``give_back``, what a blocking call uses): both
hand out a free interpreter first, in turn, else the least loaded, and count
each interpreter's users until they give it back."""

from __future__ import annotations

import threading

import pytest

from multipy.runtime import balancer as balancing
from multipy.runtime.balancer import LoadBalancer


@pytest.fixture(params=["python", "native"])
def take(request):
    """``(acquire, release)`` of a balancer: its methods, or the extension's steps."""
    if request.param == "python":
        return (lambda b: b.acquire()), (lambda b, i: b.release(i))
    if balancing.take_turn is None:
        pytest.skip("multipy._native is not built here (no C compiler at install time)")

    def acquire(b):
        index = balancing.take_turn(b)
        return b.acquire() if index is None else index

    def release(b, index):
        if not balancing.give_back(b, index):
            b.release(index)

    return acquire, release


def test_free_interpreters_are_handed_out_in_turn_then_the_least_loaded(take):
    acquire, release = take
    b = LoadBalancer(3)
    assert [acquire(b) for _ in range(3)] == [0, 1, 2]
    assert acquire(b) == 0  # all busy: the least loaded, in turn
    release(b, 1)
    assert acquire(b) == 1  # free first
    for i in (0, 0, 1, 2):
        release(b, i)
    assert [b.in_flight(i) for i in range(3)] == [0, 0, 0]
    assert [acquire(b) for _ in range(4)] == [2, 0, 1, 2]


def test_the_one_step_version_declines_while_the_lock_is_held():
    if balancing.take_turn is None:
        pytest.skip("multipy._native is not built here (no C compiler at install time)")
    b = LoadBalancer(2)
    with b._lock:  # a Python method in the middle of its choice
        assert balancing.take_turn(b) is None
        assert balancing.give_back(b, 0) is False
    assert b._load == [0, 0] and b._start == 0  # nothing changed
    index = balancing.take_turn(b)
    assert index == 0 and b._load == [1, 0] and b._start == 1
    assert balancing.give_back(b, index) is True and b._load == [0, 0]


def test_counts_stay_exact_with_many_threads(take):
    acquire, release = take
    b = LoadBalancer(4)

    def work():
        for _ in range(2000):
            release(b, acquire(b))
            b.release(b.acquire())  # the Python methods, mixed in

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b._load == [0, 0, 0, 0]


def test_the_one_step_version_chooses_as_acquire_does_whatever_the_loads():
    # With many callers per interpreter the next in turn is seldom free: take_turn
    # then scans for the first free one, else the least loaded, as acquire() does.
    if balancing.take_turn is None:
        pytest.skip("multipy._native is not built here (no C compiler at install time)")
    import random

    rng = random.Random(7)
    for _ in range(2000):
        size = rng.randint(1, 6)
        loads = [rng.choice((0, 1, 1, 2, 3, 5)) for _ in range(size)]
        limit = rng.randint(1, size)
        start = rng.randrange(limit)
        a, b = LoadBalancer(size), LoadBalancer(size)
        for lb in (a, b):
            lb._load, lb._start = list(loads), start
            lb.set_limit(limit)
        assert balancing.take_turn(a) == b.acquire(), (loads, limit, start)
        assert (a._load, a._start) == (b._load, b._start)


def test_of_several_idle_interpreters_the_one_that_went_idle_last_is_taken_first(take):
    # One request at a time: the interpreter that answered the last one is still
    # spinning, the next in turn has slept since the request before; so the same
    # one is taken again, whichever way the count was given back.
    acquire, release = take
    b = LoadBalancer(3)
    for _ in range(4):
        index = b.acquire_idle()
        assert index == 0
        release(b, index)
    assert b.acquire_room(lambda i: 2) == 0
    # Busy, excluded or not usable: the first idle one in turn, as before.
    assert b.acquire_idle() == 1
    release(b, 0)
    assert b.acquire_idle(exclude={0}) == 2
    assert b.acquire_idle(usable=lambda i: i != 0) is None  # 1 and 2 busy, 0 not usable
    release(b, 2)
    assert b.acquire_idle() == 2  # the last to go idle, though 0 is idle too
    release(b, 1)
    b.release(2)
    b.set_limit(1)  # 1 went idle last but is past the limit
    assert b.acquire_idle() == 0
    assert b._load == [1, 0, 0]


def test_giving_back_in_one_step_marks_the_warm_interpreter_as_release_does():
    if balancing.give_back is None:
        pytest.skip("multipy._native is not built here (no C compiler at install time)")
    a, b = LoadBalancer(2), LoadBalancer(2)
    for lb in (a, b):
        lb._load = [2, 1]
    assert balancing.give_back(a, 0) and a._warm is None  # still busy: not idle
    b.release(0, notify=False)
    assert balancing.give_back(a, 1) and a._warm == 1
    b.release(1, notify=False)
    assert (a._load, a._warm) == (b._load, b._warm) == ([1, 0], 1)


def test_the_likely_choice_is_what_an_idle_request_takes_next_without_counting_it(take):
    # LoadBalancer.likely: the hint of ReplicatedObj.expect_call, which wakes the
    # interpreter the next posted call will go to.  Whatever the loads, it names
    # what acquire_idle then takes, and changes no count.
    import random

    acquire, release = take
    rng = random.Random(5)
    b = LoadBalancer(4)
    held = []
    for _ in range(300):
        if held and rng.random() < 0.5:
            release(b, held.pop(rng.randrange(len(held))))
        elif rng.random() < 0.3:
            held.append(acquire(b))  # a blocking call's turn: moves the round robin
        if rng.random() < 0.1:
            b.set_limit(rng.randint(1, 4))
        loads = list(b._load)
        hint = b.likely()
        assert b._load == loads
        taken = b.acquire_idle()
        assert taken == hint
        if taken is not None:
            held.append(taken)
