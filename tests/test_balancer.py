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
