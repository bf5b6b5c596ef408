"""What only the ``thread`` backend does: interpreters that are threads of the host.

Tensors and weights are shared by reference (no copy at all), each interpreter
still has its own copy of every registered module and package module, each
runs on its own thread (``interpreter_id()``, grad mode and intra-op threads
are per thread), and a call past its timeout abandons the thread instead of
hanging.  The general behaviour of the backend is checked by the whole suite,
which runs on ``thread`` through the ``manager`` fixture.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import multipy
from _wait import wait_for, wait_started
from multipy import InterpreterManager, PathEnvironment
from multipy.backends.base import BackendKind
from multipy.backends.capabilities import detect, why_unavailable

_why = why_unavailable(BackendKind.THREAD, detect())
pytestmark = pytest.mark.skipif(_why is not None, reason=f"the thread backend is unavailable: {_why}")

HELPERS = """
import threading
import time

import torch

COUNTER = 0

def ident(x):
    return x

def bump():
    global COUNTER
    COUNTER += 1
    return COUNTER

def thread_name():
    return threading.current_thread().name

def grad_state():
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled())

def sleep(seconds):
    time.sleep(seconds)
    return seconds

def started_then_sleep(path, seconds):
    open(path, "w").close()  # the test waits for this file: the call is running
    time.sleep(seconds)
    return seconds

def add_one_(t):
    t.add_(1)
"""

USER = """
import thread_helpers

def bump_through_helpers():
    return thread_helpers.bump()
