"""The shared-memory call channel (transport.channel), on its own.

Every test runs against the C extension and its pure-Python twin; a second
process (a small echo server over the same memfd) exercises the futex waits
across processes and the peer's death while a caller spins or sleeps.
"""

from __future__ import annotations

import mmap
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _wait import wait_for
from multipy.transport import channel as chan
from multipy.transport import shm
from multipy.transport.channel import PyChannel, Wait

try:
    from multipy import _native
except ImportError:
    _native = None

IMPLS = ["native", "python"]
READY = (Wait.READY, Wait.SLEPT)
RING, SLOTS, SLOT_BYTES = 1 << 12, 4, 256


def _impl_class(name: str):
    if name == "python":
        return PyChannel
    if _native is None:
        pytest.skip("multipy._native is not built here (no C compiler at install time)")
    return _native.Channel


@pytest.fixture(params=IMPLS)
def impl(request):
    return _impl_class(request.param)


def _memory(ring=RING, slots=SLOTS, slot_bytes=SLOT_BYTES, *, fd=None):
    n = chan.size(ring, slots, slot_bytes)
    if fd is None:
        memory = mmap.mmap(-1, n)
    else:
        os.ftruncate(fd, n)
        memory = mmap.mmap(fd, n)
    chan.prepare(memory, ring_bytes=ring, slots=slots, slot_bytes=slot_bytes)
    return memory


def test_a_request_and_its_reply_cross_with_their_tags(impl):
    ch = impl(_memory())
    assert ch.geometry == (RING, SLOTS, SLOT_BYTES)
    slot = ch.claim()
    assert ch.take() is None
    assert ch.pending == 0
    assert ch.taken == 0
    assert ch.post(b"ping", slot) == 16 + 16  # the ring position past the record
    assert ch.pending == 16 + 16
    assert ch.wait_request(0.0, 0.0, -1) == Wait.READY  # already there: no spin, no sleep
    assert ch.take() == (slot, b"ping")
    assert ch.taken == 16 + 16  # taken: the consumer's position reached it
    assert ch.take() is None
    assert ch.pending == 0
    assert ch.take_reply(slot) is None
    assert ch.reply(slot, b"pong", 7) is True
    assert ch.wait_reply(slot, 0.0, 0.0, -1, -1) == Wait.READY
    assert ch.take_reply(slot) == (7, b"pong")
    assert ch.take_reply(slot) is None  # taken once; the slot stays claimed
    ch.release(slot)


def test_slots_are_claimed_once_until_released(impl):
    ch = impl(_memory())
    slots = [ch.claim() for _ in range(SLOTS)]
    assert sorted(slots) == list(range(SLOTS))
    assert ch.claim() is None
    ch.release(slots[1])
    assert ch.claim() == slots[1]
    with pytest.raises(IndexError):
        ch.release(SLOTS)


def test_a_full_ring_refuses_and_recovers_after_takes(impl):
    ch = impl(_memory())
    sent = 0
    while ch.post(b"x" * 100, sent):
        sent += 1
    assert sent == RING // (16 + 112)
    assert ch.take() == (0, b"x" * 100)
    assert ch.post(b"y" * 100, 99) > 0  # wraps round to the start


def test_messages_too_large_for_the_ring_or_a_slot_are_refused(impl):
    ch = impl(_memory())
    with pytest.raises(ValueError, match="spill it"):
        ch.post(b"x" * RING, 0)
    assert ch.reply(0, b"x" * (SLOT_BYTES + 1), 0) is False
    assert ch.take_reply(0) is None


def test_a_wait_times_out_when_nothing_comes(impl):
    ch = impl(_memory())
    slot = ch.claim()
    assert ch.wait_reply(slot, 0.01, 0.001, 1, -1) == Wait.TIMEOUT
    assert ch.wait_request(0.01, 0.001, -1) == Wait.TIMEOUT


def test_close_wakes_a_sleeping_waiter(impl):
    ch = impl(_memory())
    slot = ch.claim()
    result = []
    waiter = threading.Thread(target=lambda: result.append(ch.wait_reply(slot, -1.0, 0.0, 0, -1)))
    waiter.start()
    ch.close()
    waiter.join()
    assert result == [Wait.CLOSED]
    assert ch.closed


