"""Several posted calls in flight per interpreter.

On the process backend with the native call channel, the dispatcher keeps up to
``Worker.posted_depth`` posted calls (``submit``, ``acall``, batches) in flight
on one interpreter: the ones behind the running call wait in the interpreter's
request ring and start without a host round trip.  What the failure model
promises still holds per call: a crash fails the call that was running and
sends the ones never taken to the replacement; a queued call past its deadline
is dropped unrun while the interpreter keeps running; close() fails what is in
flight.  On the other backends and the pipes (``MULTIPY_NATIVE=0``) one posted
call is in flight at a time and the same tests hold.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import multipy
from _rows import logged, movable_rows, open_gate
from _wait import wait_for

INTERPRETERS = 1  # every posted call goes to the same interpreter


@pytest.fixture(scope="module")
def depth(manager) -> int:
    return manager._workers[0].posted_depth


def queue_behind_a_gated_call(model, gate_path: str, log: str, n: int, tag: str = "queued"):
    """``(running, queued)``: a gated call running in the interpreter, and ``n`` calls
    submitted behind it (in its queue up to the depth, the rest in the dispatcher)."""
    running = model.submit(torch.zeros(1), gate=gate_path, log=log, tag="running")
    wait_for(lambda: len(logged(log)) == 1, "the gated call to start")
    queued = [model.submit(torch.full((1,), float(i + 1)), log=log, tag=f"{tag}{i}")
              for i in range(n)]
    return running, queued


def test_posted_calls_queue_in_the_interpreter_up_to_its_depth(rows_model, manager, gate, depth):
    gate_path, log = gate
    worker, dispatcher = manager._workers[0], manager._dispatcher
    running, queued = queue_behind_a_gated_call(rows_model, gate_path, log, depth + 1)
    # depth calls in flight (the running one and depth - 1 queued in the interpreter),
    # the others wait in the dispatcher for room
    wait_for(lambda: worker.posted_in_flight == depth, "the queue to fill")
    wait_for(lambda: len(dispatcher._pending) == 2, "the others to wait in the dispatcher")
    assert all(f.running() for f in queued[:depth - 1]) and not any(f.running() for f in queued[depth - 1:])
    open_gate(gate_path)
    assert torch.equal(running.result(timeout=60), torch.ones(1))
    for i, f in enumerate(queued):
        assert torch.equal(f.result(timeout=60), torch.full((1,), 2.0 * (i + 1) + 1))
    # run in the order sent, each once
    assert [line[0] for line in logged(log)] == ["running"] + [f"queued{i}" for i in range(len(queued))]
    assert worker.posted_in_flight == 0


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["submit", "acall", "blocking"]),
                          st.integers(1, 4), st.integers(0, 3)), min_size=1, max_size=40))
def test_mixed_posted_and_blocking_calls_each_get_their_own_answer(rows_model, calls):
    """submit from several threads, acall from one event loop and blocking calls, all
    at once on one interpreter: every caller gets the answer to its own input."""
    answers: dict[int, torch.Tensor] = {}
    lock = threading.Lock()

    def inputs(i: int, rows: int) -> torch.Tensor:
        return torch.arange(rows * 3, dtype=torch.float64).reshape(rows, 3) + 1000.0 * i

    def keep(i, out):
        with lock:
            answers[i] = out

    by_thread: dict[int, list] = {}
    loop_calls = []
    for i, (kind, rows, thread) in enumerate(calls):
        if kind == "acall":
            loop_calls.append((i, rows))
        else:
            by_thread.setdefault(thread, []).append((i, kind, rows))

    def run_thread(items):
        futures = []
        for i, kind, rows in items:
            if kind == "submit":
                futures.append((i, rows_model.submit(inputs(i, rows))))
            else:
                keep(i, rows_model(inputs(i, rows)))
        for i, f in futures:
            keep(i, f.result(timeout=60))

    async def run_loop():
        outs = await asyncio.gather(*(rows_model.acall(inputs(i, rows)) for i, rows in loop_calls))
        for (i, _), out in zip(loop_calls, outs):
            keep(i, out)

    threads = [threading.Thread(target=run_thread, args=(items,)) for items in by_thread.values()]
    threads.append(threading.Thread(target=lambda: asyncio.run(run_loop())))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert sorted(answers) == list(range(len(calls)))
    for i, (_, rows, _) in enumerate(calls):
        assert torch.equal(answers[i], inputs(i, rows) * 2 + 1)


def test_an_interpreter_killed_with_calls_queued_fails_only_the_running_one(
        rows_model, manager, gate, backend, depth, assert_usable):
    if backend != "process":
        pytest.skip(f"the {backend} backend has no crash isolation: killing an interpreter "
                    "ends the host")
    gate_path, log = gate
    running, queued = queue_behind_a_gated_call(rows_model, gate_path, log, depth + 2)
    wait_for(lambda: manager._workers[0].posted_in_flight == depth, "the queue to fill")
    victim = int(logged(log)[0][1])
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(multipy.InterpreterCrashedError):
        running.result(timeout=60)
    # the calls it never took (queued in it, or in the dispatcher) ran in its replacement
    for i, f in enumerate(queued):
        assert torch.equal(f.result(timeout=60), torch.full((1,), 2.0 * (i + 1) + 1))
    lines = logged(log)
    assert [line[0] for line in lines] == ["running"] + [f"queued{i}" for i in range(len(queued))]
    assert all(int(line[1]) != victim for line in lines[1:])
    assert_usable(manager)


def test_a_reply_read_after_a_restart_began_leaves_the_replacement_the_recipe(
        rows_model, manager, backend, assert_usable):
    """A posted call answered by an interpreter that is then killed, its reply read
    only once the replacement's books exist: the call counts as loaded in the dead
    interpreter, not in the replacement.  The calls that reach the replacement (one
    that waited in the dispatcher through the restart, a blocking one resent there,
    later ones) carry the object's recipe and get their answers."""
    worker = manager._workers[0]
    if backend != "process" or worker._end is None:
        pytest.skip("needs a crash-isolated interpreter whose posted calls leave its lock "
                    "once sent (the process backend on the call channel)")
    x = torch.ones(1)
    assert torch.equal(rows_model(x), torch.full((1,), 3.0))  # loaded in this generation
    generation = worker.generation
    # The completion thread, which reads posted replies, is held until the restart began.
    release = threading.Event()
    held = threading.Event()
    manager._completions.call_soon(lambda: (held.set(), release.wait(60)))
    wait_for(held.is_set, "the completion thread to be held")
    answered = rows_model.submit(x)
    # Its reply written and not read; or read already by the post itself (a reply
    # there before the post returned is collected by it, and handed over through
    # the held completion thread): the restart below then finds nothing to read.
    wait_for(lambda: all(worker._end.ready(worker._slots[call]) for call in worker._posted),
             "the posted call's reply to be written")
    os.kill(worker.pid, signal.SIGKILL)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # A blocking call finds the interpreter dead: it restarts it, then is sent again.
        resent = pool.submit(rows_model, x)
        wait_for(lambda: worker.generation == generation + 1, "the restart to begin")
        waited = rows_model.submit(x)  # waits in the dispatcher through the restart
        release.set()
        assert torch.equal(answered.result(timeout=60), torch.full((1,), 3.0))
        assert torch.equal(resent.result(timeout=60), torch.full((1,), 3.0))
    assert torch.equal(waited.result(timeout=60), torch.full((1,), 3.0))
    assert torch.equal(rows_model.submit(x).result(timeout=60), torch.full((1,), 3.0))
    assert_usable(manager)


