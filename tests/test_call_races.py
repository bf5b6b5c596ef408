"""Calls racing with what changes an interpreter under them: an unload of the
object they call, a restart that outlasts the wait for the calls in flight.

A call made while its object is being unloaded returns its answer (the call
sent before the unload runs before it; one sent after it loads the object
again), never a ``LookupError`` from inside the interpreter.  A blocking caller
that outlives its interpreter's restart (the restart stops waiting for it)
fails with :class:`~multipy.errors.InterpreterCrashedError` and never touches
the replacement's calls.

One interpreter per manager: every call goes to the interpreter under test.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

from _rows import logged, movable_rows, open_gate
from _wait import wait_for
from multipy.errors import InterpreterCrashedError
from multipy.transport.messages import Op

INTERPRETERS = 1


@pytest.fixture(scope="module")
def model(manager):
    return movable_rows(manager)


def _after_unload(worker, then):
    """Wrap ``worker.request``: right after an UNLOAD request returns, and before
    ``unload()`` goes on, run ``then()`` (a call made in that instant)."""
    request = worker.request
    ran = []

    def wrapped(op, *args, **kwargs):
        out = request(op, *args, **kwargs)
        if op == Op.UNLOAD:
            ran.append(then())
        return out

    worker.request = wrapped
    return ran


def test_a_call_made_as_an_unload_ends_loads_the_object_again(manager, model):
    worker = manager._workers[0]
    x = torch.arange(3.0)
    assert torch.equal(model(x), x * 2 + 1)  # loaded
    assert model.loaded_in() == [0]
    ran = _after_unload(worker, lambda: model(x))
    try:
        model.unload()
    finally:
        del worker.request
    assert len(ran) == 1 and torch.equal(ran[0], x * 2 + 1)
    assert model.loaded_in() == [0]  # loaded again by that call
    assert torch.equal(model(x), x * 2 + 1)


def test_a_posted_call_made_as_an_unload_ends_loads_the_object_again(manager, model):
    worker = manager._workers[0]
    x = torch.arange(4.0)
    assert torch.equal(model.submit(x).result(60), x * 2 + 1)
    ran = _after_unload(worker, lambda: model.submit(x))
    try:
        model.unload()
    finally:
        del worker.request
    assert torch.equal(ran[0].result(60), x * 2 + 1)
    assert torch.equal(model.submit(x).result(60), x * 2 + 1)


def test_a_call_sent_while_the_unload_is_in_flight_gets_its_answer(manager, backend, model):
    """(Process backend: the unload's reply is awaited without the worker's lock,
    so calls are sent behind it meanwhile.)"""
    if backend != "process":
        pytest.skip("only the process backend awaits a reply without the worker's lock")
    worker = manager._workers[0]
    x = torch.arange(5.0)
    assert torch.equal(model(x), x * 2 + 1)
    await_call = worker._await_call
    sent = []

    def wrapped(ticket, waited=None):
        if ticket[2] == Op.UNLOAD and not sent:
            sent.append(model.submit(x))  # sent behind the unload, before its reply is read
        return await_call(ticket, waited)

    worker._await_call = wrapped
    try:
        model.unload()
    finally:
        del worker._await_call
    assert torch.equal(sent[0].result(60), x * 2 + 1)
    assert torch.equal(model(x), x * 2 + 1)


def test_a_call_in_flight_across_an_unload_does_not_mark_the_object_loaded_again(
        manager, model, gate):
    """A call sent before the unload whose reply is read after it: the object stays
    marked unloaded, so the next call carries its recipe."""
    worker = manager._workers[0]
    if worker.posted_depth == 1:
        pytest.skip("a posted call holds the interpreter until its reply: nothing is sent behind it")
    gate_path, log = gate
    x = torch.arange(2.0)
    assert torch.equal(model(x), x * 2 + 1)  # loaded
    held = model.submit(x, gate=gate_path, log=log)
    wait_for(lambda: len(logged(log)) == 1, "the gated call to start")
    before = worker._next_call
    unloading = threading.Thread(target=model.unload)
    unloading.start()
    try:
        wait_for(lambda: worker._next_call > before, "the unload to be sent")
    finally:
        open_gate(gate_path)
        unloading.join(60)
    assert torch.equal(held.result(60), x * 2 + 1)
    assert model.loaded_in() == []
    assert torch.equal(model(x), x * 2 + 1)


def test_a_caller_that_outlives_the_restart_wait_fails_and_leaves_the_replacement_alone(
        manager, backend, model, gate, monkeypatch):
    """A blocking caller held between its send and its wait (here: in the worker's
    free hook) while its interpreter dies and is replaced, the restart having
    stopped waiting for it: it fails with InterpreterCrashedError (or returns its
    own answer where it was read before), and the replacement's call with the
    same place in its books gets its own answer from a replacement left running."""
    if backend != "process":
        pytest.skip("only the process backend waits for replies without the worker's lock")
    from multipy.backends import process

    monkeypatch.setattr(process, "_CALLERS_LEAVE", 0.05)  # the restart's wait, shortened
    worker = manager._workers[0]
    x = torch.arange(3.0)
    assert torch.equal(model(x), x * 2 + 1)  # loaded
    hook = worker.on_free
    held, go, stale = threading.Event(), threading.Event(), []
    ident = []

    def hold_once():
        if threading.get_ident() in ident and not held.is_set():
            held.set()
            go.wait(60)
        if hook is not None:
            hook()

    def call():
        ident.append(threading.get_ident())
        try:
            stale.append(model(x))
        except BaseException as exc:
            stale.append(exc)

    worker.on_free = hold_once
    caller = threading.Thread(target=call)
    try:
        caller.start()
        assert held.wait(60), "the caller never sent its call"
        call_id, generation, pid = worker._next_call, worker.generation, worker.pid
        worker.on_free = hook
        os.kill(pid, signal.SIGKILL)
        try:
            model(x)  # finds it dead: resent to the replacement, or fails with the crash
        except InterpreterCrashedError:
            pass
        wait_for(lambda: worker.generation > generation and worker.available,
                 "the interpreter to be replaced")
        # The replacement's books up to the held caller's call id (where ids start
        # again each generation), then a call in flight there.
        while worker._next_call < call_id - 1:
            model(x)
        gate_path, log = gate
        answer = []
        in_flight = threading.Thread(
            target=lambda: answer.append(model(x + 10, gate=gate_path, log=log)))
        in_flight.start()
        wait_for(lambda: len(logged(log)) == 1, "the replacement's call to start")
        replacement = worker.pid
        go.set()
        caller.join(60)
        assert not caller.is_alive()
    finally:
        worker.on_free = hook
        go.set()
        open_gate(gate[0])
    in_flight.join(60)
    assert isinstance(stale[0], InterpreterCrashedError) or torch.equal(stale[0], x * 2 + 1), stale
    assert len(answer) == 1 and torch.equal(answer[0], (x + 10) * 2 + 1)
    assert worker.pid == replacement and worker.generation == generation + 1
    assert torch.equal(model(x), x * 2 + 1)


_COUNT = """
def replicated_count():
    from multipy.interp.state import current_state
    return len(current_state().replicated)
