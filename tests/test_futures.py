"""Futures and asyncio: ``submit`` and ``acall`` on ReplicatedObj and Obj.

Every test runs on every backend the suite covers, against one manager per
module.  Calls that must stay in flight wait inside the interpreter for a gate
file (``_rows.rows(gate=...)``), so nothing here depends on timing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import threading

import pytest
import torch

import multipy
from _rows import hold_every_interpreter, logged, movable_rows, open_gate
from _wait import wait_for
from multipy.backends.base import Worker
from multipy.errors import RemoteTraceback
from multipy.runtime.timeouts import LONGEST

INTERPRETERS = 2


def completion_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("multipy-completion")]


# -- futures ---------------------------------------------------------------------------


def test_submit_returns_futures_with_each_callers_answer(rows_model):
    xs = [torch.full((i + 1, 3), float(i)) for i in range(40)]
    futures = [rows_model.submit(x) for x in xs]
    assert all(isinstance(f, concurrent.futures.Future) for f in futures)
    for x, f in zip(xs, futures):
        assert torch.equal(f.result(timeout=60), x * 2 + 1)


def test_submit_from_many_threads_mixed_with_blocking_calls(rows_model):
    def one(i):
        x = torch.full((2,), float(i))
        if i % 2:
            return torch.equal(rows_model(x), x * 2 + 1)
        return torch.equal(rows_model.submit(x).result(timeout=60), x * 2 + 1)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert all(pool.map(one, range(200)))


def test_submit_error_keeps_its_type_and_the_remote_traceback(rows_model):
    future = rows_model.submit(torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="negative input") as info:
        future.result(timeout=60)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert 'raise ValueError(f"negative input' in str(info.value.__cause__)


def test_obj_submit_and_acall_return_objs_of_the_session(manager):
    with manager.acquire_one() as s:
        sqrt = s.global_("math", "sqrt")
        future = sqrt.submit(16.0)
        obj = future.result(timeout=60)
        assert isinstance(obj, multipy.Obj) and s.is_owner(obj)
        assert obj.deref() == 4.0

        async def main():
            return await asyncio.gather(*(sqrt.acall(float(i * i)) for i in range(10)))

        assert [o.deref() for o in asyncio.run(main())] == [float(i) for i in range(10)]


def test_an_argument_that_cannot_cross_fails_only_its_future(rows_model, assert_usable, manager):
    future = rows_model.submit(torch.zeros(1), tag=threading.Lock())
    with pytest.raises(multipy.TransportError):
        future.result(timeout=60)
    assert torch.equal(rows_model.submit(torch.zeros(1)).result(timeout=60), torch.ones(1))
    assert_usable(manager)


def test_cancelling_a_queued_future_means_it_is_never_sent(rows_model, manager, gate):
    gate_path, log = gate
    held = hold_every_interpreter(rows_model, manager, gate_path, log)
    queued = rows_model.submit(torch.zeros(1), log=log, tag="cancelled")
    assert not queued.running()
    assert queued.cancel()
    kept = rows_model.submit(torch.zeros(1), log=log, tag="kept")
    open_gate(gate_path)
    assert torch.equal(kept.result(timeout=60), torch.ones(1))
    for f in held:
        f.result(timeout=60)
    assert "cancelled" not in [line[0] for line in logged(log)]


def test_a_future_already_sent_cannot_be_cancelled_and_later_calls_get_their_own_answer(
        rows_model, gate):
    gate_path, log = gate
    running = rows_model.submit(torch.full((1,), 5.0), gate=gate_path, log=log, tag="running")
    wait_for(lambda: logged(log), "the call to start")
    assert running.running() and not running.cancel()
    open_gate(gate_path)
    assert torch.equal(running.result(timeout=60), torch.full((1,), 11.0))
    for i in range(10):
        assert torch.equal(rows_model(torch.full((1,), float(i))), torch.full((1,), 2.0 * i + 1))


# -- asyncio ----------------------------------------------------------------------------


def test_one_event_loop_runs_many_concurrent_acalls_with_one_completion_thread(rows_model, manager):
    before = len(threading.enumerate())

    async def main():
        xs = [torch.full((1, 4), float(i)) for i in range(64)]
        outs = await asyncio.gather(*(rows_model.acall(x) for x in xs))
        return xs, outs, len(threading.enumerate())

    xs, outs, during = asyncio.run(main())
    assert all(torch.equal(o, x * 2 + 1) for x, o in zip(xs, outs))
    assert during <= before + 1  # no thread per call; at most the completion thread
    assert len([n for n in completion_threads()]) >= 1


def test_acall_error_keeps_its_type_and_the_remote_traceback(rows_model):
    async def main():
        return await rows_model.acall(torch.tensor([1.0, -2.0]))

    with pytest.raises(ValueError, match="negative input") as info:
        asyncio.run(main())
    assert 'raise ValueError(f"negative input' in str(info.value.__cause__)


def test_wait_for_timeout_cancels_the_wait_and_leaves_the_pool_usable(
        rows_model, manager, gate, assert_usable):
    gate_path, log = gate

    async def main():
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(rows_model.acall(torch.zeros(1), gate=gate_path, log=log, tag="slow"), 0.2)
        open_gate(gate_path)
        xs = [torch.full((2,), float(i)) for i in range(20)]
        outs = await asyncio.gather(*(rows_model.acall(x) for x in xs))
        return all(torch.equal(o, x * 2 + 1) for x, o in zip(xs, outs))

    assert asyncio.run(main())
    assert_usable(manager)


def test_asyncio_timeout_before_dispatch_means_the_call_is_never_sent(rows_model, manager, gate):
    gate_path, log = gate
    held = hold_every_interpreter(rows_model, manager, gate_path, log)

    async def main():
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await rows_model.acall(torch.zeros(1), log=log, tag="never")
        open_gate(gate_path)
        return await rows_model.acall(torch.ones(1), log=log, tag="after")

    assert torch.equal(asyncio.run(main()), torch.full((1,), 3.0))
    for f in held:
        f.result(timeout=60)
    assert [line[0] for line in logged(log)].count("never") == 0


def test_closing_the_manager_fails_queued_futures_and_stops_the_completion_thread(backend, tmp_path):
    gate_path = str(tmp_path / "gate")
    before = completion_threads()
    manager = multipy.InterpreterManager(1, backend=backend)
    try:
        rows_model = movable_rows(manager)
        running = rows_model.submit(torch.zeros(1), gate=gate_path)
        wait_for(running.running, "the call to start")
        # Calls queued in the interpreter behind it (on a backend that queues them)
        # are in flight: close() lets them finish.
        in_flight = [rows_model.submit(torch.zeros(1))
                     for _ in range(manager._workers[0].posted_depth - 1)]
        queued = rows_model.submit(torch.zeros(1))
        assert len(completion_threads()) == len(before) + 1
        # The gate opens once close() began: the running call cannot end first and let
        # the queued one be sent.
        closer = threading.Thread(target=manager.close)
        closer.start()
        wait_for(lambda: manager._dispatcher._closed, "close() to begin")
        open_gate(gate_path)
        closer.join(60)
        assert not closer.is_alive()
    finally:
        manager.close()
    assert torch.equal(running.result(timeout=60), torch.ones(1))  # finished before close
    for future in in_flight:
        assert torch.equal(future.result(timeout=60), torch.ones(1))
    with pytest.raises(multipy.ManagerClosedError):
        queued.result(timeout=60)
    assert completion_threads() == before
    with pytest.raises(multipy.ManagerClosedError):
        rows_model.submit(torch.zeros(1))


def test_a_backend_without_its_own_post_uses_the_generic_helper(backend, monkeypatch):
    if backend != "thread":
        pytest.skip("checked once, on the thread backend: the helper is backend-independent")
    monkeypatch.setattr(type_of_worker(backend), "_post", Worker._post)
    monkeypatch.setattr(type_of_worker(backend), "_collect", Worker._collect)
    with multipy.InterpreterManager(1, backend=backend) as manager:
        rows_model = movable_rows(manager)
        futures = [rows_model.submit(torch.full((1,), float(i))) for i in range(10)]
        assert [f.result(timeout=60).item() for f in futures] == [2.0 * i + 1 for i in range(10)]
        assert any(t.name == "multipy-post-0" for t in threading.enumerate())


def type_of_worker(backend: str):
    from multipy.backends.thread import ThreadWorker

    return ThreadWorker


# -- crashes ------------------------------------------------------------------------------


def test_an_interpreter_killed_under_concurrent_acalls_fails_only_its_calls(
        rows_model, manager, gate, backend, assert_usable):
    if backend != "process":
        pytest.skip(f"the {backend} backend has no crash isolation: killing an interpreter "
                    "ends the host")
    gate_path, log = gate

    async def main():
        victim = asyncio.ensure_future(rows_model.acall(torch.zeros(1), gate=gate_path, log=log, tag="victim"))
        other = asyncio.ensure_future(rows_model.acall(torch.ones(1), gate=gate_path, log=log, tag="other"))
        while len(logged(log)) < 2:
            await asyncio.sleep(0.005)
        queued = [asyncio.ensure_future(rows_model.acall(torch.full((1,), float(i)))) for i in range(8)]
        pid = int(next(line[1] for line in logged(log) if line[0] == "victim"))
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(multipy.InterpreterCrashedError):
            await victim
        open_gate(gate_path)
        assert torch.equal(await other, torch.full((1,), 3.0))
        outs = await asyncio.gather(*queued)
        return all(torch.equal(o, torch.full((1,), 2.0 * i + 1)) for i, o in enumerate(outs))

    assert asyncio.run(main())
    assert_usable(manager)


def test_a_call_whose_interpreter_died_right_after_loading_its_object_runs_in_the_replacement(
        backend, monkeypatch):
    # With a timeout, a posted call's object is loaded by a request of its own first,
    # then the call is sent.  The interpreter dies in between (after answering the
    # load, before the call reaches it): the call never ran, so it goes to the
    # replacement (which loads the object again) instead of failing.
    if backend != "process":
        pytest.skip(f"the {backend} backend has no crash isolation: killing an interpreter "
                    "ends the host")
    from _wait import gone

    from multipy.transport.messages import Op

    with multipy.InterpreterManager(1, backend=backend, call_timeout=60) as manager:
        model = movable_rows(manager)  # not loaded yet
        worker = manager._workers[0]
        killed = []
        collect = worker._collect

        def collect_then_kill(posted):  # the load's reply read, then the interpreter dies
            outcome = collect(posted)
            if not killed and int(posted.op) == int(Op.MATERIALIZE):
                killed.append(worker.pid)
                os.kill(worker.pid, signal.SIGKILL)
                wait_for(lambda: gone(killed[0]), "the interpreter to die")
            return outcome

        monkeypatch.setattr(worker, "_collect", collect_then_kill)
        future = model.submit(torch.ones(1))
        try:
            assert torch.equal(future.result(timeout=60), torch.full((1,), 3.0))
        except multipy.InterpreterCrashedError as exc:
            # The pipes tell a request not taken only when its write fails (EPIPE):
            # while another process still holds the dead interpreter's request pipe
            # (the fork server, for an instant), the write goes through and the call
            # counts as run.  A call known not sent must never fail.
            assert worker._end is None and "before this call was sent" not in str(exc), exc
        assert killed
        # The replacement serves (a call that failed may have come back before it started).
        assert torch.equal(model.submit(torch.ones(1)).result(timeout=60), torch.full((1,), 3.0))
        assert worker.pid != killed[0]


def test_a_posted_call_past_call_timeout_raises_and_the_interpreter_serves_again(backend, tmp_path):
    gate_path = str(tmp_path / "gate")
    with multipy.InterpreterManager(1, backend=backend, call_timeout=0.5) as manager:
        rows_model = movable_rows(manager)
        stuck = rows_model.submit(torch.zeros(1), gate=gate_path)
        with pytest.raises(multipy.CallTimeoutError):
            stuck.result(timeout=60)
        open_gate(gate_path)  # an abandoned thread-backend interpreter can finish and exit
        assert torch.equal(rows_model.submit(torch.ones(1)).result(timeout=60), torch.full((1,), 3.0))


@pytest.mark.parametrize("seconds", [LONGEST, 1e10], ids=["longest", "1e10"])
def test_a_call_timeout_of_centuries_bounds_nothing_and_every_path_takes_it(backend, seconds):
    # Past LONGEST: no timeout (a deadline would not fit a 64-bit nanosecond count).
    with multipy.InterpreterManager(1, backend=backend, call_timeout=seconds) as manager:
        rows_model = movable_rows(manager)
        assert torch.equal(rows_model(torch.ones(1)), torch.full((1,), 3.0))
        assert torch.equal(rows_model.submit(torch.ones(1)).result(timeout=60), torch.full((1,), 3.0))
        assert torch.equal(asyncio.run(rows_model.acall(torch.ones(1))), torch.full((1,), 3.0))


def test_acall_does_not_keep_a_finished_event_loop_alive(rows_model):
    import gc
    import weakref

    async def main():
        await rows_model.acall(torch.ones(1))
        return weakref.ref(asyncio.get_running_loop())

    loops = [asyncio.run(main()) for _ in range(3)]

    def all_collected():
        # The thread that resolved the last call may still be leaving its callback
        # frame when asyncio.run returns: wait for it, do not assert at once.
        gc.collect()
        return all(loop() is None for loop in loops)

    wait_for(all_collected, "the finished event loops to be collected", seconds=30)


def test_blocking_calls_leave_the_bell_silent_until_a_call_is_posted():
    """On the native channel the interpreter writes the bell pipe (the completion
    thread's wake-up) only once a posted call needs it: blocking calls cost it no
    system call; posted calls, and blocking calls after them, still complete."""
    from multipy.transport import channel

    if not channel.NATIVE:
        pytest.skip("the bell pipe belongs to the native call channel")
    with multipy.InterpreterManager(1, backend="process") as m:
        with m.acquire_one() as s:
            rows = s.create_movable(s.global_("_rows", "rows"))
        end = m._workers[0]._end

        def rung() -> bool:
            try:
                return len(os.read(end.bell_r, 4096)) > 0
            except BlockingIOError:
                return False

        x = torch.ones(3)
        for _ in range(20):
            assert torch.equal(rows(x), x * 2 + 1)
        assert not rung()
        assert torch.equal(rows.submit(x).result(timeout=60), x * 2 + 1)
        assert torch.equal(asyncio.run(rows.acall(x)), x * 2 + 1)
        assert torch.equal(rows(x), x * 2 + 1)
        # (the bell after a posted call: tests/test_in_flight.py)


def test_a_result_too_big_for_the_call_channel_reaches_a_posted_caller(manager):
    # Pickled in band and larger than a reply slot of the call channel: it follows
    # over the reply pipe, which the completion thread reads as the interpreter writes.
    with manager.acquire_one() as s:
        run = s.create_movable(s.global_("_faults", "run"))
    big = [list(range(i, i + 1000)) for i in range(100)]
    assert run.submit("echo", big).result(timeout=60) == big
    assert asyncio.run(run.acall("echo", big)) == big
    assert run.submit("echo", 3).result(timeout=60) == 3


def test_a_posted_call_leaves_no_reference_cycle_behind(rows_model):
    """Once a posted call ended, nothing of it waits for the garbage collector:
    its result dies with the caller's last reference (its result block is given
    back at once), and no per-call objects pile up for a collection to find."""
    import gc
    import weakref

    async def acall(x):
        return await rows_model.acall(x)

    batched = rows_model.batched(max_batch_size=4)

    async def batched_acall(x):
        return await batched.acall(x)

    calls = {
        "submit": lambda x: rows_model.submit(x).result(timeout=60),
        "acall": lambda x: asyncio.run(acall(x)),
        "batched submit": lambda x: batched.submit(x).result(timeout=60),
        "batched acall": lambda x: asyncio.run(batched_acall(x)),
    }
    for name, call in calls.items():
        x = torch.ones(2)
        call(x)  # warm: first-use objects (a loop's bridge...) are made here
        # Twice at most: an earlier test's manager whose last thread ends meanwhile
        # leaves its own garbage once; a cycle made per call shows every time.
        for attempt in range(2):
            gc.collect()
            gc.disable()
            try:
                out = call(x)
                assert torch.equal(out, x * 2 + 1)
                died = weakref.ref(out)
                del out
                # The thread that set the future may still be returning from its
                # frame: wait for its last reference to go (the collector is off, so
                # a cycle would keep the result for ever).
                wait_for(lambda: died() is None,
                         f"{name}: the result to die (a reference cycle keeps it)")
                garbage = _our_garbage()
            finally:
                gc.enable()
            if not garbage:
                break
        assert not garbage, f"{name}: the call left cyclic garbage"


def _our_garbage() -> list:
    """What a collection finds now that multipy made: its objects, tensors, and
    the frames and functions of its code (an event loop's or the test's own
    garbage does not count)."""
    import gc
    import types

    package = os.path.dirname(multipy.__file__)

    def ours(o) -> bool:
        if isinstance(o, torch.Tensor):
            return True
        if isinstance(o, types.FrameType):
            return o.f_code.co_filename.startswith(package)
        if isinstance(o, (types.FunctionType, types.MethodType)):
            return (getattr(o, "__module__", None) or "").startswith("multipy")
        return type(o).__module__.startswith("multipy")

    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return [o for o in gc.garbage if ours(o)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_ten_thousand_posted_calls_from_threads_and_loops_each_get_their_own_answer(rows_model):
    # Threads submitting futures and threads each running an event loop of acall
    # tasks, all at once: every call's answer is its own input's (x * 2 + 1),
    # whichever thread sent it, queued it or collected its reply.
    def submitter(base: int, n: int) -> list:
        wrong, window = [], []
        for i in range(base, base + n):
            window.append((i, rows_model.submit(torch.full((1,), float(i)))))
            if len(window) >= 32:
                j, future = window.pop(0)
                if future.result(timeout=120).item() != j * 2 + 1:
                    wrong.append(j)
        wrong.extend(j for j, f in window if f.result(timeout=120).item() != j * 2 + 1)
        return wrong

    def looper(base: int, n: int) -> list:
        async def main():
            wrong, left = [], list(range(base, base + n))

            async def task():
                while left:
                    i = left.pop()
                    if (await rows_model.acall(torch.full((1,), float(i)))).item() != i * 2 + 1:
                        wrong.append(i)

            await asyncio.gather(*(task() for _ in range(64)))
            return wrong

        return asyncio.run(main())

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        jobs = [pool.submit(submitter, k * 1500, 1500) for k in range(4)]
        jobs += [pool.submit(looper, 6000 + k * 2000, 2000) for k in range(2)]
        assert [job.result(timeout=600) for job in jobs] == [[]] * 6


class _NoMemoryToCount(int):
    """A worker's call count whose next increment fails as if memory had run out."""

    def __add__(self, other):
        raise MemoryError("no memory left to count the call")


def test_an_error_counting_a_posted_call_ends_it_with_that_error(rows_model, manager,
                                                                 assert_usable):
    # The reply was read: a failure in the books that follow must still give the
    # interpreter back and tell the caller, never leave the call in flight for ever.
    rows_model.submit(torch.ones(1)).result(timeout=60)  # loaded
    workers = manager._workers
    calls = [w.calls for w in workers]
    failures = sum(w.failures for w in workers)
    try:
        for w in workers:
            w.calls = _NoMemoryToCount(w.calls)
        with pytest.raises(MemoryError, match="no memory left to count"):
            rows_model.submit(torch.ones(2)).result(timeout=60)
    finally:
        for w, n in zip(workers, calls):
            w.calls = n
    wait_for(lambda: not any(manager._balancer._load), "the interpreter's count to be given back")
    assert sum(w.failures for w in workers) == failures + 1  # counted as a failed call
    assert [w.posted_in_flight for w in workers] == [0] * INTERPRETERS
    assert not any(w.lock.locked() for w in workers)
    assert torch.equal(rows_model.submit(torch.ones(3)).result(timeout=60), torch.full((3,), 3.0))
    assert_usable(manager)
