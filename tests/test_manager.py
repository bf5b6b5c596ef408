"""InterpreterManager: construction, lifetime, load balancing and statistics.

torch::deploy's InitManagerBasic, InitTwice and MissingInterpreter, plus the
host-side guarantees (close is idempotent, ``with`` closes,
``statistics()`` is a frozen snapshot).  Lifetime tests necessarily start their
own small managers; everything else shares the module's ``manager``.
"""

from __future__ import annotations

import dataclasses
import gc
import threading
import weakref

import pytest
import torch

import multipy
from _wait import gone, wait_for
from multipy import InterpreterManager
from multipy.backends.base import BackendKind
from multipy.backends.capabilities import detect, why_unavailable


def _sum_in(session) -> int:
    return session.global_("builtins", "sum")([1, 2, 3]).deref()


# -- lifetime ----------------------------------------------------------------------


def test_manager_of_one_starts_and_imports_a_module_registered_before_use(backend):
    with InterpreterManager(1, backend=backend) as manager:
        assert len(manager) == 1
        assert [i.index for i in manager.all_instances()] == [0]
        manager.register_module_source("basic_registered", "VALUE = 41\ndef get():\n    return VALUE + 1\n")
        with manager.acquire_one() as s:
            assert s.interpreter_index == 0
            assert s.global_("basic_registered", "VALUE").deref() == 41
            assert s.global_("basic_registered", "get")().deref() == 42


def test_managers_of_two_then_one_start_and_close_in_one_process(backend):
    first = InterpreterManager(2, backend=backend)
    try:
        assert len(first) == 2
        with first.acquire_one() as s:
            assert _sum_in(s) == 6
    finally:
        first.close()
    assert first.closed
    second = InterpreterManager(1, backend=backend)
    try:
        assert len(second) == 1
        with second.acquire_one() as s:
            assert _sum_in(s) == 6
    finally:
        second.close()
    assert second.closed


def test_close_is_idempotent_and_with_closes(backend):
    with InterpreterManager(1, backend=backend) as manager:
        assert not manager.closed
        with manager.acquire_one() as s:
            assert _sum_in(s) == 6
    assert manager.closed
    manager.close()
    manager.close()
    assert manager.closed
    assert "closed" in repr(manager)


def test_every_call_after_close_raises_manager_closed_error(backend, examples):
    manager = InterpreterManager(1, backend=backend)
    interp = manager.all_instances()[0]
    model = manager.load_package(examples["simple"]).load_pickle("model", "model.pkl")
    session = manager.acquire_one()
    obj = session.global_("builtins", "len")
    manager.close()

    closed = "closed"
    with pytest.raises(multipy.ManagerClosedError, match=closed):
        manager.acquire_one()
    with pytest.raises(multipy.ManagerClosedError, match=closed):
        interp.acquire_session()
    with pytest.raises(multipy.ManagerClosedError, match=closed):
        manager.load_package(examples["simple"])
    with pytest.raises(multipy.ManagerClosedError, match=closed):
        manager.register_module_source("late", "X = 1")
    with pytest.raises(multipy.ManagerClosedError, match=closed):
        model(torch.rand(10, 20))
    with pytest.raises(multipy.ManagerClosedError, match=closed):
        model.hasattr("forward")
    with pytest.raises(multipy.ManagerClosedError, match=closed):
        obj([1, 2])
    session.close()
    assert issubclass(multipy.ManagerClosedError, RuntimeError)


def test_a_manager_dropped_without_close_stops_its_interpreters(backend):
    before = set(threading.enumerate())
    manager = InterpreterManager(2, backend=backend)
    with manager.acquire_one() as s:
        assert _sum_in(s) == 6
    pids = [interp.pid for interp in manager.all_instances() if interp.pid is not None]
    dropped = weakref.ref(manager)
    del manager, s
    gc.collect()
    assert dropped() is None, "something still holds the manager"

    def stopped() -> bool:
        left = [t for t in threading.enumerate()
                if t not in before and t.name.startswith("multipy-")]
        return not left and all(gone(pid) for pid in pids)

    wait_for(stopped, "the dropped manager's interpreters to stop")


@pytest.mark.parametrize("n", [0, -1])
def test_a_manager_without_interpreters_is_a_value_error(n):
    with pytest.raises(ValueError, match="at least one interpreter"):
        InterpreterManager(n)


def test_an_unknown_backend_is_refused_naming_the_choices():
    with pytest.raises(multipy.BackendUnavailableError) as info:
        InterpreterManager(1, backend="no-such-backend")
    message = str(info.value)
    assert "no-such-backend" in message
    for choice in ("process", "thread", "subinterpreter", "auto"):
        assert choice in message


def test_an_unavailable_backend_is_refused_at_construction_with_the_reason():
    why = why_unavailable(BackendKind.SUBINTERPRETER, detect())
    if why is None:
        pytest.skip("the subinterpreter backend can run on this Python")
    with pytest.raises(multipy.BackendUnavailableError) as info:
        InterpreterManager(1, backend="subinterpreter")
    assert why in str(info.value)


def test_auto_picks_a_backend_and_says_why():
    with InterpreterManager(1, backend="auto") as manager:
        expected = "thread" if detect().free_threaded else "process"
        assert manager.backend == expected
        assert manager.backend_choice.startswith(f"{expected}: chosen by auto")
        with manager.acquire_one() as s:
            assert _sum_in(s) == 6


# -- the module's shared manager --------------------------------------------------


