"""Failure is part of the design: crashes, timeouts, closing and bad input.

The crash table kills the interpreter at every stage of a call, in the style of
loky's crash tests: unpickling the arguments in the interpreter, in the model,
pickling the result.  Every row asserts the error and that the next call works.
Process-only: the other backends cannot survive a crash.  The faults that raise
instead of crashing run on every backend (test_raised_faults.py).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

import multipy
from _faults import OnDump, OnLoad
from _wait import gone, wait_for, wait_started
from multipy.backends.base import RESTART_BACKOFF

INTERPRETERS = 2


@pytest.fixture(scope="module")
def manager():
    with multipy.InterpreterManager(INTERPRETERS, call_timeout=60) as m:
        yield m


@pytest.fixture(scope="module")
def run(manager):
    """A ReplicatedObj of ``_faults.run``: it survives every restart."""
    with manager.acquire_one() as s:
        return s.create_movable(s.global_("_faults", "run"))


def assert_serves(manager, run) -> None:
    x = torch.arange(6.0)
    for _ in range(2 * len(manager)):
        assert torch.equal(run("echo", x), x)


CRASHED = multipy.InterpreterCrashedError
CRASHES = [
    # stage,                 action,  arguments builder
    ("unpickling arguments", "exit", lambda: ("echo", OnLoad("interpreter", "exit"))),
    ("unpickling arguments", "segv", lambda: ("echo", OnLoad("interpreter", "segv"))),
    ("in the model", "exit", lambda: ("model", "exit")),
    ("in the model", "abort", lambda: ("model", "abort")),
    ("in the model", "segv", lambda: ("model", "segv")),
    ("pickling the result", "exit", lambda: ("result_dump", "interpreter", "exit")),
    ("pickling the result", "segv", lambda: ("result_dump", "interpreter", "segv")),
]
EXITS = {"segv": "SIGSEGV(-11)", "abort": "SIGABRT(-6)", "exit": "exited with code 13"}


@pytest.mark.parametrize("stage, action, make_args", CRASHES,
                         ids=[f"{s}-{a}" for s, a, _ in CRASHES])
def test_a_crash_at_each_stage_fails_only_that_call(manager, run, stage, action, make_args):
    before = manager.statistics().restarts
    with pytest.raises(CRASHED) as info:
        run(*make_args())
    err = info.value
    assert err.pid is not None and f"pid {err.pid}" in str(err)
    assert "likely cause" in str(err) and EXITS[action] in str(err)
    assert_serves(manager, run)
    wait_for(lambda: manager.statistics().restarts == before + 1, "the restart")


def test_a_result_that_cannot_cross_names_its_type_and_place(manager):
    with manager.acquire_one() as s:
        make = s.global_("builtins", "eval")
        with pytest.raises(multipy.TransportError) as info:
            make.call_value("{'a': [1, lambda: 0]}")
    assert "result['a'][1]" in str(info.value) and "function" in str(info.value)


def test_arguments_that_cannot_cross_name_their_type_and_place(manager, run):
    with pytest.raises(multipy.TransportError) as info:
        run("echo", {"k": (1, threading.Lock())})
    assert "argument 2 of the call at ['k'][1]" in str(info.value) and "lock" in str(info.value)
    assert_serves(manager, run)


def test_sigkill_while_idle_is_invisible_to_the_next_call(manager, run):
    pid = manager.statistics().interpreters[0].pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), f"pid {pid} to exit")
    manager.debug_limit_interpreters(1)
    try:
        x = torch.ones(3)
        assert torch.equal(run("echo", x), x)  # resent to the replacement, never failed
    finally:
        manager.debug_limit_interpreters(INTERPRETERS)
    assert manager.statistics().interpreters[0].pid != pid


def test_sigkill_during_a_call_fails_only_that_call(manager, run, tmp_path):
    results = {}
    marker = tmp_path / "started"

    def slow():
        try:
            results["slow"] = run("started_then_sleep", str(marker), 60.0)
        except Exception as exc:
            results["slow"] = exc

    with manager.all_instances()[0].acquire_session() as s:
        pid = s.global_("os", "getpid")().deref()
    manager.debug_limit_interpreters(1)
    try:
        t = threading.Thread(target=slow)
        t.start()
        wait_started(marker)
        os.kill(pid, signal.SIGKILL)
        t.join(30)
        assert not t.is_alive(), "the caller hung on a dead interpreter"
        err = results["slow"]
        assert isinstance(err, multipy.InterpreterCrashedError)
        assert "SIGKILL(-9)" in str(err) and "OOM" in str(err)
        assert_serves(manager, run)
    finally:
        manager.debug_limit_interpreters(INTERPRETERS)


def test_obj_handles_into_a_dead_interpreter_raise(manager):
    with manager.all_instances()[1].acquire_session() as s:
        getpid = s.global_("os", "getpid")
        os.kill(getpid().deref(), signal.SIGKILL)
        with pytest.raises(multipy.InterpreterCrashedError, match="SIGKILL"):
            getpid()
        with pytest.raises(multipy.InterpreterCrashedError, match="went down after this session"):
            getpid()
    with manager.all_instances()[1].acquire_session() as s:
        assert s.global_("builtins", "len")([1, 2]).deref() == 2


def test_replicated_objects_survive_restarts(manager):
    with manager.acquire_one() as s:
        linear = s.global_("torch.nn", "Linear")(4, 2)
        model = s.create_movable(linear)
    x = torch.ones(1, 4)
    want = model(x)
    pids = []
    for interp in manager.all_instances():
        with model.acquire_session(interp) as s:
            pids.append(s.global_("os", "getpid")().deref())
            os.kill(pids[-1], signal.SIGKILL)
    wait_for(lambda: all(gone(pid) for pid in pids), "the killed interpreters to exit")
    for _ in range(4):
        assert torch.equal(model(x), want)


def test_a_result_outlives_the_restart_of_the_interpreter_that_made_it(manager):
    interp = manager.all_instances()[0]
    with interp.acquire_session() as s:
        kept = s.global_("torch", "full").call_value((100_000,), 7.0)
        pid = s.global_("os", "getpid")().deref()
    assert multipy.shared_location(kept) is not None  # a view of the interpreter's results
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), f"pid {pid} to exit")
    with interp.acquire_session() as s:  # the replacement fills its own results
        full = s.global_("torch", "full")
        for i in range(5):
            assert torch.equal(full.call_value((100_000,), float(i)), torch.full((100_000,), float(i)))
        assert s.global_("os", "getpid")().deref() != pid
    assert torch.equal(kept, torch.full((100_000,), 7.0))


def test_a_call_past_its_timeout_kills_the_interpreter_and_raises(manager, run):
    with pytest.raises(TimeoutError) as info:
        run.with_timeout(0.5)("sleep", 30.0)
    assert isinstance(info.value, multipy.CallTimeoutError)
    assert "timeout of 0.5 s" in str(info.value)
    assert_serves(manager, run)


def test_manager_wide_call_timeout():
    with multipy.InterpreterManager(1, call_timeout=0.5) as m:
        with m.acquire_one() as s:
            sleep = s.global_("time", "sleep")
            with pytest.raises(multipy.CallTimeoutError, match="timeout of 0.5 s"):
                sleep(600)
        with m.acquire_one() as s:
            assert s.global_("builtins", "abs")(-2).deref() == 2
        assert m.statistics().restarts == 1


# Imported by each interpreter on every (re)start: the fork server, where preload modules
# are otherwise imported once for all, is refused it (an ImportError there is skipped).
DIES_WHEN_FLAGGED = """
import os, sys
import multipy
if multipy.interpreter_id() is None:
    raise ImportError("not in the fork server")
