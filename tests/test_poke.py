"""A poke: the host wakes an interpreter for a call it is about to post.

``Channel.poke`` bumps the request word without posting; a consumer asleep in
``wait_request`` (with a spin) leaves its sleep and spins afresh, so that the post
finds it awake.  ``ReplicatedObj.expect_call`` pokes the interpreter that the next
posted call will most likely go to.  A poke never loses a post, never raises into
its caller, and is harmless on an interpreter that is down, restarting or closed.
"""

from __future__ import annotations

import mmap
import os
import random
import signal
import struct
import threading

import pytest
import torch

import multipy
from multipy.transport import channel as chan
from multipy.transport.channel import PyChannel, Wait

from _faults import replicated_run
from _wait import gone, wait_for

try:
    from multipy import _native
except ImportError:
    _native = None

IMPLS = ["native", "python"]
RING, SLOTS, SLOT_BYTES = 1 << 12, 4, 256


def _channel(name: str):
    if name == "python":
        cls = PyChannel
    elif _native is None:
        pytest.skip("multipy._native is not built here (no C compiler at install time)")
    else:
        cls = _native.Channel
    memory = mmap.mmap(-1, chan.size(RING, SLOTS, SLOT_BYTES))
    chan.prepare(memory, ring_bytes=RING, slots=SLOTS, slot_bytes=SLOT_BYTES)
    return cls(memory), memory


def _consumer_asleep(memory) -> bool:
    return struct.unpack_from("<I", memory, chan._REQ_SLEEPING)[0] == 1


def _poked(memory) -> int:
    """The consumer's count of its sleeps that a poke ended."""
    return struct.unpack_from("<I", memory, chan._POKED)[0]


def _wait_in_thread(ch, spin: float):
    result = []
    t = threading.Thread(target=lambda: result.append(ch.wait_request(-1.0, spin, -1)), daemon=True)
    t.start()
    return t, result


# -- the channel --------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_a_poke_with_nobody_asleep_wakes_nobody_and_a_closed_channel_ignores_it(impl):
    ch, memory = _channel(impl)
    assert ch.poke() is False
    ch.post(b"after a poke", 1)
    assert ch.wait_request(0.0, 0.0, -1) == Wait.READY
    assert ch.take() == (1, b"after a poke")
    ch.close()
    assert ch.poke() is False
    ch.detach()
    assert ch.poke() is False  # let go of: still no error


def test_a_poked_consumer_spins_for_the_request_instead_of_sleeping_until_the_post():
    ch, memory = _channel("native")
    # A spin long enough that the post below lands inside the window the poke starts.
    t, result = _wait_in_thread(ch, 0.5)
    wait_for(lambda: _consumer_asleep(memory), "the consumer to sleep after its spin")
    assert ch.poke() is True
    # Its sleep ended by the poke (counted as it turns to spin again): without the
    # fresh spin the poke would only make it look once and sleep on, uncounted.
    wait_for(lambda: _poked(memory) == 1, "the poked consumer to spin")
    ch.post(b"expected", 2)
    t.join(60)
    assert result and result[0] in (Wait.READY, Wait.SLEPT)  # (READY unless descheduled)
    assert ch.take() == (2, b"expected")
    assert _poked(memory) == 1


def test_the_twin_s_consumer_poked_sleeps_on_until_the_post():
    # The pure-Python twin never spins: a poke makes it look and sleep again.
    ch, memory = _channel("python")
    t, result = _wait_in_thread(ch, 0.5)
    wait_for(lambda: _consumer_asleep(memory), "the consumer to sleep")
    assert ch.poke() is True
    wait_for(lambda: _consumer_asleep(memory), "the consumer to sleep again")
    assert t.is_alive() and result == [] and _poked(memory) == 0
    ch.post(b"x", 3)
    t.join(60)
    assert result == [Wait.SLEPT]
    assert ch.take() == (3, b"x")


def test_after_a_poke_paid_off_the_next_wait_spins_shorter():
    # The interpreter's wait after a request that a poke's spin found: the host pokes
    # before each post, so a full spin after the reply only burns the core.
    ch, memory = _channel("native")
    for attempt in range(50):  # until a poke's spin finds its request (READY)
        t, result = _wait_in_thread(ch, 0.2)
        wait_for(lambda: _consumer_asleep(memory), "the consumer to sleep")
        ch.poke()
        wait_for(lambda: _poked(memory) == attempt + 1, "the poked consumer to spin")
        ch.post(b"p", attempt)
        t.join(60)
        assert ch.take() == (attempt, b"p")
        if result == [Wait.READY]:
            break
    else:
        pytest.fail("no poke was followed by its post within 200 ms in 50 tries")
    # A wait asked to spin 8 s spins 1 s (an eighth) before it sleeps: asleep well
    # before the full spin could have ended.
    t, result = _wait_in_thread(ch, 8.0)
    wait_for(lambda: _consumer_asleep(memory), "the short spin to end", seconds=6.0)
    ch.post(b"q", 99)
    t.join(60)
    assert result == [Wait.SLEPT]
    assert ch.take() == (99, b"q")