def test_cancelling_a_call_queued_in_the_dispatcher_means_it_is_never_sent(
        rows_model, manager, gate, depth):
    gate_path, log = gate
    running, queued = queue_behind_a_gated_call(rows_model, gate_path, log, depth)
    wait_for(lambda: manager._workers[0].posted_in_flight == depth, "the queue to fill")
    # the last one waits in the dispatcher (the interpreter's queue is full): never sent
    assert queued[-1].cancel()
    # one queued in the interpreter is running already: it runs, to its end
    assert all(not f.cancel() for f in queued[:-1])
    open_gate(gate_path)
    running.result(timeout=60)
    for f in queued[:-1]:
        f.result(timeout=60)
    assert rows_model(torch.ones(1)).item() == 3.0  # after everything queued before it
    assert f"queued{depth - 1}" not in [line[0] for line in logged(log)]


def test_a_cancelled_acall_is_dropped_unrun_even_when_queued_in_the_interpreter(
        rows_model, manager, gate, depth):
    """An acall cancelled while it waits, in the dispatcher or already in the
    interpreter's queue behind a running call, never runs; the others get their
    answers."""
    gate_path, log = gate
    worker = manager._workers[0]

    async def main():
        running = asyncio.ensure_future(rows_model.acall(torch.zeros(1), gate=gate_path, log=log,
                                                         tag="running"))
        while not logged(log):
            await asyncio.sleep(0.005)
        tasks = [asyncio.ensure_future(rows_model.acall(torch.full((1,), float(i)), log=log,
                                                        tag=f"t{i}")) for i in range(6)]
        while worker.posted_in_flight < depth:  # t0 .. t(depth-2) sent into the interpreter
            await asyncio.sleep(0.005)
        tasks[0].cancel()  # queued in the interpreter (in the dispatcher where depth is 1)
        tasks[3].cancel()  # in the dispatcher
        await asyncio.sleep(0)  # the cancellations reach the dispatcher and the interpreter
        open_gate(gate_path)
        assert torch.equal(await running, torch.ones(1))
        return await asyncio.gather(*tasks, return_exceptions=True)

    outs = asyncio.run(main())
    for i, out in enumerate(outs):
        if i in (0, 3):
            assert isinstance(out, asyncio.CancelledError)
        else:
            assert torch.equal(out, torch.full((1,), 2.0 * i + 1))
    ran = [line[0] for line in logged(log)]
    assert ran == ["running"] + [f"t{i}" for i in (1, 2, 4, 5)]
    assert rows_model(torch.ones(1)).item() == 3.0  # the interpreter serves on