def test_a_readable_liveness_fd_means_the_peer_is_gone(impl):
    ch = impl(_memory())
    slot = ch.claim()
    r, w = os.pipe()
    os.close(w)  # end-of-file: what a dead interpreter's pipe looks like
    try:
        assert ch.wait_reply(slot, -1.0, 0.0, 0, r) == Wait.DEAD
        assert ch.wait_request(-1.0, 0.0, r) == Wait.DEAD
        ch.reply(slot, b"late", 0)  # a reply that is there wins over the fd
        assert ch.wait_reply(slot, -1.0, 0.0, 0, r) == Wait.READY
    finally:
        os.close(r)


def test_a_reply_wakes_a_caller_asleep_in_its_futex(impl):
    ch = impl(_memory())
    slot = ch.claim()

    def reply_when_asleep():
        while not ch.asleep(slot):
            pass
        ch.reply(slot, b"late", 1)

    replier = threading.Thread(target=reply_when_asleep)
    replier.start()
    assert ch.wait_reply(slot, -1.0, 0.0, 0, -1) == Wait.SLEPT
    replier.join()
    assert ch.take_reply(slot) == (1, b"late")


def test_a_detached_channel_refuses_every_call(impl):
    ch = impl(_memory())
    ch.detach()
    ch.detach()
    with pytest.raises(ValueError, match="detached"):
        ch.post(b"x", 0)
    with pytest.raises(ValueError, match="detached"):
        ch.claim()


def test_memory_without_a_header_is_refused(impl):
    with pytest.raises(ValueError, match="not a channel"):
        impl(mmap.mmap(-1, 4096))


def test_a_signal_handler_can_interrupt_a_sleeping_wait(impl):
    ch = impl(_memory())
    slot = ch.claim()
    main = threading.get_ident()

    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted

    def interrupt_when_asleep():
        while not ch.asleep(slot):
            pass
        signal.pthread_kill(main, signal.SIGUSR1)

    old = signal.signal(signal.SIGUSR1, handler)
    interrupter = threading.Thread(target=interrupt_when_asleep)
    try:
        with pytest.raises(Interrupted):
            interrupter.start()
            ch.wait_reply(slot, 30.0, 0.0, 0, -1)
    finally:
        interrupter.join()
        signal.signal(signal.SIGUSR1, old)


@pytest.mark.skipif(_native is None, reason="multipy._native is not built here")
def test_the_twin_reads_what_the_extension_wrote_and_back():
    memory = _memory()
    native, twin = _native.Channel(memory), PyChannel(memory)
    for i in range(100):  # enough to wrap the ring several times
        writer, reader = (native, twin) if i % 2 else (twin, native)
        assert writer.post(bytes([i]) * (i * 7 % 300), i)
        assert reader.take() == (i, bytes([i]) * (i * 7 % 300))
    slot = twin.claim()
    native.reply(slot, b"r", 3)
    assert twin.take_reply(slot) == (3, b"r")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.lists(st.integers(0, 700), max_size=30), min_size=1, max_size=8),
       which=st.sampled_from(IMPLS))