"""


def _replicated_count(manager) -> int:
    """How many replicated objects interpreter 0 holds (the releases queued by the host
    go with this request, before it runs)."""
    with manager.all_instances()[0].acquire_session() as s:
        return s.global_("races_count", "replicated_count")().deref()


def _settled_count(manager) -> int:
    """:func:`_replicated_count` once the objects of earlier tests are collected."""
    import gc

    if "races_count" not in manager.__dict__.setdefault("_test_sources", set()):
        manager.register_module_source("races_count", _COUNT)
        manager._test_sources.add("races_count")
    gc.collect()
    return _replicated_count(manager)


def test_a_handle_dropped_while_its_first_call_runs_leaves_no_copy_behind(manager, gate):
    # The object's last handle goes while the call that loads it runs (a posted call on a
    # temporary handle: `package.load_pickle(...).submit(x)`): the copy that call loaded
    # is released all the same, not kept by the interpreter for ever.
    import gc

    gate_path, log = gate
    before = _settled_count(manager)
    temp = movable_rows(manager)
    x = torch.arange(2.0)
    future = temp.submit(x, gate=gate_path, log=log)  # its first call: loads it
    wait_for(lambda: len(logged(log)) == 1, "the first call to start")
    del temp
    gc.collect()
    open_gate(gate_path)
    assert torch.equal(future.result(60), x * 2 + 1)
    assert _replicated_count(manager) == before


def test_a_handle_dropped_while_its_call_waits_to_be_sent_keeps_the_call_working(
        manager, model, gate):
    # The last handle goes while its posted call waits in the dispatcher's queue (every
    # interpreter busy): the call keeps the object alive until it ends, so it runs (the
    # object's tensors are still shared with it) and the copy it loads is released after.
    import gc

    from _rows import hold_every_interpreter

    if "races_count" not in manager.__dict__.setdefault("_test_sources", set()):
        manager.register_module_source("races_count", _COUNT)
        manager._test_sources.add("races_count")
    gate_path, log = gate
    model(torch.zeros(1))  # loaded: counted in `before`
    gc.collect()
    before = _replicated_count(manager)
    with manager.acquire_one() as s:
        linear = s.global_("torch.nn", "Linear")(2, 2)
        weight, bias = linear.attr("weight").deref(), linear.attr("bias").deref()
        temp = s.create_movable(linear)
    x = torch.ones(1, 2)
    held = hold_every_interpreter(model, manager, gate_path, log)
    try:
        future = temp.submit(x)
        assert not future.running()  # queued: every interpreter is busy
        del temp
        gc.collect()
    finally:
        open_gate(gate_path)
    for f in held:
        f.result(60)
    assert torch.allclose(future.result(60), x @ weight.T + bias)
    del future
    gc.collect()
    assert _replicated_count(manager) == before


def test_a_first_call_answered_while_another_object_unloads_leaves_no_copy_behind(
        manager, gate):
    # b's first call (it loads b) is in flight while a's unload is sent: its reply
    # marks b loaded in the record that unload replaced.  b's copy is released all the
    # same once b's last handle goes, not kept by the interpreter for ever.
    import gc

    worker = manager._workers[0]
    if worker.posted_depth == 1:
        pytest.skip("a call holds the interpreter until its reply: nothing is sent behind it")
    gate_path, log = gate
    before = _settled_count(manager)
    a, b = movable_rows(manager), movable_rows(manager)
    x = torch.arange(3.0)
    assert torch.equal(a(x), x * 2 + 1)
    answers = []
    calling = threading.Thread(target=lambda: answers.append(b(x, gate=gate_path, log=log)))
    calling.start()
    unloading = None
    try:
        wait_for(lambda: len(logged(log)) == 1, "b's first call to start")
        record = worker.materialized
        unloading = threading.Thread(target=a.unload)
        unloading.start()
        wait_for(lambda: worker.materialized is not record, "a's unload to be sent")
    finally:
        open_gate(gate_path)
        calling.join(60)
        if unloading is not None:
            unloading.join(60)
    assert torch.equal(answers[0], x * 2 + 1)
    del a, b, answers
    gc.collect()
    assert _replicated_count(manager) == before
