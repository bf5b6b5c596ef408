"""Requests whose replies the event loop reads itself (``submit_async(on_loop=True)``,
what ``multipy serve`` sends): each caller gets its own answer, the reply is read
on the loop's thread, a cancelled call leaves the pool usable, and a loop that
stopped with a call in flight does not hang the manager's close.

Calls that must stay in flight wait inside the interpreter for a gate file
(``_rows.rows(gate=...)``), so nothing here depends on timing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest
import torch

import multipy
from multipy.transport import channel
from _rows import logged
from _wait import wait_for

INTERPRETERS = 2


@pytest.fixture(scope="module")
def model(manager):
    """``_rows.rows`` as a ReplicatedObj: ``x * 2 + 1``, gates, logs."""
    with manager.acquire_one() as s:
        return s.create_movable(s.global_("_rows", "rows"))


def _call(model, *args, convert=None, **kwargs):
    """What ``acall`` sends, read on the loop (``on_loop=True``)."""
    manager = model._manager
    request = manager._replicated_request(model, None, args, kwargs, None)
    request.convert = convert
    return manager._dispatcher.submit_async(request, on_loop=True)


def test_every_caller_gets_its_own_answer_read_on_the_loops_thread(model, manager):
    async def main():
        xs = [torch.full((2,), float(i)) for i in range(64)]
        # convert runs where the reply is read: on the loop's thread, not a completion thread.
        outs = await asyncio.gather(*(_call(model, x, convert=lambda v: (v, threading.get_ident()))
                                      for x in xs))
        return xs, outs

    xs, outs = asyncio.run(main())
    assert all(torch.equal(out, x * 2 + 1) for x, (out, _) in zip(xs, outs))
    assert {ident for _, ident in outs} == {threading.get_ident()}


def _readers_added(manager, calls):
    """Run ``calls(loop)`` (a coroutine function) on a fresh loop; returns its result,
    the descriptors the loop began to read (add_reader) and those watched for a
    reply (watch / watch_kept) meanwhile, and the loop's completions."""
    added, watched = [], []

    async def main():
        loop = asyncio.get_running_loop()
        completions = manager._dispatcher._on_loop(loop)
        add_reader, watch, kept = loop.add_reader, completions.watch, completions.watch_kept
        loop.add_reader = lambda fd, *args: (added.append(fd), add_reader(fd, *args))[1]
        completions.watch = lambda fd, callback: (watched.append(fd), watch(fd, callback))[1]
        completions.watch_kept = lambda fd, callback, owner: (
            watched.append(fd), kept(fd, callback, owner))[1]
        try:
            return await calls(loop), completions
        finally:
            del loop.add_reader, completions.watch, completions.watch_kept

    out, completions = asyncio.run(main())
    return out, added, watched, completions


def test_a_busy_interpreters_replies_are_read_without_a_reader_added_per_call(
        model, manager, backend):
    if backend == "thread":
        pytest.skip("the thread backend's interpreters wake the loop themselves (no descriptor)")
    xs = [torch.full((2,), float(i)) for i in range(64)]

    async def calls(loop):
        return await asyncio.gather(*(_call(model, x) for x in xs))

    outs, added, watched, _ = _readers_added(manager, calls)
    assert all(torch.equal(out, x * 2 + 1) for x, out in zip(xs, outs))
    # 64 calls queued on 2 interpreters: each interpreter's next call is sent, and
    # its reply watched, while the loop still reads that interpreter's descriptor.
    assert watched and len(added) < len(watched) / 2