def test_many_threads_posting_random_sizes_deliver_each_message_once_in_order(sizes, which):
    cls = _impl_class(which)
    ch = cls(_memory(ring=1 << 11))
    got: dict[int, list[bytes]] = {p: [] for p in range(len(sizes))}
    total = sum(map(len, sizes))
    done = threading.Event()

    def consume():
        n = 0
        while n < total:
            if ch.wait_request(5.0, 0.0001, -1) not in READY:
                break
            item = ch.take()
            while item is not None:
                got[item[0]].append(item[1])
                n += 1
                item = ch.take()
        done.set()

    def message_of(k: int, n: int) -> bytes:
        # Little words 0, 1, 2 ...: stale payload must never pass for a record header.
        return (k.to_bytes(4, "little") * (n // 4 + 1))[:n]

    def produce(p: int, lengths: list[int]):
        for k, n in enumerate(lengths):
            message = message_of(k, n)
            while not ch.post(message, p):
                if done.wait(0.0005):  # the ring is full: let the consumer catch up
                    return  # the consumer gave up

    consumer = threading.Thread(target=consume)
    consumer.start()
    producers = [threading.Thread(target=produce, args=(p, ls)) for p, ls in enumerate(sizes)]
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    consumer.join()
    for p, lengths in enumerate(sizes):
        assert got[p] == [message_of(k, n) for k, n in enumerate(lengths)]


# -- across processes -------------------------------------------------------------

_SERVER = textwrap.dedent("""
    import mmap, os, signal, struct, sys
    sys.path[:0] = [{src!r}]
    from multipy.transport import channel as chan
    cls = chan.PyChannel if {impl!r} == "python" else __import__("multipy._native", fromlist=["x"]).Channel
    fd = int(sys.argv[1])
    memory = mmap.mmap(fd, os.fstat(fd).st_size)
    ch = cls(memory)
    while ch.wait_request(-1.0, 0.0002, -1) in (chan.Wait.READY, chan.Wait.SLEPT):
        slot, data = ch.take()
        if data == b"die":
            os.kill(os.getpid(), signal.SIGKILL)
        if data == b"die-when-asleep":   # once the caller sleeps in its futex
            sleeping = chan.HEADER_BYTES + {ring} + slot * (chan.SLOT_HEAD + {slot_bytes}) + 4
            while struct.unpack_from("<I", memory, sleeping)[0] == 0:
                pass
            os.kill(os.getpid(), signal.SIGKILL)
        ch.reply(slot, data[::-1], len(data))
""")


class _Server:
    """An echo server in another process; its stdout pipe says whether it lives."""

    def __init__(self, impl_name: str) -> None:
        _impl_class(impl_name)
        self.fd = os.memfd_create("multipy-test-channel")
        self.memory = _memory(fd=self.fd)
        src = os.path.dirname(os.path.dirname(chan.__file__))
        code = _SERVER.format(src=os.path.dirname(src), impl=impl_name, ring=RING, slot_bytes=SLOT_BYTES)
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(self.fd)], pass_fds=(self.fd,),
                                     stdout=subprocess.PIPE)
        self.alive_fd = self.proc.stdout.fileno()
        self.channel = _impl_class(impl_name)(self.memory)

    def close(self) -> None:
        self.channel.close()
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.channel.detach()
        os.close(self.fd)


@pytest.mark.parametrize("impl_name", IMPLS)
def test_an_echo_server_in_another_process_answers_many_calls(impl_name):
    server = _Server(impl_name)
    try:
        ch = server.channel
        slot = ch.claim()
        for i in range(300):
            message = os.urandom(i % 200)
            assert ch.post(message, slot)
            assert ch.wait_reply(slot, 30.0, 0.0001 if i % 2 else 0.0, 1, server.alive_fd) in READY
            assert ch.take_reply(slot) == (len(message), message[::-1])
    finally:
        server.close()


@pytest.mark.parametrize("impl_name", IMPLS)
@pytest.mark.parametrize("how", ["die", "die-when-asleep"])
def test_a_caller_learns_at_once_that_the_server_died_then_a_new_channel_serves(impl_name, how):
    # "die": the caller still spins (its spin outlasts the test); "die-when-asleep":
    # the server waits until the caller sleeps in FUTEX_WAIT, then kills itself.
    spin = 3600.0 if how == "die" else 0.0
    server = _Server(impl_name)
    try:
        ch = server.channel
        slot = ch.claim()
        assert ch.post(how.encode(), slot)
        assert ch.wait_reply(slot, -1.0, spin, 1, server.alive_fd) == Wait.DEAD
        assert ch.take_reply(slot) is None
    finally:
        server.close()
    replacement = _Server(impl_name)  # a new generation: fresh memory, fresh process
    try:
        ch = replacement.channel
        slot = ch.claim()
        assert ch.post(b"abc", slot)
        assert ch.wait_reply(slot, 30.0, 0.0, 1, replacement.alive_fd) in READY
        assert ch.take_reply(slot) == (3, b"cba")
    finally:
        replacement.close()


# -- many sleepers on one channel ------------------------------------------------------

_SLEEPERS = 6


def _sleepers(ch, fd: int, timeout: float):
    """Threads waiting on every slot of ``ch`` (fd: the peer's liveness), and their results."""
    slots = [ch.claim() for _ in range(_SLEEPERS)]
    got = {}

    def sleep(slot: int) -> None:
        got[slot] = ch.wait_reply(slot, timeout, 0.0, 0, fd)

    threads = [threading.Thread(target=sleep, args=(slot,), daemon=True) for slot in slots]
    for t in threads:
        t.start()
    wait_for(lambda: all(ch.asleep(slot) for slot in slots), "every caller asleep")
    return threads, slots, got