here = os.path.dirname(__file__)
with open(os.path.join(here, "attempts"), "a") as log:
    log.write("start\\n")
if os.path.exists(os.path.join(here, "flag")):
    os._exit(7)
"""


def test_an_interpreter_dying_at_every_start_is_given_up_with_the_reason(tmp_path, monkeypatch):
    # A preloaded module imported on every (re)start; once flagged it kills the interpreter.
    (tmp_path / "dies_when_flagged.py").write_text(DIES_WHEN_FLAGGED)
    monkeypatch.syspath_prepend(str(tmp_path))
    attempts = tmp_path / "attempts"
    delays = []
    real_sleep = time.sleep
    monkeypatch.setattr(time, "sleep", lambda s: (delays.append(s), real_sleep(s))[1])
    with multipy.InterpreterManager(1, preload=("dies_when_flagged",)) as m:
        (tmp_path / "flag").touch()
        with m.acquire_one() as s:
            with pytest.raises(multipy.InterpreterCrashedError, match="exited with code 7"):
                s.exec_("import os; os._exit(7)")
        for _ in range(10):
            with m.acquire_one() as s:
                try:
                    s.exec_("result = 1")
                except multipy.InterpreterStartError as exc:
                    last = exc
                    if "will not be restarted" in str(exc):
                        break
        assert "failed to start 5 times in a row" in str(last)
        assert "exited with code 7" in str(last)
        starts = attempts.read_text().count("start")
        assert starts == 1 + 5  # the first start, then five failed restarts
        backoffs = [d for d in delays if d >= RESTART_BACKOFF]
        assert len(backoffs) >= 3 and backoffs == sorted(backoffs) and backoffs[-1] > backoffs[0]
        for _ in range(3):  # a verdict, not another restart loop
            with m.acquire_one() as s:
                with pytest.raises(multipy.InterpreterStartError, match="will not be restarted"):
                    s.exec_("result = 1")
        assert attempts.read_text().count("start") == starts


def test_preload_failure_names_the_module():
    with pytest.raises(multipy.InterpreterStartError) as info:
        multipy.InterpreterManager(1, preload=("no_such_module_xyz",))
    assert "no_such_module_xyz" in str(info.value)
    with multipy.InterpreterManager(1, preload=("json",)) as m:
        with m.acquire_one() as s:
            assert s.exec_("import sys; result = 'json' in sys.modules")


def test_close_waits_then_kills_and_calls_after_close_raise(tmp_path):
    m = multipy.InterpreterManager(1)
    marker = tmp_path / "started"
    with m.acquire_one() as s:
        sleep = s.global_("_faults", "run")
        outcome = {}

        def call():
            try:
                sleep("started_then_sleep", str(marker), 600)
                outcome["r"] = "returned"
            except Exception as exc:
                outcome["r"] = exc

        t = threading.Thread(target=call)
        t.start()
        wait_started(marker)
        m.close(timeout=0.5)
        t.join(60)
    assert not t.is_alive(), "close() left the caller hanging"
    assert isinstance(outcome["r"], multipy.ManagerClosedError)
    assert "closed while interpreter 0" in str(outcome["r"])
    m.close()  # idempotent
    with pytest.raises(multipy.ManagerClosedError, match="closed"):
        m.acquire_one()
    with pytest.raises(multipy.ManagerClosedError, match="closed"):
        m.load_package(__file__)


def test_statistics_count_restarts_and_failures(manager, run):
    import dataclasses

    before = manager.statistics()
    manager.debug_limit_interpreters(1)
    try:
        with pytest.raises(RuntimeError, match="injected fault"):
            run("model", "raise")
        pid = run("pid")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: gone(pid), f"pid {pid} to exit")
        assert run("pid") != pid  # served by its replacement
    finally:
        manager.debug_limit_interpreters(INTERPRETERS)
    after = manager.statistics()
    first, then = before.interpreters[0], after.interpreters[0]
    assert then.restarts == first.restarts + 1 and after.restarts == before.restarts + 1
    assert then.generation == first.generation + 1
    assert then.failures == first.failures + 1
    assert all(i.pid for i in after.interpreters)
    with pytest.raises(dataclasses.FrozenInstanceError):
        after.restarts = 0


def test_a_pickle_that_raises_while_loading_leaves_the_manager_usable(tmp_path, manager):
    from torch.package import PackageExporter

    path = tmp_path / "raises.pt"
    with PackageExporter(str(path)) as exporter:
        exporter.intern("**")
        exporter.save_source_string("boom", "def explode():\n    raise KeyError('from the pickle')\n")
        exporter.save_source_string("holder", "import boom\nclass Holder:\n    def __reduce__(self):\n        return (boom.explode, ())\n")
        exporter.save_binary("model", "model.pkl", _pickle_calling("boom", "explode"))
    package = manager.load_package(path)
    with pytest.raises(KeyError, match="from the pickle"):
        package.load_pickle("model", "model.pkl")
    with manager.acquire_one() as s:
        assert s.global_("builtins", "max")(1, 5).deref() == 5


def _pickle_calling(module: str, name: str) -> bytes:
    import pickle

    return b"\x80\x04" + pickle.GLOBAL + f"{module}\n{name}\n".encode() + b")R."


def test_truncated_and_corrupt_archives_raise_package_error(tmp_path, manager, examples):
    data = open(examples["simple"], "rb").read()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(multipy.PackageError, match="truncated.pt"):
        manager.load_package(truncated)
    corrupt = tmp_path / "corrupt.pt"
    flipped = bytearray(data)
    middle = len(flipped) // 3
    flipped[middle:middle + 64] = bytes(64)
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(multipy.PackageError, match="corrupt.pt"):
        manager.load_package(corrupt)