@pytest.mark.parametrize("impl", IMPLS)
def test_pokes_racing_posts_never_lose_a_post(impl):
    ch, memory = _channel(impl)
    n = 2000 if impl == "native" else 300
    got: list[int] = []
    bad: list = []

    def consume() -> None:
        rng = random.Random(1)
        while len(got) < n:
            # Short spins, so that the consumer often sleeps between posts.
            rc = ch.wait_request(30.0, rng.choice((0.0, 2e-6, 20e-6)), -1)
            if rc not in (Wait.READY, Wait.SLEPT):
                bad.append(("wait", rc, len(got)))
                return
            item = ch.take()
            if item is None:  # woken with nothing to take: a poke leaked out of the wait
                bad.append(("empty", rc, len(got)))
                return
            got.append(item[0])

    stop = threading.Event()

    def poke() -> None:
        while not stop.is_set():
            ch.poke()

    consumer = threading.Thread(target=consume)
    poker = threading.Thread(target=poke)
    consumer.start()
    poker.start()
    rng = random.Random(2)
    try:
        for i in range(n):
            if rng.random() < 0.5:
                ch.poke()
            for _ in range(rng.choice((0, 0, 50, 500))):  # let the consumer fall asleep, sometimes
                pass
            while not ch.post(b"m", i):  # the ring is full: wait for the consumer
                if not consumer.is_alive():
                    break
        consumer.join(120)
    finally:
        stop.set()
        poker.join()
    assert not consumer.is_alive(), f"the consumer hung after {len(got)} of {n} posts"
    assert bad == []
    assert got == list(range(n))


# -- the library: ReplicatedObj.expect_call -------------------------------------------

INTERPRETERS = 2


@pytest.fixture(scope="module")
def run(manager):
    return replicated_run(manager)


def test_expect_call_names_the_interpreter_the_next_posted_call_runs_on(manager, run):
    x = torch.arange(4.0)
    run.submit("echo", x).result()  # loaded everywhere it ran; idle now
    for _ in range(6):
        index = run.expect_call()
        assert index is not None
        before = [w.calls for w in manager._workers]
        assert torch.equal(run.submit("echo", x).result(), x)
        after = [w.calls for w in manager._workers]
        assert [a - b for a, b in zip(after, before)] == [int(i == index) for i in range(2)]


def test_expect_call_on_an_interpreter_killed_restarting_or_closed_never_raises(backend):
    if backend != "process":
        pytest.skip("only a process interpreter can be killed")
    with multipy.InterpreterManager(1, backend="process") as m:
        obj = replicated_run(m)
        assert obj("echo", 1) == 1
        pid = m._workers[0].pid
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: gone(pid), "the interpreter to die")
        assert obj.expect_call() in (0, None)  # a dead consumer: nothing woken, no error
        try:
            obj("echo", 2)  # may be the call that finds it dead
        except multipy.InterpreterCrashedError:
            pass
        assert obj.submit("echo", 3).result(60) == 3  # the replacement
        assert m._workers[0].pid != pid
        assert obj.expect_call() == 0
        assert obj.submit("echo", 4).result(60) == 4
    assert obj.expect_call() is None  # closed manager: nothing to wake, no error


def test_expect_call_wakes_the_sleeping_interpreter_the_next_call_goes_to(manager, run):
    if manager.backend != "process" or not chan.NATIVE:
        pytest.skip("only a process interpreter on the call channel sleeps on its request word")
    run.submit("echo", 1).result()
    index = manager._balancer.likely()
    memory = manager._workers[index]._end.memory
    wait_for(lambda: _consumer_asleep(memory), "the interpreter to sleep after its spin")
    before = _poked(memory)
    assert run.expect_call() == index
    # Woken without a call: its sleep ended by the poke, then it spins for the call.
    wait_for(lambda: _poked(memory) == before + 1, "the poke to end the interpreter's sleep")
    assert run.submit("echo", 2).result() == 2