@pytest.mark.parametrize("impl_name", IMPLS)
def test_a_dead_peer_wakes_every_sleeping_caller(impl_name, monkeypatch):
    # One sleeper watches the peer's liveness; the others sleep long slices (an
    # hour here, for the twin) and learn of the death from the watcher's wake-up.
    monkeypatch.setattr(chan, "_QUIET_SLICE", 3600.0)
    ch = _impl_class(impl_name)(_memory(slots=_SLEEPERS))
    r, w = os.pipe()
    try:
        threads, slots, got = _sleepers(ch, r, -1.0)
        os.close(w)  # the peer dies
        w = -1
        wait_for(lambda: not any(t.is_alive() for t in threads), "every caller back", 30)
        assert got == {slot: Wait.DEAD for slot in slots}
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)


_COUNT_SLEEPS = textwrap.dedent("""
    import json, mmap, os, sys, threading
    sys.path[:0] = sys.argv[1:]
    from multipy import _native
    from multipy.transport import channel as chan
    n = chan.size(4096, {slots}, 256)
    memory = mmap.mmap(-1, n)
    chan.prepare(memory, ring_bytes=4096, slots={slots}, slot_bytes=256)
    ch = _native.Channel(memory)
    r, w = os.pipe()
    slots = [ch.claim() for _ in range({slots})]
    def run(timeout, got):
        threads = [threading.Thread(target=lambda s=s: got.append(ch.wait_reply(s, timeout, 0.0, 0, r)))
                   for s in slots]
        for t in threads:
            t.start()
        return threads
    before = _native.counters()
    got = []
    for t in run({seconds}, got):  # nothing comes: every caller sleeps until its timeout
        t.join()
    quiet = _native.counters()
    died = []
    threads = run(-1.0, died)
    while not all(ch.asleep(s) for s in slots):
        pass
    os.close(w)
    for t in threads:
        t.join()
    after = _native.counters()
    print(json.dumps({{"timeouts": got, "died": died,
                      "sleeps": quiet["sleeps"] - before["sleeps"],
                      "wakes": after["wakes"] - quiet["wakes"]}}))
""")


def test_sleeping_callers_share_one_look_at_the_peer():
    # Every sleeper looking at the peer's liveness every 2 ms cost 64 callers of a
    # 1 ms model 28 wake-ups per call.  Counted by the extension (sleeps: FUTEX_WAIT
    # calls; wakes: FUTEX_WAKE calls), which counts only with MULTIPY_CHANNEL_COUNTS=1.
    if _native is None:
        pytest.skip("multipy._native is not built here (no C compiler at install time)")
    import json

    seconds = 0.4
    src = os.path.dirname(os.path.dirname(chan.__file__))
    out = subprocess.run(
        [sys.executable, "-c", _COUNT_SLEEPS.format(slots=_SLEEPERS, seconds=seconds), src],
        env={**os.environ, "MULTIPY_CHANNEL_COUNTS": "1"}, capture_output=True, text=True,
        timeout=120)
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout)
    assert counts["timeouts"] == [Wait.TIMEOUT] * _SLEEPERS
    assert counts["died"] == [Wait.DEAD] * _SLEEPERS
    # One watcher, whose slice doubles from 2 ms to 32 ms: 2+4+8+16 ms, then 32 ms
    # at a time (16 sleeps in 0.4 s); the others 100 ms slices (5 each).  Every
    # sleeper a watcher would make 6 x 16; a watcher looking every 2 ms, 200.
    watcher = 4 + (seconds - 0.030) / 0.032
    others = (_SLEEPERS - 1) * (seconds / 0.1 + 1)
    assert counts["sleeps"] < 1.5 * (watcher + others) < _SLEEPERS * watcher, counts
    # The watcher woke the others when the peer died (those not woken yet by their
    # own slice's end: all of them, unless the machine held the watcher back 100 ms).
    assert counts["wakes"] >= 1, counts


# -- the pipe path's spin (MULTIPY_NATIVE=0) -----------------------------------------


class _CountingPoller:
    def __init__(self, fd: int) -> None:
        import select

        self.real = select.poll()
        self.real.register(fd, select.POLLIN)
        self.polls = 0

    def poll(self, timeout):
        self.polls += 1
        return self.real.poll(timeout)