def test_len_and_all_instances_describe_the_pool(manager):
    assert len(manager) == 2
    interps = manager.all_instances()
    assert [i.index for i in interps] == [0, 1]
    assert manager.backend in ("process", "thread")
    if manager.backend == "process":
        pids = [i.pid for i in interps]
        assert all(isinstance(p, int) for p in pids)
        assert len(set(pids)) == 2


def test_debug_limit_interpreters_sends_every_call_to_interpreter_zero(manager, examples):
    model = manager.load_package(examples["simple"]).load_pickle("model", "model.pkl")
    x = torch.rand(10, 20)
    manager.debug_limit_interpreters(1)
    try:
        before = manager.statistics().interpreters
        for _ in range(6):
            model(x)
        for _ in range(3):
            with manager.acquire_one() as s:
                assert s.interpreter_index == 0
                assert _sum_in(s) == 6
        after = manager.statistics().interpreters
    finally:
        manager.debug_limit_interpreters(len(manager))
    assert after[1].calls == before[1].calls
    # 6 model calls + 3 sessions x (global_, call, deref)
    assert after[0].calls - before[0].calls == 6 + 3 * 3

    # With the limit lifted, serial calls spread over both again.
    before = manager.statistics().interpreters
    for _ in range(6):
        model(x)
    after = manager.statistics().interpreters
    assert after[0].calls > before[0].calls and after[1].calls > before[1].calls


def test_statistics_is_a_frozen_per_interpreter_snapshot(manager):
    stats = manager.statistics()
    assert isinstance(stats, multipy.ManagerStatistics)
    assert dataclasses.is_dataclass(stats)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.backend = "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.interpreters[0].calls = 0
    assert stats.backend == manager.backend
    assert [i.index for i in stats.interpreters] == [0, 1]
    assert all(isinstance(i, multipy.InterpreterStatistics) for i in stats.interpreters)

    interp1 = manager.all_instances()[1]
    with interp1.acquire_session() as s:
        assert _sum_in(s) == 6  # three requests: global_, call, deref
        with pytest.raises(ValueError, match="not a number"):
            s.global_("builtins", "int")("not a number")  # two requests, one fails
    later = manager.statistics()
    assert later.interpreters[1].calls - stats.interpreters[1].calls == 5
    assert later.interpreters[1].failures - stats.interpreters[1].failures == 1
    assert later.interpreters[0].calls == stats.interpreters[0].calls
    assert later.interpreters[0].failures == stats.interpreters[0].failures
    assert later.calls == sum(i.calls for i in later.interpreters)
    assert later.failures == sum(i.failures for i in later.interpreters)
    assert later.restarts == 0
    assert all(i.in_flight == 0 for i in later.interpreters)
    assert later.interpreters[1].p50_latency > 0
    assert later.interpreters[1].p50_latency <= later.interpreters[1].p99_latency
    # a snapshot: the earlier object did not change
    assert stats.interpreters[1].calls + 5 == later.interpreters[1].calls


def test_statistics_count_in_flight_sessions(manager):
    with manager.acquire_one() as s:
        busy = manager.statistics().interpreters[s.interpreter_index]
        assert busy.in_flight == 1
    assert manager.statistics().interpreters[s.interpreter_index].in_flight == 0


def test_acquire_one_puts_concurrent_sessions_on_different_interpreters(manager):
    for _ in range(3):
        with manager.acquire_one() as a, manager.acquire_one() as b:
            assert {a.interpreter_index, b.interpreter_index} == {0, 1}
            here = a.global_("multipy", "interpreter_id")().deref()
            there = b.global_("multipy", "interpreter_id")().deref()
            assert (here, there) == (a.interpreter_index, b.interpreter_index)
            # A third session never blocks: it shares the least loaded one.
            with manager.acquire_one() as c:
                assert c.interpreter_index in (0, 1)
                assert _sum_in(c) == 6


def test_interpreter_id_is_the_index_inside_each_interpreter_and_none_in_the_host(manager):
    for interp in manager.all_instances():
        with interp.acquire_session() as s:
            assert s.interpreter_index == interp.index
            assert s.global_("multipy", "interpreter_id")().deref() == interp.index
    assert multipy.interpreter_id() is None


def test_interpreter_device_spreads_interpreters_over_the_gpus_like_gpuwrapper(manager):
    """Interpreter i gets cuda:(i mod n) (deploy's GPUWrapper routing); naming n GPUs
    checks the placement on a machine without any."""
    for interp in manager.all_instances():
        with interp.acquire_session() as s:
            device = s.global_("multipy", "interpreter_device")
            assert str(device(2).deref()) == f"cuda:{interp.index % 2}"
            assert str(device(0).deref()) == "cpu"
    assert str(multipy.interpreter_device(3)) == "cuda:0"  # the host counts as interpreter 0


def test_torch_version_interp_is_the_index_inside_each_interpreter(manager):
    if manager.backend == "thread":
        pytest.skip("thread interpreters share one torch module, so torch.version.interp "
                    "cannot differ between them")
    for interp in manager.all_instances():
        with interp.acquire_session() as s:
            assert s.global_("torch.version", "interp").deref() == interp.index
    assert not hasattr(torch.version, "interp")


def test_process_backend_says_it_needs_numpy_when_numpy_is_missing():
    import dataclasses

    from multipy.backends.capabilities import detect, why_unavailable

    caps = dataclasses.replace(detect(), numpy=False)
    assert "needs numpy" in why_unavailable(BackendKind.PROCESS, caps)