def test_a_queued_call_past_its_deadline_is_dropped_and_the_running_one_goes_on(backend, tmp_path):
    """A posted call that waits behind a running call past its timeout fails with
    CallTimeoutError and never runs; the running call is not killed for it."""
    gate_path, log = str(tmp_path / "gate"), str(tmp_path / "log")
    with multipy.InterpreterManager(1, backend=backend, call_timeout=0.5) as manager:
        if manager._workers[0].posted_depth == 1:
            pytest.skip("one call in flight at a time here: a posted call waits in the "
                        "dispatcher, where its timeout does not run yet")
        model = movable_rows(manager)
        model(torch.ones(1))  # loaded: the posted call below goes out in one request
        # a blocking call without a timeout holds the interpreter
        blocked = threading.Thread(target=lambda: result.append(
            model.with_timeout(None)(torch.zeros(1), gate=gate_path, log=log, tag="running")))
        result: list = []
        blocked.start()
        wait_for(lambda: logged(log), "the blocking call to start")
        late = model.submit(torch.ones(1), log=log, tag="late")
        with pytest.raises(multipy.CallTimeoutError):
            late.result(timeout=60)
        open_gate(gate_path)
        blocked.join(60)
        assert result and torch.equal(result[0], torch.ones(1))  # not killed
        assert torch.equal(model.submit(torch.ones(1)).result(timeout=60), torch.full((1,), 3.0))
        assert [line[0] for line in logged(log)] == ["running"]  # "late" never ran
        assert manager.statistics().restarts == 0


def test_close_with_posted_calls_in_flight_fails_them_and_hangs_nothing(backend, tmp_path):
    gate_path, log = str(tmp_path / "gate"), str(tmp_path / "log")
    manager = multipy.InterpreterManager(1, backend=backend)
    try:
        model = movable_rows(manager)
        depth = manager._workers[0].posted_depth
        running, queued = queue_behind_a_gated_call(model, gate_path, log, depth + 1)
        wait_for(lambda: manager._workers[0].posted_in_flight == depth, "the queue to fill")
    finally:
        manager.close(timeout=0.5)  # the gated call never ends by itself
    for f in [running] + queued:
        with pytest.raises(multipy.ManagerClosedError):
            f.result(timeout=60)
    open_gate(gate_path)  # an abandoned thread-backend interpreter can finish and exit
    assert [line[0] for line in logged(log)] == ["running"]


BIG_REPLIES = """
import os, time

def echo(value, gate=None):
    while gate is not None and not os.path.exists(gate):
        time.sleep(0.001)
    return value

def big(n):
    return "r" * n
"""


@pytest.mark.parametrize("argument", [b"b" * 200_000, "s" * 200_000], ids=["bytes", "str"])
def test_a_queued_call_with_a_big_request_goes_out_behind_a_big_reply(manager, tmp_path, argument):
    # The completion thread sends the queued call (it pumps as the gated one ends) while
    # the interpreter writes the reply before it, too big for its slot, to the reply
    # pipe that only the completion thread reads: the request, too big for the ring,
    # goes to the request pipe, which the interpreter reads only after that reply.
    manager.register_module_source("_big_replies", BIG_REPLIES)
    with manager.acquire_one() as s:
        echo = s.create_movable(s.global_("_big_replies", "echo"))
        big = s.create_movable(s.global_("_big_replies", "big"))
    assert echo(0) == 0 and big(1) == "r"  # loaded
    gate = str(tmp_path / "gate")
    gated = echo.submit(1, gate)
    reply = big.submit(200_000)
    queued = echo.submit(argument)
    open(gate, "w").close()
    assert gated.result(timeout=60) == 1
    assert reply.result(timeout=60) == "r" * 200_000
    assert queued.result(timeout=60) == argument