def test_a_pipe_spin_stops_once_other_threads_want_the_gil():
    # Every poll(0) of the spin releases the GIL.  While a thread runs Python code,
    # each poll hands the GIL over and waits for it back: the spin must give up at
    # once and let the caller sleep, not trade the GIL back and forth for its window.
    from multipy.transport.frames import spin_readable

    r, w = os.pipe()
    stop = threading.Event()
    started = threading.Event()

    def busy() -> None:
        started.set()
        while not stop.is_set():
            pass

    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # the busy thread asks for the GIL after 0.5 ms
    hog = threading.Thread(target=busy)
    hog.start()
    started.wait()
    poller = _CountingPoller(r)
    try:
        assert spin_readable(poller, 5.0) is False
    finally:
        stop.set()
        hog.join()
        sys.setswitchinterval(interval)
    # It gave up at the first hand-off (within about one switch interval: a few
    # thousand polls), not at the end of its 5 s window (about a million polls).
    assert poller.polls < 50_000
    os.write(w, b"x")
    assert spin_readable(_CountingPoller(r), 2.0) is True
    os.close(r)
    os.close(w)


needs_native = pytest.mark.skipif(_native is None, reason="multipy._native is not built here")


@needs_native
def test_requests_in_flight_are_counted_until_their_reply_is_taken_or_the_channel_detached():
    base = _native.in_flight()
    ch, other = _native.Channel(_memory()), _native.Channel(_memory())
    a, b = ch.claim(), ch.claim()
    ch.post(b"a", a)
    ch.post(b"b", b)
    other.post(b"c", other.claim())
    assert _native.in_flight() == (base[0] + 3, base[1] + 2)  # 3 requests, 2 interpreters
    ch.take(), ch.take()
    ch.reply(a, b"A", 0)
    assert _native.in_flight() == (base[0] + 3, base[1] + 2)  # replied, not taken yet
    assert ch.take_reply(a) == (0, b"A")
    assert _native.in_flight() == (base[0] + 2, base[1] + 2)
    ch.reply(b, b"B", 0)
    ch.take_reply(b)
    assert _native.in_flight() == (base[0] + 1, base[1] + 1)
    other.detach()  # its request never gets a reply: it no longer counts
    assert _native.in_flight() == base


@needs_native
@pytest.mark.parametrize("cores", [1, 64])
def test_a_caller_spins_only_on_a_core_that_no_busy_interpreter_needs(cores):
    # The channel's own request makes one interpreter busy: on 1 core the caller
    # sleeps at once, on 64 it spins (until the reply).
    ch = _native.Channel(_memory())
    slot = ch.claim()
    ch.post(b"x", slot)
    result = []
    waiter = threading.Thread(target=lambda: result.append(ch.wait_reply(slot, -1.0, 3600.0, cores, -1)))
    waiter.start()
    try:
        if cores == 1:
            wait_for(lambda: ch.asleep(slot) or not waiter.is_alive(), "the caller to sleep")
            assert _native.spinners() == 0
        else:
            wait_for(lambda: _native.spinners() or not waiter.is_alive(), "the caller to spin")
            assert not ch.asleep(slot)
    finally:
        ch.take()
        ch.reply(slot, b"y", 0)
        waiter.join(60)
    assert result and result[0] in READY
    assert ch.take_reply(slot) == (0, b"y")
    ch.detach()


# -- whether a request runs: one decision in the slot's go word ---------------------

def test_an_armed_request_is_started_or_skipped_and_the_decision_stands(impl):
    import time

    ch = impl(_memory())
    run, cancelled, late, unarmed = (ch.claim() for _ in range(4))
    ch.arm(run, -1)                                  # no deadline
    assert ch.begin(run) is True and ch.started(run)
    assert ch.cancel(run) is False                   # too late: it started
    ch.arm(cancelled, -1)
    assert ch.cancel(cancelled) is True and ch.cancel(cancelled) is True
    assert ch.begin(cancelled) is False and not ch.started(cancelled)
    assert ch.cancel(cancelled) is True              # skipped by the interpreter: still skipped
    ch.arm(late, time.monotonic_ns() - 1)            # taken past its deadline
    assert ch.begin(late) is False and ch.cancel(late) is True
    ch.arm(unarmed, time.monotonic_ns() + 10**12)
    assert ch.begin(unarmed) is True
    # A slot claimed again is unarmed: its request runs and cannot be cancelled.
    ch.arm(late, time.monotonic_ns() - 1)
    ch.release(late)
    again = ch.claim()
    while again != late:
        again = ch.claim()
    assert ch.cancel(late) is False and ch.begin(late) is True


