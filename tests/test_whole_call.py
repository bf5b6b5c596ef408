"""A replicated object's blocking call, made in one C call where the extension
can (``_native.call_replicated``), behaves exactly as the Python path: every
caller gets its own answer, errors keep their type, and the statistics count
every call, failure and latency; anything but the common call (a first load,
an argument the binary call does not carry) goes back to the Python path.

The Python path is ``manager._call_replicated``, what ``ReplicatedObj.__call__``
runs without the extension (``MULTIPY_NATIVE=0``, the thread backend)."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

from _interrupting import (balancer_counts, interrupted_while_waiting,  # noqa: F401 (a fixture)
                           sigusr1_raises_keyboard_interrupt)
from _wait import wait_for
from multipy.runtime import replicated

INTERPRETERS = 2

_HELPERS = '''
import torch


def echo_or_raise(x):
    """x + 0 (a new tensor), or ValueError for a tensor with a negative entry."""
    if bool((x < 0).any()):
        raise ValueError(f"negative entry in {x.tolist()}")
    return x + 0
'''


# The interpreter's side of the gate (see _interrupting.Gate), with its directory
# written in: the call itself carries only a tensor, as the common call does.
_GATE = '''
import os

DIRECTORY = {directory!r}


def gated(x):
    with open(os.path.join(DIRECTORY, "started"), "w") as f:
        f.write("s")
    with open(os.path.join(DIRECTORY, "release")) as f:
        f.read()
    return x + 0
'''
_gates = itertools.count()


@pytest.fixture(scope="module")
def model(manager):
    manager.register_module_source("whole_call_helpers", _HELPERS)
    with manager.acquire_one() as s:
        obj = s.create_movable(s.global_("whole_call_helpers", "echo_or_raise"))
    obj.load_everywhere()
    return obj


def _python_path(model, *args):
    return model._manager._call_replicated(model, None, args, {}, None)


def _totals(manager):
    stats = manager.statistics().interpreters
    return (sum(i.calls for i in stats), sum(i.failures for i in stats),
            sum(i.in_flight for i in stats),
            sum(len(w.latencies) for w in manager._workers))


def _native_here(manager) -> bool:
    return replicated._call_replicated is not None and all(
        w._caller is not None for w in manager._workers)


@pytest.mark.parametrize("call", [lambda m, x: m(x), _python_path], ids=["call", "python_path"])
def test_statistics_count_every_call_and_failure_on_both_paths(manager, model, call):
    for w in manager._workers:  # latencies are cut to 2048 past 4096: stay below
        del w.latencies[:]
    calls, failures, in_flight, latencies = _totals(manager)
    for i in range(6):
        assert torch.equal(call(model, torch.full((4,), float(i))), torch.full((4,), float(i)))
    for i in range(3):
        with pytest.raises(ValueError, match="negative entry"):
            call(model, torch.full((2,), -1.0 - i))
    assert _totals(manager) == (calls + 9, failures + 3, 0, latencies + 9)


def test_every_thread_gets_its_own_answer(manager, model):
    threads, calls = 16, 40
    wrong: list = []
    before = _totals(manager)

    def caller(t: int) -> None:
        for i in range(calls):
            x = torch.full((3,), float(t * 1000 + i))
            try:
                out = model(x)
            except BaseException as exc:  # reported below, not lost in a thread
                wrong.append((t, i, repr(exc)))
                return
            if not torch.equal(out, x):
                wrong.append((t, i, out.tolist()))

    pool = [threading.Thread(target=caller, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert wrong == []
    after = _totals(manager)
    assert after[0] - before[0] == threads * calls
    assert after[1:3] == (before[1], 0)


def test_errors_of_the_common_call_keep_their_type_and_leave_the_interpreter_usable(manager, model):
    for _ in range(3):
        with pytest.raises(ValueError, match=r"negative entry in \[-5.0\]") as info:
            model(torch.tensor([-5.0]))
        assert "echo_or_raise" in str(info.value.__cause__)  # the interpreter's traceback
    assert torch.equal(model(torch.ones(2)), torch.ones(2))


def test_the_common_call_never_takes_the_python_path(manager, model, monkeypatch):
    if not _native_here(manager):
        pytest.skip(f"the {manager.backend} backend (or MULTIPY_NATIVE=0) has no Caller: "
                    "every call takes the Python path")
    taken: list = []
    python_path = manager._call_replicated

    def counting(*args):
        taken.append(args[5:])  # the interpreter it was handed, if any
        return python_path(*args)

    monkeypatch.setattr(manager, "_call_replicated", counting)
    x = torch.ones(3)
    for _ in range(20):
        assert torch.equal(model(x), x)
    assert taken == []
    # A str argument is not in the binary call: the Python path sends it, on the
    # interpreter the C call already took, and gives that one back.
    with pytest.raises(TypeError):
        model("not a tensor")
    assert len(taken) == 1 and len(taken[0]) == 1
    assert _totals(manager)[2] == 0


def test_a_caller_interrupted_while_the_c_call_waits_leaves_nothing_behind(manager, model,
                                                                            monkeypatch):
    if not _native_here(manager):
        pytest.skip(f"the {manager.backend} backend (or MULTIPY_NATIVE=0) has no Caller: "
                    "tests/test_interrupts.py covers the Python path")
    counts = balancer_counts(manager)
    failures = _totals(manager)[1]
    taken: list = []
    python_path = manager._call_replicated

    def call(directory):
        name = f"whole_call_gate_{next(_gates)}"
        manager.register_module_source(name, _GATE.format(directory=directory))
        with manager.acquire_one() as s:
            gated = s.create_movable(s.global_(name, "gated"))
        gated.load_everywhere()
        monkeypatch.setattr(manager, "_call_replicated",
                            lambda *args: taken.append(args) or python_path(*args))
        gated(torch.ones(2))  # waits in the interpreter until the caller has left

    interrupted_while_waiting(call)
    monkeypatch.undo()
    assert taken == []  # the interrupted call was the C path's
    for worker in manager._workers:
        assert not worker._callers, "the interrupted caller is still counted as waiting"
    assert balancer_counts(manager) == counts
    assert _totals(manager)[1] == failures + 1
    for i in range(8):  # the next call on its interpreter settles the reply left behind
        x = torch.full((2,), float(i))
        assert torch.equal(model(x), x)
    for worker in manager._workers:
        wait_for(lambda: not worker._owed and not worker._left,
                 "the interrupted call's reply to be settled")
