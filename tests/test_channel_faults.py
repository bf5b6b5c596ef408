"""The process backend on the native call channel: an interpreter killed at each
point of a call's wait, and what its replacement does next.

Each case SIGKILLs the interpreter while the caller is in a known state (spinning,
asleep in its futex, or reading a reply whose bytes were announced in the slot
but never written to the pipe), checks that the caller fails at once with
:class:`~multipy.InterpreterCrashedError`, and that the restarted interpreter
(with a new channel) serves the next calls correctly.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

import multipy
from multipy.transport import channel as chan

from _faults import replicated_run
from _interrupting import Gate
from _wait import wait_for

pytestmark = pytest.mark.skipif(
    not chan.NATIVE, reason=f"the process backend uses the call channel only natively ({chan.NATIVE_WHY})")


@pytest.fixture(scope="module")
def manager():
    with multipy.InterpreterManager(1, backend="process", call_timeout=120) as m:
        yield m


@pytest.fixture(scope="module")
def run(manager):
    return replicated_run(manager)


def _end(manager):
    worker = manager._workers[0]
    worker.ready()
    return worker._end


def _call_in_thread(run, *args):
    result = {}

    def call():
        try:
            result["value"] = run(*args)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            result["value"] = exc

    t = threading.Thread(target=call)
    t.start()
    return t, result


def _assert_killed_then_serves(manager, run, t, result, pid):
    # The interpreter took the call (else it would be resent to the replacement).
    os.kill(pid, signal.SIGKILL)
    t.join(60)
    assert not t.is_alive(), "the caller hung on a dead interpreter"
    err = result["value"]
    assert isinstance(err, multipy.InterpreterCrashedError), err
    assert "SIGKILL(-9)" in str(err)
    x = torch.arange(8.0)
    for _ in range(3):
        assert torch.equal(run("echo", x), x)
    assert run("echo", b"y" * 200_000) == b"y" * 200_000  # a spilled request and reply
    assert manager.statistics().interpreters[0].pid != pid


def test_a_large_request_and_reply_cross_through_the_pipe_beside_the_channel(run):
    big = bytes(range(256)) * 1000
    assert len(big) > chan.SLOT_BYTES
    assert run("echo", big) == big
    assert run("echo", 5) == 5


def test_sigkill_while_the_caller_spins(manager, run):
    from multipy import _native

    end = _end(manager)
    end.spin, end._skip = 3600.0, 0  # this call's wait stays in its spin until the end
    pid = manager.statistics().interpreters[0].pid
    t, result = _call_in_thread(run, "sleep", 3600.0)
    while _native.spinners() == 0 or end.channel.pending:  # spinning, the call taken
        assert t.is_alive(), result
    _assert_killed_then_serves(manager, run, t, result, pid)


def test_sigkill_while_the_caller_sleeps_in_its_futex(manager, run):
    end = _end(manager)
    end.spin = 0.0  # sleep at once
    pid = manager.statistics().interpreters[0].pid
    t, result = _call_in_thread(run, "sleep", 3600.0)
    slots = manager._workers[0]._slots  # call id -> reply slot, for the calls in flight
    while not (slots and all(map(end.channel.asleep, list(slots.values())))
               and not end.channel.pending):
        assert t.is_alive(), result
    _assert_killed_then_serves(manager, run, t, result, pid)


def test_sigkill_between_the_reply_announced_in_the_slot_and_its_bytes_on_the_pipe(manager, run):
    with manager.acquire_one() as s:
        pid = s.global_("os", "getpid")().deref()
        # The next reply too big for its slot is announced there, then the
        # interpreter dies before writing its bytes to the pipe.
        s.exec_("import os, signal\n"
                "import multipy.transport.frames as frames\n"
                "frames.write_frame = lambda fd, data: os.kill(os.getpid(), signal.SIGKILL)\n"
                "result = None\n")
    with pytest.raises(multipy.InterpreterCrashedError, match=r"SIGKILL\(-9\)"):
        run("echo", b"z" * 200_000)
    x = torch.ones(4)
    assert torch.equal(run("echo", x), x)
    assert run("echo", b"z" * 200_000) == b"z" * 200_000
    assert manager.statistics().interpreters[0].pid != pid


@pytest.mark.parametrize("timeout", [None, 120.0], ids=["no-timeout", "timeout"])
def test_a_call_no_interpreter_took_is_sent_again_after_each_death(manager, run, timeout):
    # A call queued behind a running one is taken by neither the interpreter killed
    # under it nor by its replacement, killed too before its turn: it was never
    # run, so it goes on to the next replacement instead of failing as crashed.
    # (With a timeout, the replacement first gets a request of its own loading the
    # object, which it never takes either.)
    worker = manager._workers[0]
    worker.ready()
    first = worker.pid
    gate = Gate()
    try:
        held, held_result = _call_in_thread(run, "gate", gate.dir, "held")
        with open(f"{gate.dir}/started") as f:  # the interpreter runs the held call now
            f.read()
        queued, queued_result = _call_in_thread(run.with_timeout(timeout), "echo", "queued")
        wait_for(lambda: len(worker._owed) == 2, "the call queued behind the held one")
        # Held here, the worker lock keeps the restart and the re-send waiting, so the
        # replacement can be stopped before it could take the queued call.
        with worker.lock:
            os.kill(first, signal.SIGKILL)
            held.join(60)
            assert isinstance(held_result["value"], multipy.InterpreterCrashedError)
            wait_for(lambda: not worker._callers, "the queued call to learn it was never taken")
            worker._ensure_started_locked()  # the replacement
            second = worker.pid
            os.kill(second, signal.SIGSTOP)  # it takes nothing from here on
        wait_for(lambda: len(worker._owed) == 1, "the call to be sent to the replacement")
        assert queued.is_alive()
        os.kill(second, signal.SIGKILL)
        queued.join(60)
        assert not queued.is_alive(), "the caller hung"
    finally:
        gate.close()
    assert queued_result["value"] == "queued"
    assert worker.pid not in (first, second)
    assert run("echo", 7) == 7


@pytest.mark.parametrize("form", ["binary", "pickled"])
def test_a_skipped_request_still_applies_the_releases_it_carries(form):
    # A posted call cancelled (or past its deadline) while queued is answered unrun;
    # the host's releases that went with it (freed result blocks, dropped objects)
    # must not be lost with it, or the interpreter would hold them for good.
    from multipy.backends._process_main import Loop
    from multipy.interp.state import InterpreterState
    from multipy.transport.codec import Encoder
    from multipy.transport.messages import CALL_ID, Op, parse_reply
    from multipy.transport.shm import Segment

    args, results = Segment.create(1 << 16), Segment.create(1 << 16)
    loop = Loop(InterpreterState(0), -1, -1, args.fd, results.fd)
    freed, dropped = [], []
    loop._free_result = freed.append
    loop.state.release = dropped.extend
    drop = () if form == "binary" else (11, 12)
    data = Encoder(None).encode_request(int(Op.CALL_REPLICATED), (3, None, (1, 2.5), {}, 1, None),
                                        drop, (64, 128))
    assert (data[0] == 0x80) == (form == "pickled")
    reply = parse_reply(loop.skip(CALL_ID.pack(5) + data))
    assert reply.call == 5 and reply.error.type_name.endswith("CallTimeoutError")
    assert freed == [64, 128]
    assert dropped == list(drop)
    args.close()
    results.close()