_DECIDER = textwrap.dedent("""
    import mmap, os, sys
    sys.path[:0] = [{src!r}]
    from multipy import _native
    from multipy.transport import channel as chan
    fd = int(sys.argv[1])
    ch = _native.Channel(mmap.mmap(fd, os.fstat(fd).st_size))
    while ch.wait_request(-1.0, 0.001, -1) in (chan.Wait.READY, chan.Wait.SLEPT):
        slot, data = ch.take()
        ch.reply(slot, b"ran" if ch.begin(slot) else b"skipped", 0)
""")


@needs_native
def test_a_cancel_racing_the_interpreter_s_start_never_gets_both_or_neither():
    # The interpreter (another process) decides as it takes each request while the
    # host cancels it at about the same moment: exactly one side wins each time.
    fd = os.memfd_create("multipy-test-channel")
    memory = _memory(fd=fd)
    src = os.path.dirname(os.path.dirname(os.path.dirname(chan.__file__)))
    proc = subprocess.Popen([sys.executable, "-c", _DECIDER.format(src=src), str(fd)],
                            pass_fds=(fd,), stdout=subprocess.PIPE)
    ch = _native.Channel(memory)
    outcomes = {"ran": 0, "skipped": 0}
    try:
        slot = ch.claim()
        for i in range(2000):
            ch.arm(slot, -1)
            assert ch.post(b"x", slot)
            for _ in range(i % 64):  # cancel a little earlier or later each time
                ch.ready(slot)
            cancelled = ch.cancel(slot)
            assert ch.wait_reply(slot, 30.0, 0.001, -1, proc.stdout.fileno()) in READY
            got = ch.take_reply(slot)[1].decode()
            assert (got == "skipped") == cancelled, (i, got, cancelled)
            outcomes[got] += 1
    finally:
        ch.close()
        proc.kill()
        proc.wait()
        proc.stdout.close()
        ch.detach()
        os.close(fd)
    assert sum(outcomes.values()) == 2000


def test_the_bell_watch_reports_what_a_completions_watch_reports():
    from multipy.backends import completions

    assert chan._BELL_READY == completions.READY


def test_a_send_waits_for_a_free_slot_and_fails_once_the_interpreter_is_gone(impl):
    ch = impl(_memory())
    alive_r, alive_w = os.pipe()
    end = chan.HostEnd(ch, -1, lambda: None, alive_r, 0.0)
    try:
        held = [ch.claim() for _ in range(SLOTS)]  # every reply slot taken
        rooms, sent = [], []
        sender = threading.Thread(target=lambda: sent.append(
            end.retry(ch.claim, lambda: rooms.append(1))))
        sender.start()
        wait_for(lambda: len(rooms) >= 2, "the sender to ask for room")
        assert sent == []
        ch.release(held[2])
        sender.join(60)
        assert sent == [held[2]]
        ch.release(held[2])
        assert end.send(b"req", armed=True) == (held[2], 32)
        assert ch.take() == (held[2], b"req")
        assert ch.cancel(held[2]) is True  # armed: it may still be cancelled
        os.close(alive_w)  # the interpreter is gone: nothing will free a slot
        alive_w = -1
        with pytest.raises(BrokenPipeError):
            end.send(b"req")
    finally:
        os.close(alive_r)
        if alive_w >= 0:
            os.close(alive_w)


def test_a_peer_overwriting_the_header_s_geometry_moves_no_bound_or_address(impl):
    # The header is shared memory: a stray write of the other process to its
    # geometry words (ring_bytes, slots, slot_bytes at byte 8) must change no
    # bound or address this side uses; the geometry is read once, when attached.
    memory = _memory()
    ch = impl(memory)
    assert struct.unpack_from("<III", memory, 8) == (RING, SLOTS, SLOT_BYTES)
    struct.pack_into("<III", memory, 8, 64, 1 << 16, 128)  # a tiny ring, many small slots
    assert ch.geometry == (RING, SLOTS, SLOT_BYTES)
    with pytest.raises(IndexError):
        ch.release(SLOTS)  # still SLOTS slots
    assert ch.post(b"x" * 100, 1) > 0  # fits the real ring, not a 64-byte one
    assert ch.take() == (1, b"x" * 100)
    assert ch.reply(1, b"pong", 7) is True
    struct.pack_into("<III", memory, 8, RING, SLOTS, SLOT_BYTES)
    assert ch.take_reply(1) == (7, b"pong")  # written where slot 1 is