"""


@pytest.fixture(scope="module")
def threads():
    with InterpreterManager(2, backend="thread") as manager:
        manager.register_module_source("thread_helpers", HELPERS)
        manager.register_module_source("thread_user", USER)
        yield manager


def _sessions(manager):
    return [interp.acquire_session() for interp in manager.all_instances()]


def test_the_manager_reports_the_thread_backend(threads):
    assert threads.backend == "thread"
    assert threads.backend_choice.startswith("thread")
    assert threads.statistics().backend == "thread"
    assert [interp.pid for interp in threads.all_instances()] == [None, None]


def test_a_tensor_crosses_by_reference_both_ways(threads):
    x = torch.arange(16.0).reshape(1, 16)
    with threads.acquire_one() as s:
        out = s.global_("thread_helpers", "ident").call_value(x)
        nested = s.global_("thread_helpers", "ident").call_value({"a": [x], "b": (1, x)})
        # no copy at all: an in-place write inside the interpreter is the caller's tensor
        s.global_("thread_helpers", "add_one_")(x)
    assert out.data_ptr() == x.data_ptr()
    assert nested["a"][0].data_ptr() == nested["b"][1].data_ptr() == x.data_ptr()
    assert torch.equal(x, torch.arange(1.0, 17.0).reshape(1, 16))


def test_a_replicated_call_returns_the_input_storage_for_an_identity_function(threads):
    with threads.acquire_one() as s:
        ident = s.create_movable(s.global_("thread_helpers", "ident"))
    x = torch.rand(3, 224, 224)
    for _ in range(len(threads)):
        assert ident(x).data_ptr() == x.data_ptr()


def test_package_weights_are_one_storage_shared_by_reference(threads, examples):
    model = threads.load_package(examples["simple"]).load_pickle("model", "model.pkl")
    weights, classes = [], []
    for interp in threads.all_instances():
        with model.acquire_session(interp) as s:
            weights.append(s.self.attr("weight").deref())
            classes.append(s.global_("builtins", "id")(s.self.attr("__class__")).deref())
    assert weights[0].data_ptr() == weights[1].data_ptr() != 0
    assert weights[0].untyped_storage().data_ptr() == weights[1].untyped_storage().data_ptr()
    assert multipy.shared_location(weights[0]) == multipy.shared_location(weights[1]) is not None
    # ... while each interpreter has its own copy of the package's interned modules
    assert classes[0] != classes[1]


def test_a_movable_shares_its_tensors_by_reference(threads):
    first, second = threads.all_instances()
    with first.acquire_session() as s:
        linear = s.global_("torch.nn", "Linear")(4, 3)
        original = linear.attr("weight").deref()
        movable = s.create_movable(linear)
    with movable.acquire_session(second) as s:
        there = s.self.attr("weight").deref()
        same_module = s.global_("builtins", "id")(s.self).deref()
    assert there.data_ptr() == original.data_ptr()
    with movable.acquire_session(first) as s:
        assert s.global_("builtins", "id")(s.self).deref() != same_module


def test_each_interpreter_has_its_own_registered_module_objects(threads):
    a, b = _sessions(threads)
    with a, b:
        modules = [s.global_("importlib", "import_module")("thread_helpers") for s in (a, b)]
        module_ids = [s.global_("builtins", "id")(m).deref() for s, m in zip((a, b), modules)]
        add = [s.global_("thread_helpers", "ident") for s in (a, b)]
        assert module_ids[0] != module_ids[1]
        assert a.global_("builtins", "id")(add[0]).deref() != b.global_("builtins", "id")(add[1]).deref()
        before = b.global_("thread_helpers", "COUNTER").deref()
        a.global_("thread_helpers", "bump")()
        a.global_("thread_helpers", "bump")()
        assert b.global_("thread_helpers", "COUNTER").deref() == before
        # a registered module imported by registered code is the same interpreter's copy
        after_a = a.global_("thread_user", "bump_through_helpers")().deref()
        assert after_a == a.global_("thread_helpers", "COUNTER").deref()
        assert b.global_("thread_helpers", "COUNTER").deref() == before
        # and so is an import statement run inside the interpreter
        assert a.exec_("import thread_helpers\nresult = thread_helpers.COUNTER") == after_a
        assert b.exec_("from thread_helpers import COUNTER as result") == before


def test_registered_modules_never_enter_sys_modules(threads):
    with threads.acquire_one() as s:
        assert s.global_("thread_helpers", "bump")().deref() >= 1
        assert s.exec_("import sys\nresult = 'thread_helpers' in sys.modules") is False
    assert "thread_helpers" not in sys.modules
    assert importlib.util.find_spec("thread_helpers") is None
    with pytest.raises(ModuleNotFoundError):
        import thread_helpers  # noqa: F401


def test_interpreter_id_and_thread_are_per_interpreter(threads):
    assert multipy.interpreter_id() is None
    for interp in threads.all_instances():
        with interp.acquire_session() as s:
            assert s.global_("multipy", "interpreter_id")().deref() == interp.index
            name = s.global_("thread_helpers", "thread_name")().deref()
            assert name == f"multipy-interpreter-{interp.index}"
    assert multipy.interpreter_id() is None


def test_the_callers_grad_mode_applies_on_the_interpreter_thread(threads):
    with threads.acquire_one() as s:
        grad_state = s.global_("thread_helpers", "grad_state")
        assert grad_state().deref() == (True, False)
        with torch.no_grad():
            assert grad_state().deref() == (False, False)
        with torch.inference_mode():
            assert grad_state().deref() == (False, True)
        assert grad_state().deref() == (True, False)


def test_concurrent_callers_get_their_own_results(threads, examples):
    model = threads.load_package(examples["simple"]).load_pickle("model", "model.pkl")
    inputs = [torch.rand(10, 20) for _ in range(4)]
    expected = [model(x) for x in inputs]
    failures = []

    def run(i):
        for _ in range(50):
            if not torch.equal(model(inputs[i]), expected[i]):
                failures.append(i)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert failures == []


def test_a_timeout_abandons_the_interpreter_thread_and_never_hangs():
    before = set(threading.enumerate())

    def interpreter_threads():
        return [t for t in threading.enumerate()
                if t not in before and t.name.startswith("multipy-interpreter-")]

    with InterpreterManager(1, backend="thread", call_timeout=0.3) as manager:
        manager.register_module_source("thread_helpers", HELPERS)
        with manager.acquire_one() as s:
            sleep = s.global_("thread_helpers", "sleep")
            with pytest.raises(multipy.CallTimeoutError, match="abandoned") as info:
                sleep(2.0)
            assert isinstance(info.value, TimeoutError)
            with pytest.raises(multipy.MultipyError, match="interpreter 0"):
                sleep(0)  # its handles went with the abandoned interpreter
        with manager.acquire_one() as s:  # a fresh interpreter serves the next call
            assert s.global_("thread_helpers", "sleep")(0.01).deref() == 0.01
        assert manager.statistics().restarts == 1
        # the abandoned thread finished its call and exited; its replacement serves
        wait_for(lambda: len(interpreter_threads()) == 1, "the abandoned thread to exit")


def test_closing_during_a_call_wakes_the_caller(tmp_path):
    manager = InterpreterManager(1, backend="thread")
    manager.register_module_source("thread_helpers", HELPERS)
    marker = tmp_path / "started"
    errors = []

    def call():
        try:
            with manager.acquire_one() as s:
                s.global_("thread_helpers", "started_then_sleep")(str(marker), 600.0)
        except multipy.ManagerClosedError as exc:
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    wait_started(marker)
    manager.close(timeout=0.2)  # the call outlives the grace period
    caller.join(60)
    assert not caller.is_alive(), "close() left the caller hanging"
    assert len(errors) == 1 and "closed while interpreter 0" in str(errors[0])


def test_a_path_environment_is_searched_by_interpreter_threads(tmp_path):
    (tmp_path / "multipy_env_only_xyz.py").write_text("VALUE = 17\n")
    assert importlib.util.find_spec("multipy_env_only_xyz") is None
    try:
        with InterpreterManager(1, PathEnvironment(tmp_path), backend="thread") as manager:
            with manager.acquire_one() as s:
                assert s.global_("multipy_env_only_xyz", "VALUE").deref() == 17
    finally:
        sys.modules.pop("multipy_env_only_xyz", None)  # imported once for the whole process
    assert str(tmp_path) not in sys.path


def test_the_host_is_left_as_it_was_after_close():
    script = textwrap.dedent("""
        import importlib._bootstrap as bootstrap, sys, threading, torch
        from multipy import InterpreterManager
        original = bootstrap._find_and_load
        meta_path = list(sys.meta_path)
        def fresh_thread_threads():
            out = []
            t = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
            t.start(); t.join()
            return out[0]
        host_threads, new_threads = torch.get_num_threads(), fresh_thread_threads()
        with InterpreterManager(2, backend="thread", num_threads=1) as m:
            m.register_module_source("leftover", "X = 1")
            with m.acquire_one() as s:
                inside = s.global_("torch", "get_num_threads")().deref()
                assert s.global_("leftover", "X").deref() == 1
        assert inside == 1, inside
        assert bootstrap._find_and_load is original
        assert sys.meta_path == meta_path
        assert "leftover" not in sys.modules
        assert torch.get_num_threads() == host_threads
        assert fresh_thread_threads() == new_threads, (fresh_thread_threads(), new_threads)
        assert not [t for t in threading.enumerate() if t.name.startswith("multipy-interpreter")]
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