def _pipe_of(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _still_open(fd: int, pipe: tuple[int, int]) -> bool:
    """``fd`` still names the pipe it named (a closed number may be reused at once
    by another thread's new descriptor: that is not the duplicate left open)."""
    try:
        return _pipe_of(fd) == pipe
    except OSError:
        return False


def test_one_call_at_a_time_keeps_the_bell_read_between_calls(model, manager, backend):
    """The server's one connection: each call waits for the one before.  The loop
    reads each interpreter's bell from its first call on (a reader added per
    interpreter, not per call), and stops once the loop is gone: no duplicate
    descriptor is left open."""
    if backend == "thread":
        pytest.skip("the thread backend's interpreters wake the loop themselves (no descriptor)")
    if not channel.NATIVE:
        pytest.skip("a bell rings on the call channel only (the pipes' reply is watched per call)")

    async def calls(loop):
        outs = [await _call(model, torch.full((2,), float(i))) for i in range(40)]
        return outs

    outs, added, watched, completions = _readers_added(manager, calls)
    assert [o[0].item() for o in outs] == [i * 2 + 1 for i in range(40)]
    assert len(watched) >= 20  # (a reply there at once needs no watch)
    assert 1 <= len(added) <= 2 * INTERPRETERS  # (a ring left over may stop it once)
    dups = {dup: _pipe_of(dup) for _, dup in completions._kept.values()}
    completions.hand_over()  # the manager's close, for a loop that stopped
    assert completions._kept == {}
    for dup, pipe in dups.items():
        assert not _still_open(dup, pipe), "a kept duplicate of a bell was left open"


def test_the_kept_reader_stops_when_its_interpreter_restarts(model, manager, backend):
    """The interpreter dies between two calls: its bell reaches end-of-file and the
    loop stops reading it (its duplicate closed), while the replacement's bell is
    read from its first call."""
    if backend == "thread":
        pytest.skip("the thread backend's interpreters wake the loop themselves (no descriptor)")
    if not channel.NATIVE:
        pytest.skip("a bell rings on the call channel only (the pipes' reply is watched per call)")

    async def calls(loop):
        completions = manager._dispatcher._on_loop(loop)
        first = await asyncio.gather(*(_call(model, torch.ones(1)) for _ in range(8)))
        old = dict(completions._kept)
        assert old, "no bell kept read after the calls"
        pipes = {dup: _pipe_of(dup) for _, dup in old.values()}
        for worker in manager._workers:
            os.kill(worker.pid, signal.SIGKILL)
        # The dead interpreters' bells are dropped at end-of-file by the loop itself.
        deadline = loop.time() + 60
        while any(completions._kept.get(fd, (None,))[0] is owner
                  for fd, (owner, _) in old.items()):
            assert loop.time() < deadline, "the loop still reads a dead interpreter's bell"
            await asyncio.sleep(0.01)
        for dup, pipe in pipes.items():
            assert not _still_open(dup, pipe), "a dead interpreter's bell duplicate left open"
        deadline = loop.time() + 120
        while True:  # the calls after the kill reach the replacements
            try:
                return first, await _call(model, torch.ones(1))
            except multipy.InterpreterCrashedError:
                assert loop.time() < deadline
                await asyncio.sleep(0.05)

    (first, after), *_ = _readers_added(manager, calls)
    assert all(o.item() == 3 for o in first) and after.item() == 3


def test_a_call_cancelled_in_flight_is_dropped_and_the_pool_stays_usable(
        model, manager, tmp_path, assert_usable):
    gate, log = str(tmp_path / "gate"), str(tmp_path / "log")

    async def main():
        slow = asyncio.ensure_future(_call(model, torch.zeros(1), gate=gate, log=log, tag="slow"))
        await asyncio.to_thread(wait_for, lambda: logged(log), "the call to start")
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        open(gate, "w").close()
        return await asyncio.gather(*(_call(model, torch.full((1,), float(i))) for i in range(8)))

    outs = asyncio.run(main())
    assert [o.item() for o in outs] == [i * 2 + 1 for i in range(8)]
    assert_usable(manager)


def test_close_finishes_a_call_left_in_flight_by_a_loop_that_stopped(backend, tmp_path):
    gate, log = str(tmp_path / "gate"), str(tmp_path / "log")
    manager = multipy.InterpreterManager(1, backend=backend)
    with manager.acquire_one() as s:
        model = s.create_movable(s.global_("_rows", "rows"))
    loop = asyncio.new_event_loop()
    task = loop.create_task(_call(model, torch.zeros(1), gate=gate, log=log, tag="left"))
    loop.run_until_complete(asyncio.to_thread(wait_for, lambda: logged(log), "the call to start"))
    loop.close()  # stopped with the call in flight: no loop will read its reply
    assert not task.done()
    open(gate, "w").close()
    # close() waits for the call in flight (up to its timeout): the manager hands the
    # call to its completion thread, which reads the reply and frees the interpreter.
    closer = threading.Thread(target=lambda: manager.close(timeout=3600), name="closer",
                              daemon=True)
    closer.start()
    closer.join(120)
    assert not closer.is_alive(), "close() hung on a call a stopped loop had in flight"