def _corrupt_record_length(memory, length):
    """Overwrite the length of the ring's first record (its header at the ring's start)."""
    struct.pack_into("<I", memory, chan.HEADER_BYTES + 4, length)


def test_a_request_record_whose_length_runs_past_the_ring_is_refused(impl):
    memory = _memory()
    ch = impl(memory)
    assert ch.post(b"ping", 3) > 0
    _corrupt_record_length(memory, RING)  # would read (and zero) the reply slots after it
    slot_bytes_before = bytes(memory[chan.HEADER_BYTES + RING:])
    with pytest.raises(ValueError, match="corrupt request record"):
        ch.take()
    assert bytes(memory[chan.HEADER_BYTES + RING:]) == slot_bytes_before
    _corrupt_record_length(memory, RING - chan.RECORD_HEAD)  # exactly the whole ring: fits
    tag, data = ch.take()
    assert tag == 3 and len(data) == RING - chan.RECORD_HEAD and data.startswith(b"ping")


@pytest.mark.skipif(_native is None or not hasattr(_native, "serve_calls"),
                    reason="multipy._native (with its serving loop) is not built here")
def test_the_serving_loop_refuses_a_request_record_whose_length_runs_past_the_ring():
    memory = _memory()
    ch = _native.Channel(memory)
    assert ch.post(b"x" * 40, 0) > 0
    _corrupt_record_length(memory, RING)  # past the ring, into the reply slots
    arena = shm.Arena(shm.Segment.create(1 << 16))
    with pytest.raises(ValueError, match="corrupt request record"):
        _native.serve_calls(ch, 0.0, -1, -1, {}, None, None, arena, None, [], set(), [],
                            set(), [], {}, [None], None, None)


def _c_caller(memory):
    """``(channel, worker, Caller)``: the extension's blocking-call ending on a bare
    channel, with a stand-in for the process worker's books."""
    from types import SimpleNamespace

    ch = _native.Channel(memory)
    arena = shm.Arena(shm.Segment.create(1 << 16))
    worker = SimpleNamespace(_slots={}, _ends={}, _owed={}, _callers={}, _held=None,
                             _results=None, _args=arena, _decoder=SimpleNamespace(_died=None),
                             _next_call=0)
    end = SimpleNamespace(spin=0.0, _skip=0, _backoff=1, cores=-1, alive_fd=-1,
                          limit=RING // 2 - chan.RECORD_HEAD)
    return ch, worker, _native.caller(worker, ch, end)


@pytest.mark.skipif(_native is None or not hasattr(_native, "caller"),
                    reason="multipy._native (with Caller) is not built here")
@pytest.mark.parametrize("corrupt", [None, "length", "counts", "call", "flags"])
def test_the_c_end_of_a_call_settles_only_a_well_formed_reply(corrupt):
    # A reply header the interpreter wrote wrong (or a crashed one left half
    # written) is never read past its slot nor settled in C: it stays in the slot
    # for the Python path, which calls the interpreter out of step.
    memory = _memory()
    ch, worker, caller = _c_caller(memory)
    slot, call = ch.claim(), 5
    counted = _native.in_flight()
    assert ch.post(b"request", slot) and ch.take() == (slot, b"request")  # counted in flight
    worker._owed[call], worker._slots[call] = [], slot
    frame = bytearray(_native.pack_reply(call, None, (), (), False, ()))
    if corrupt == "counts":
        frame[10:12] = bytes((255, 255))  # more pinned blocks than the reply holds
    elif corrupt == "call":
        frame[0] ^= 0xFF  # answers another call
    elif corrupt == "flags":
        frame[9] |= 0x80  # a flag nobody knows
    assert ch.reply(slot, bytes(frame), 0)
    if corrupt == "length":  # a length past the slot
        header = chan.HEADER_BYTES + RING + slot * (chan.SLOT_HEAD + SLOT_BYTES)
        struct.pack_into("<I", memory, header + 8, 1 << 31)
    got = caller.finish(call, slot, 0.0)
    try:
        if corrupt is None:
            assert got == (None, None)
            assert not worker._owed and not worker._slots and not ch.ready(slot)
            assert _native.in_flight() == counted  # no longer in flight
        else:
            assert got in READY  # what the wait said: the reply is the Python path's
            assert ch.ready(slot) and call in worker._owed and worker._slots[call] == slot
    finally:
        ch.detach()


@pytest.mark.skipif(_native is None or not hasattr(_native, "caller"),
                    reason="multipy._native (with Caller) is not built here")
@pytest.mark.parametrize("corrupt", [None, "length", "counts", "call", "flags"])
def test_the_c_collect_of_a_posted_call_settles_only_a_well_formed_reply(corrupt):
    # The completion side's C step: it never waits, settles the common reply
    # (books, the posted entry and, with no posted call left, the bell word) and
    # leaves anything else in its slot for the Python path.
    memory = _memory()
    ch, worker, caller = _c_caller(memory)
    posted, entry = {}, object()
    try:
        sent = caller.post((0, None, (3,), {}, 0, None), (), entry, posted, -1)
        assert sent is not None
        call, placed = sent
        slot = worker._slots[call]
        assert posted == {call: entry} and worker._owed[call] == placed
        assert struct.unpack_from("<I", memory, chan._BELL)[0] == 1  # its reply rings
        assert caller.collect(call, slot, posted) is None  # not answered: nothing settled
        assert ch.take()[0] == slot
        frame = bytearray(_native.pack_reply(call, None, (), (), False, ()))
        if corrupt == "counts":
            frame[10:12] = bytes((255, 255))
        elif corrupt == "call":
            frame[0] ^= 0xFF
        elif corrupt == "flags":
            frame[9] |= 0x80
        assert ch.reply(slot, bytes(frame), 0)
        if corrupt == "length":
            header = chan.HEADER_BYTES + RING + slot * (chan.SLOT_HEAD + SLOT_BYTES)
            struct.pack_into("<I", memory, header + 8, 1 << 31)
        got = caller.collect(call, slot, posted)
        if corrupt is None:
            assert got == (None, None)
            assert not posted and not worker._owed and not worker._slots and not ch.ready(slot)
            assert struct.unpack_from("<I", memory, chan._BELL)[0] == 0  # none left: no rings
        else:
            assert got is None
            assert ch.ready(slot) and posted == {call: entry} and worker._slots[call] == slot
    finally:
        ch.detach()


class _Entry:
    """A posted call as BellWatch sees it."""

    def __init__(self, slot, completions, log):
        self.slot, self.completions, self.handed = slot, completions, False
        self.finish = lambda event: log.append((slot, event, threading.current_thread().name))


def test_one_bell_watch_hands_each_reply_to_its_own_completions_in_turn(impl):
    from multipy.backends.completions import Completions

    ch = impl(_memory())
    bell_r, bell_w = os.pipe()
    os.set_blocking(bell_r, False)
    alive_r, alive_w = os.pipe()
    end = chan.HostEnd(ch, -1, lambda: None, alive_r, 0.0, bell_r)
    first, second = Completions("bell-first"), Completions("bell-second")
    log: list = []
    watch = chan.BellWatch(end, lambda entry: entry.slot)
    try:
        entries = []
        for completions in (first, second, first):
            slot = ch.claim()
            entry = _Entry(slot, completions, log)
            with watch.lock:
                watch.posted[slot] = entry
            assert ch.post(b"req", slot)
            entries.append(entry)
        watch.watch()
        assert watch.watching is first  # the oldest call's completions watch the bell
        for entry in entries[:2]:  # the interpreter answers two, rings once
            assert ch.take() == (entry.slot, b"req")
            assert ch.reply(entry.slot, b"rep", 0)
        os.write(bell_w, b"\0")
        wait_for(lambda: len(log) == 2, "the two answered calls to be handed over")
        assert sorted(log) == sorted([(entries[0].slot, "ready", "bell-first"),
                                      (entries[1].slot, "ready", "bell-second")])
        assert not entries[2].handed  # not answered: still watched
        with watch.lock:
            del watch.posted[entries[0].slot], watch.posted[entries[1].slot]
        assert ch.take() == (entries[2].slot, b"req")
        assert ch.reply(entries[2].slot, b"rep", 0)
        os.write(bell_w, b"\0")
        wait_for(lambda: len(log) == 3, "the third call to be handed over")
        assert log[2] == (entries[2].slot, "ready", "bell-first")
        # A retired watch (its generation over) hands nothing over any more.
        later = _Entry(ch.claim(), first, log)
        with watch.lock:
            watch.posted.clear()
            watch.posted[later.slot] = later
        watch.retired = True
        watch.watch()
        assert watch.watching is None and not later.handed
    finally:
        first.close()
        second.close()
        for fd in (bell_r, bell_w, alive_r, alive_w):
            os.close(fd)
