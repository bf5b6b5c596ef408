"""The ``subinterpreter`` backend: own-GIL CPython subinterpreters for torch-free work.

Runs under CPython 3.13+ without torch or numpy (``make test-subinterpreters``
builds ``.venv313`` for it).  What the backend cannot do is checked as a clear
error rather than skipped: loading a torch package, importing torch inside.
Crash isolation is process-only, so no crash test lives here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
import threading
import zipfile

import pytest

if sys.version_info < (3, 13):
    pytest.skip("the subinterpreter backend needs CPython 3.13+ (own-GIL `_interpreters`); "
                "run `make test-subinterpreters`, which uses pyenv's 3.13",
                allow_module_level=True)

import multipy
import _stall
from _faults import RAISES
from _wait import wait_for, wait_started
from multipy import (BackendUnavailableError, CallTimeoutError, InterpreterError,
                     InterpreterManager, ManagerClosedError, OwnershipError, TransportError)
from multipy.backends.base import BackendKind
from multipy.backends.capabilities import Capabilities, detect, resolve_backend, why_unavailable

HELPERS = '''
import sys

COUNTER = 0

def bump(by=1):
    global COUNTER
    COUNTER += by
    return COUNTER

def boom(message):
    raise ValueError(message)   # the line the host must see

class LocalError(Exception):
    pass

def local_boom():
    raise LocalError("only this interpreter knows the type")

def echo(value):
    return value

def kinds(*values):
    return [type(v).__name__ for v in values]

def poke(view):
    view[0] = 0x41
    return (type(view).__name__, view.readonly, len(view))

def loaded_native():
    return sorted(m for m in ("numpy", "torch") if m in sys.modules)

def spin():
    while True:
        pass

def mark_then_spin(path):
    open(path, "w").close()  # the test waits for this file: the call is running
    spin()

class Tokenizer:
    """A pure-Python object to replicate: its state travels in the movable."""

    def __init__(self, separators):
        self.separators = separators

    def __call__(self, text):
        words, word = [], []
        for ch in text:
            if ch in self.separators:
                if word:
                    words.append("".join(word))
                    word = []
            else:
                word.append(ch)
        if word:
            words.append("".join(word))
        return words

    def where(self):
        import multipy
        return multipy.interpreter_id()
'''


@pytest.fixture(scope="module")
def manager():
    with InterpreterManager(2, backend="subinterpreter") as m:
        m.register_module_source("helpers", HELPERS)
        yield m


def session_on(manager, index):
    return manager.all_instances()[index].acquire_session()


# -- choosing the backend ------------------------------------------------------------


def test_manager_reports_the_subinterpreter_backend_it_was_asked_for(manager):
    assert manager.backend == "subinterpreter"
    assert manager.backend_choice == "subinterpreter: asked for"
    assert [i.pid for i in manager.all_instances()] == [None, None]


def test_auto_never_picks_subinterpreter_and_says_why():
    if importlib.util.find_spec("numpy") is None:
        # No numpy, so no process backend: auto has nothing to pick and must say why.
        with pytest.raises(BackendUnavailableError, match="needs numpy"):
            resolve_backend("auto")
        return
    backend, choice = resolve_backend("auto")
    try:
        assert backend.kind is not BackendKind.SUBINTERPRETER
        assert "subinterpreter: never chosen by auto" in choice
        assert "torch cannot load in subinterpreters" in choice
    finally:
        backend.close()


def test_subinterpreter_backend_is_unavailable_on_312_with_the_reason():
    caps = Capabilities(python="3.12.1", free_threaded=False, own_gil_subinterpreters=False,
                        torch=True, numpy=True, cuda=False, fork_server=True)
    why = why_unavailable(BackendKind.SUBINTERPRETER, caps)
    assert why is not None
    assert "3.13+" in why and "3.12.1" in why and "unsupported" in why


def test_subinterpreter_backend_is_available_here():
    assert detect().own_gil_subinterpreters
    assert why_unavailable(BackendKind.SUBINTERPRETER, detect()) is None


def test_multipy_imports_without_torch_or_numpy_in_the_host():
    code = ("import sys, multipy, multipy.backends.subinterpreter; "
            "print(sorted(m for m in ('numpy', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the deploy API on subinterpreters -------------------------------------------------


def test_global_and_registered_module_work_in_every_interpreter(manager):
    for interp in manager.all_instances():
        with interp.acquire_session() as s:
            assert s.global_("builtins", "sum")([1, 2, 3]).deref() == 6
            assert s.global_("helpers", "echo")({"a": (1, 2.5, "x", None)}).deref() == {"a": (1, 2.5, "x", None)}
            assert s.global_("os.path", "join")("a", "b").deref() == "a/b"


def test_a_global_changed_in_one_interpreter_is_unchanged_in_the_other(manager):
    with session_on(manager, 0) as s0, session_on(manager, 1) as s1:
        before = s1.global_("helpers", "COUNTER").deref()
        s0.global_("helpers", "bump")(by=100)
        assert s0.global_("helpers", "COUNTER").deref() >= 100
        assert s1.global_("helpers", "COUNTER").deref() == before
        # Each has its own sys.modules (id(None) is the same: static singletons are shared).
        modules = "import sys\nresult = id(sys.modules)"
        assert s0.exec_(modules) != s1.exec_(modules)


def test_interpreter_id_inside_is_the_interpreter_index(manager):
    assert multipy.interpreter_id() is None
    for interp in manager.all_instances():
        with interp.acquire_session() as s:
            assert s.global_("multipy", "interpreter_id")().deref() == interp.index


def test_obj_attr_hasattr_and_deref(manager):
    with manager.acquire_one() as s:
        tok = s.global_("helpers", "Tokenizer")(" ,")
        assert tok.hasattr("where") and not tok.hasattr("nope")
        assert tok.attr("separators").deref() == " ,"
        words = tok("a b,c")
        assert words.deref() == ["a", "b", "c"]
        assert s.global_("builtins", "len")(words).deref() == 3  # an Obj as an argument


def test_errors_are_reraised_as_the_same_type_with_the_interpreter_traceback(manager):
    with manager.acquire_one() as s:
        with pytest.raises(ValueError, match="bad input 42") as info:
            s.global_("helpers", "boom")("bad input 42")
    remote = str(info.value.__cause__)
    assert "raise ValueError(message)   # the line the host must see" in remote
    assert "<registered module helpers>" in remote


def test_an_error_type_known_only_inside_becomes_interpreter_error(manager):
    with manager.acquire_one() as s:
        with pytest.raises(InterpreterError) as info:
            s.global_("helpers", "local_boom")()
    assert info.value.type_name == "helpers.LocalError"
    assert "only this interpreter knows the type" in info.value.remote_traceback


def test_an_obj_from_another_session_raises_ownership_error(manager):
    with session_on(manager, 0) as s0, session_on(manager, 1) as s1:
        foreign = s0.global_("helpers", "echo")
        with pytest.raises(OwnershipError, match="different session"):
            s1.global_("helpers", "echo")(foreign)
        with pytest.raises(OwnershipError, match="interpreter 0"):
            s1.create_movable(foreign)
    with pytest.raises(OwnershipError, match="closed"):
        foreign.deref()


def test_replicated_pure_python_object_called_from_4_threads(manager):
    with manager.acquire_one() as s:
        tokenizer = s.create_movable(s.global_("helpers", "Tokenizer")(" ,;"))
    failures, where = [], set()

    def work(t: int) -> None:
        try:
            for i in range(50):
                text = f"t{t} call {i},x;y"
                got = tokenizer(text)
                if got != [f"t{t}", "call", str(i), "x", "y"]:
                    failures.append((t, i, got))
            where.add(tokenizer.call_method("where"))
        except BaseException as exc:  # reported below, with the thread that failed
            failures.append((t, exc))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert where <= {0, 1}
    assert set(tokenizer.loaded_in()) <= {0, 1}
    with tokenizer.acquire_session(manager.all_instances()[1]) as s:
        assert s.self("a b").deref() == ["a", "b"]
        assert s.global_("multipy", "interpreter_id")().deref() == 1


# -- what crosses ---------------------------------------------------------------------------


def test_bytes_str_numbers_and_containers_round_trip(manager):
    values = [b"", b"\x00\xff" * 10, "héllo", 3, -2**70, 1.5, complex(1, 2), True, None,
              (1, [2, {"k": b"v"}]), {1, 2}, frozenset({"a"}), bytearray(b"ab")]
    with manager.acquire_one() as s:
        echo = s.global_("helpers", "echo")
        for value in values:
            assert echo(value).deref() == value
            assert type(echo.call_value(value)) is type(value)


def test_scalar_arguments_and_results_of_a_replicated_call_keep_their_values_and_types(manager):
    # None, bools, int64s and floats cross in a binary form, anything else pickled:
    # either way the callee and the caller see exactly what was sent.
    values = [None, True, False, 0, -1, 2**63 - 1, -2**63, 2**63, -2**70, 0.0, -2.5, 1e308,
              float("inf"), "s", b"b", (1,), [2.0]]
    with manager.acquire_one() as s:
        echo = s.create_movable(s.global_("helpers", "echo"))
        kinds = s.create_movable(s.global_("helpers", "kinds"))
    for value in values:
        got = echo(value)
        assert got == value and type(got) is type(value), (value, got)
        assert echo.submit(value).result(timeout=60) == value
    assert kinds(None, True, 3, 2.5, 2**64) == ["NoneType", "bool", "int", "float", "int"]
    nan = echo(float("nan"))
    assert type(nan) is float and nan != nan


def test_values_too_big_for_the_call_channel_cross_both_ways_blocking_and_posted(manager):
    # Pickled in band, larger than a ring record and a reply slot of the call channel:
    # they go over the pipes instead (the same as every call without the channel).
    big = [list(range(i, i + 1000)) for i in range(100)]
    with session_on(manager, 0) as s:
        echo = s.global_("helpers", "echo")
        assert echo.call_value(big) == big
        assert echo.submit(big).result(timeout=60).deref() == big
        assert echo.call_value(7) == 7  # the next call still gets its own answer
        replicated = s.create_movable(echo)
    # A posted call whose result is that big: read by the completion thread as it is written.
    assert replicated.submit(big).result(timeout=60) == big
    assert replicated.submit(8).result(timeout=60) == 8


def test_large_bytes_and_bytearray_cross_both_ways(manager):
    big = bytes(range(256)) * 4096             # 1 MiB: out of band
    with manager.acquire_one() as s:
        echo = s.global_("helpers", "echo")
        assert echo.call_value(big) == big
        assert echo.call_value([big, {"k": big}]) == [big, {"k": big}]
        out = echo.call_value(bytearray(big))
        assert type(out) is bytearray and out == big
        huge = s.global_("builtins", "bytes")(8 << 20).deref()    # grows the result arena
        assert huge == bytes(8 << 20)


def test_a_large_memoryview_argument_is_the_hosts_memory_not_a_copy(manager):
    host = bytearray(1 << 20)
    with manager.acquire_one() as s:
        kind, readonly, size = s.global_("helpers", "poke")(memoryview(host)).deref()
    assert (kind, readonly, size) == ("memoryview", False, 1 << 20)
    assert host[0] == 0x41  # written by the interpreter, through the view


def test_a_memoryview_result_arrives_as_a_memoryview(manager):
    with manager.acquire_one() as s:
        view = s.global_("builtins", "memoryview")(b"abc" * 100000).deref()
    assert isinstance(view, memoryview) and bytes(view) == b"abc" * 100000


def test_an_argument_that_cannot_be_pickled_is_a_transport_error(manager):
    with manager.acquire_one() as s:
        with pytest.raises(TransportError, match="cannot cross to interpreter") as info:
            s.global_("helpers", "echo")(threading.Lock())
        assert str(info.value).startswith("argument 1 of the call is a _thread.lock")
        with pytest.raises(TransportError) as info:
            s.global_("helpers", "echo")(memoryview(b"ok"), key=[threading.Lock()])
        assert str(info.value).startswith("keyword argument 'key' of the call at [0]")
        assert "Pass plain values" in str(info.value)
        assert s.global_("builtins", "sum")([1, 2]).deref() == 3


def test_a_result_that_cannot_cross_is_a_transport_error_naming_its_type(manager):
    with manager.acquire_one() as s:
        code = s.global_("helpers", "echo").attr("__code__")
        with pytest.raises(TransportError, match=r"\(code\) cannot cross to the host"):
            code.deref()
        assert s.global_("builtins", "sum")([1, 2]).deref() == 3


# -- torch is not available in subinterpreters ------------------------------------------------


@pytest.fixture
def fake_torch_package(tmp_path):
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model/.data/version", "6\n")
        zf.writestr("model/model/model.pkl", b"\x80\x05N.")
    return path


def test_loading_a_torch_package_fails_at_once_with_the_reason(manager, fake_torch_package):
    package = manager.load_package(fake_torch_package)
    with pytest.raises(BackendUnavailableError, match="torch cannot be imported in a subinterpreter"):
        package.load_pickle("model", "model.pkl")
    with pytest.raises(BackendUnavailableError, match="backend='process'"):
        package.acquire_session()
    with manager.acquire_one() as s:  # still usable
        assert s.global_("builtins", "sum")([1, 2]).deref() == 3


@pytest.mark.parametrize("module", ["torch", "numpy", "torch.nn"])
def test_importing_torch_or_numpy_inside_fails_with_the_reason(manager, module):
    with manager.acquire_one() as s:
        with pytest.raises(ModuleNotFoundError, match="cannot be imported in a subinterpreter"):
            s.global_(module, "anything")
        assert s.global_("helpers", "loaded_native")().deref() == []


# -- lifetime and timeouts ------------------------------------------------------------------------


def test_a_call_past_its_timeout_is_interrupted_and_the_interpreter_kept():
    with InterpreterManager(1, backend="subinterpreter", call_timeout=0.3) as m:
        m.register_module_source("helpers", HELPERS)
        with m.acquire_one() as s:
            s.global_("helpers", "bump")(by=5)
            with pytest.raises(CallTimeoutError, match="was interrupted"):
                s.global_("helpers", "spin")()
            assert s.global_("helpers", "COUNTER").deref() == 5  # same interpreter, same state
        assert m.statistics().interpreters[0].restarts == 0


def test_a_posted_call_in_its_interrupt_grace_holds_up_no_other_completion(monkeypatch):
    import os

    from multipy.backends import subinterpreter

    # The stuck call stays in its grace period for the whole test: its interpreter
    # must neither be given up nor stop the completion thread from serving the other.
    monkeypatch.setattr(subinterpreter, "INTERRUPT_GRACE", 600.0)
    interrupted = threading.Event()
    interrupt = subinterpreter._Driver.interrupt

    def noted(driver, seq):
        interrupt(driver, seq)
        interrupted.set()

    monkeypatch.setattr(subinterpreter._Driver, "interrupt", noted)
    r, w = os.pipe()
    try:
        with InterpreterManager(2, backend="subinterpreter", call_timeout=2.0) as m, \
                session_on(m, 0) as stuck_on, session_on(m, 1) as other:
            stuck = stuck_on.global_("os", "read").submit(r, 1)  # in native code: not interruptible
            wait_for(interrupted.is_set, "the stuck call to run past its timeout")
            assert other.global_("builtins", "abs").submit(-4).result(timeout=30).deref() == 4
            assert not stuck.done()
            os.write(w, b"x")  # os.read returns and the interrupt lands
            with pytest.raises(CallTimeoutError, match="was interrupted"):
                stuck.result(timeout=60)
            assert stuck_on.global_("builtins", "abs")(-1).deref() == 1  # the same interpreter
            assert m.statistics().interpreters[0].restarts == 0
    finally:
        os.close(r)
        os.close(w)


def test_a_posted_call_that_ignores_its_interrupt_is_abandoned_after_the_grace_period(monkeypatch):
    import os

    from multipy.backends import subinterpreter

    monkeypatch.setattr(subinterpreter, "INTERRUPT_GRACE", 0.2)
    r, w = os.pipe()
    try:
        with InterpreterManager(1, backend="subinterpreter", call_timeout=0.5) as m:
            with m.acquire_one() as s:
                stuck = s.global_("os", "read").submit(r, 1)
                with pytest.raises(CallTimeoutError, match="did not stop when interrupted"):
                    stuck.result(timeout=60)
            os.write(w, b"x")  # the abandoned interpreter's call returns: it can be destroyed
            with m.acquire_one() as s:  # a new subinterpreter serves
                assert s.global_("builtins", "abs").submit(-2).result(timeout=60).deref() == 2
            assert m.statistics().interpreters[0].restarts == 1
    finally:
        os.close(r)
        os.close(w)


# The raise rows of the fault table (the crash rows are process-only).  Unpickling
# the arguments fails as a TransportError here: the subinterpreter backend rebuilds
# arguments before the call starts and reports that stage as the transport's.
SUBINTERPRETER_RAISES = [
    (stage, make_args, TransportError if stage == "unpickling arguments" else expected, words)
    for stage, make_args, expected, words in RAISES]


@pytest.mark.parametrize("stage, make_args, expected, words", SUBINTERPRETER_RAISES,
                         ids=[r[0] for r in SUBINTERPRETER_RAISES])
def test_a_fault_that_raises_at_each_stage_fails_only_that_call(manager, stage, make_args,
                                                                 expected, words):
    with session_on(manager, 0) as s:
        run = s.create_movable(s.global_("_faults", "run"))
    before = manager.statistics().restarts
    with pytest.raises(expected, match=words):
        run(*make_args())
    for _ in range(2 * len(manager)):
        assert run("echo", [1, "two"]) == [1, "two"]
    assert manager.statistics().restarts == before


def test_close_is_idempotent_and_later_calls_raise_manager_closed():
    m = InterpreterManager(2, backend="subinterpreter")
    with m.acquire_one() as s:
        echo = s.global_("builtins", "abs")
        assert echo(-3).deref() == 3
    m.close()
    m.close()
    assert m.closed
    with pytest.raises(ManagerClosedError, match="closed"):
        m.acquire_one()
    with InterpreterManager(1, backend="subinterpreter") as again:  # a fresh one still starts
        with again.acquire_one() as s:
            assert s.global_("builtins", "abs")(-1).deref() == 1


def test_a_manager_dropped_without_close_stops_its_interpreters():
    import gc
    import weakref

    before = set(threading.enumerate())
    m = InterpreterManager(2, backend="subinterpreter")
    with m.acquire_one() as s:
        assert s.global_("builtins", "abs")(-3).deref() == 3
    dropped = weakref.ref(m)
    del m, s
    gc.collect()
    assert dropped() is None, "something still holds the manager"
    wait_for(lambda: not [t for t in threading.enumerate()
                          if t not in before and t.name.startswith("multipy-")],
             "the dropped manager's threads to stop")


def test_closing_during_a_call_interrupts_it_with_manager_closed(tmp_path):
    m = InterpreterManager(1, backend="subinterpreter")
    m.register_module_source("helpers", HELPERS)
    marker = tmp_path / "started"
    outcome = []

    def run() -> None:
        with m.acquire_one() as s:
            spin = s.global_("helpers", "mark_then_spin")
            try:
                spin(str(marker))
            except BaseException as exc:  # the outcome is asserted below
                outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    wait_started(marker)
    m.close(timeout=0.2)
    thread.join(10)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], ManagerClosedError), outcome


def _open_fds() -> set:
    import os

    return set(os.listdir("/proc/self/fd"))


def test_closing_the_manager_with_a_posted_call_stuck_in_native_code_leaves_nothing_open():
    import os

    r, w = os.pipe()
    try:
        before = _open_fds()
        m = InterpreterManager(1, backend="subinterpreter")
        with m.acquire_one() as s:
            stuck = s.global_("os", "read").submit(r, 1)  # in native code: not interruptible
            driver = m._workers[0]._driver
            wait_for(lambda: driver._busy, "the posted call to be in flight")
        m.close(timeout=0.2)
        with pytest.raises(ManagerClosedError):
            stuck.result(timeout=60)
        os.write(w, b"x")  # the call returns: its subinterpreter can be destroyed now
        # Nobody is left to read that call's reply: the host's ends of the pipes and
        # the call channel are closed, the serving loop ends, the driver thread too.
        wait_for(lambda: not _open_fds() - before, "the closed manager's descriptors to close")
        wait_for(driver.finished.is_set, "the subinterpreter's driver thread to end")
    finally:
        os.close(r)
        os.close(w)


# -- the call channel (where the C extension runs) ---------------------------------------------


GATED = """
import os, time

def gated(started, release, value):
    open(started, "w").close()
    while not os.path.exists(release):
        time.sleep(0.001)
    return value
"""


def test_a_caller_asleep_on_the_channel_learns_when_its_interpreter_stops_serving(tmp_path):
    from multipy.transport import channel

    if not channel.NATIVE:
        pytest.skip(f"the subinterpreter backend uses its pipes here: {channel.NATIVE_WHY}")
    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    with InterpreterManager(1, backend="subinterpreter") as m:
        m.register_module_source("gates", GATED)
        outcome = []

        def call() -> None:
            with m.acquire_one() as s:
                gated = s.global_("gates", "gated")
                try:
                    outcome.append(gated.call_value(started, release, 1))
                except BaseException as exc:  # the outcome is asserted below
                    outcome.append(exc)

        thread = threading.Thread(target=call)
        thread.start()
        wait_started(started)
        driver = m._workers[0]._driver
        slots = range(driver.end.channel.geometry[1])
        wait_for(lambda: any(driver.end.channel.asleep(i) for i in slots),
                 "the caller to sleep in FUTEX_WAIT")
        # What the interpreter's side does when its loop ends: the channel is closed.
        driver.end.channel.close()
        # The call still runs there: the caller returns first (having waited a few
        # seconds for that loop to end), then the call ends and the loop with it.
        wait_for(lambda: outcome, "the caller to return")
        open(release, "w").close()
        thread.join(60)
        assert not thread.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], multipy.InterpreterCrashedError), outcome
        assert "stopped serving" in str(outcome[0])
        with m.acquire_one() as s:  # a new subinterpreter serves
            assert s.global_("builtins", "abs")(-5).deref() == 5
        assert m.statistics().interpreters[0].restarts == 1


def _needs_channel():
    from multipy.transport import channel

    if not channel.NATIVE:
        pytest.skip(f"one call at a time on the pipes: {channel.NATIVE_WHY}")


def test_callers_sharing_one_subinterpreter_each_get_their_own_answer():
    # Several calls in flight on one subinterpreter: small answers in their reply
    # slots, big ones through the reply pipe (spilled) or the arena (out of band).
    with InterpreterManager(1, backend="subinterpreter") as m:
        m.register_module_source("helpers", HELPERS)
        with m.acquire_one() as s:
            echo = s.create_movable(s.global_("helpers", "echo"))
        failures, books = [], []
        first = threading.Lock()

        def work(t: int) -> None:
            try:
                for i in range(20):
                    kind = (t + i) % 3
                    value = ((t, i) if kind == 0 else f"{t}.{i}." * 20_000 if kind == 1
                             else bytes([t, i]) * 40_000)
                    got = echo(value) if i % 2 else echo.submit(value).result(timeout=60)
                    if got != value:
                        failures.append((t, i, kind))
            except BaseException as exc:  # reported below, with the thread that failed
                with first:
                    if not books:  # the manager's books as the first failure found them
                        books.append(_stall.describe(m))
                failures.append((t, i, exc))

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == [], "\n".join(books)
        assert m.statistics().interpreters[0].restarts == 0


def test_spilled_replies_queued_in_the_reply_pipe_are_each_read_whole(manager):
    # A reply too big for its slot crosses the reply pipe, and several can be queued
    # there (each is written once the one before it was).  The first read of a frame
    # may then bring in the start of the next: it must be kept for that one.
    from multipy.transport.frames import write_frame

    _needs_channel()
    with manager.acquire_one() as s:
        index = s.interpreter_index
    driver = manager._workers[index]._driver
    first, second = b"1" * 65_000, b"2" * 100  # the first frame smaller than one read
    rep_w = driver._sub_fds[1]  # the subinterpreter's end, idle: nothing else writes now
    write_frame(rep_w, first)
    write_frame(rep_w, second)
    with driver._spill_lock:  # as HostEnd.spilled reads them
        assert driver.end.read_spilled() == first
        assert driver.end.read_spilled() == second
    with manager.all_instances()[index].acquire_session() as s:  # the pipe is in step:
        big = "x" * 200_000                                       # a big reply comes whole
        assert s.global_("builtins", "str")(big).deref() == big


ECHO_AFTER_GATE = """
import os, time

def echo(value, gate=None, times=1):
    while gate is not None and not os.path.exists(gate):
        time.sleep(0.001)
    return value * times
"""

# Posted calls sent by the completion thread while the subinterpreter waits for that
# thread to read a posted call's reply, too big for its slot, from the reply pipe.  The
# send must not wait for the subinterpreter: not for it to take an earlier call's shared
# buffers ("buffers"), nor for room in a request ring filled behind that reply ("ring"),
# nor for it to read a request too big for the ring from the request pipe ("request").
# Run in a process of its own: a deadlock there is a timeout here, not a hung test run.
_SEND_BEHIND_A_BIG_REPLY = """
import sys, threading
from multipy import InterpreterManager
from multipy.backends import subinterpreter

gate, depth, helpers, scenario = sys.argv[1:]
subinterpreter.PIPELINE_DEPTH = int(depth)  # MULTIPY_PIPELINE_DEPTH, read at import
with InterpreterManager(1, backend="subinterpreter") as m:
    m.register_module_source("gates", helpers)
    with m.acquire_one() as s:
        echo = s.create_movable(s.global_("gates", "echo"))
    echo(0)  # loaded
    # The gate opens from another thread: a submit may wait for room in the ring.
    threading.Timer(1.0, lambda: open(gate, "w").close()).start()
    gated = echo.submit(1, gate)
    if scenario == "buffers":  # big bytes cross as shared buffers, taken in turn
        shared = b"b" * 80_000
        calls = [((v, None, n), echo.submit(v, None, n)) for v, n in
                 [("r", 100_000), (shared, 1), (2, 1), (shared, 1), ("r", 100_000), (shared, 1)]]
    elif scenario == "request":  # a str argument too big for the ring: the request pipe
        calls = [((v, None, n), echo.submit(v, None, n)) for v, n in
                 [("r", 200_000), ("s" * 200_000, 1)]]
    else:  # big str arguments fill the ring (at most two fit)
        big = "a" * 120_000
        calls = [((v, None, n), echo.submit(v, None, n)) for v, n in
                 [("r", 100_000), (big, 1), (big, 1), (big, 1), (big, 1), ("r", 100_000), (big, 1)]]
    assert gated.result(timeout=30) == 1
    for (value, _, times), future in calls:
        assert future.result(timeout=30) == value * times
print("ok")
"""


@pytest.mark.parametrize("depth", [2, 4])
@pytest.mark.parametrize("scenario", ["buffers", "ring", "request"])
def test_posted_calls_sent_by_the_completion_thread_never_wait_for_their_own_replies(
        tmp_path, depth, scenario):
    _needs_channel()
    out = subprocess.run([sys.executable, "-c", _SEND_BEHIND_A_BIG_REPLY, str(tmp_path / "gate"),
                          str(depth), ECHO_AFTER_GATE, scenario],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_call_that_times_out_queued_behind_another_never_runs(tmp_path, monkeypatch):
    from multipy.backends import subinterpreter

    _needs_channel()
    # The queued call's interrupt must not give the interpreter up while the call
    # ahead of it still runs: it gets all the grace it needs here.
    monkeypatch.setattr(subinterpreter, "INTERRUPT_GRACE", 600.0)
    interrupted = threading.Event()  # set once the host cancelled the queued call
    from multipy.transport import channel as _channel

    cancel = _channel.HostEnd.cancel
    ours = []  # this manager's channel: a cancel on any other one (a call of another
    # test still winding down) must not open the gate early

    def noted(end, slot):
        skipped = cancel(end, slot)
        if end in ours:
            interrupted.set()
        return skipped

    monkeypatch.setattr(_channel.HostEnd, "cancel", noted)
    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    with InterpreterManager(1, backend="subinterpreter") as m:
        m.register_module_source("helpers", HELPERS)
        m.register_module_source("gates", GATED)
        ours.append(m._workers[0]._driver.end)
        with m.acquire_one() as s:
            gated = s.create_movable(s.global_("gates", "gated"))
            bump = s.create_movable(s.global_("helpers", "bump"))
        assert bump(0) == 0  # loaded there before the call that times out
        ahead = []
        thread = threading.Thread(target=lambda: ahead.append(gated(started, release, 7)))
        thread.start()
        wait_started(started)
        opener = threading.Thread(target=lambda: (interrupted.wait(60), open(release, "w").close()))
        opener.start()
        with pytest.raises(CallTimeoutError, match="dropped without running"):
            bump.with_timeout(0.2)(100)  # sent while the gated call runs: queued behind it
        opener.join()
        thread.join(60)
        assert ahead == [7]
        assert bump(1) == 1  # the timed-out call never ran
        assert m.statistics().interpreters[0].restarts == 0


def test_a_caller_interrupted_between_sending_and_waiting_leaves_nothing_open():
    _needs_channel()
    before = _open_fds()
    m = InterpreterManager(1, backend="subinterpreter")
    m.register_module_source("helpers", HELPERS)
    with m.acquire_one() as s:
        echo = s.create_movable(s.global_("helpers", "echo"))
    assert echo(0) == 0
    worker = m._workers[0]
    driver, hook = worker._driver, worker.on_free

    def interrupt() -> None:  # runs once the request is sent, before its caller waits
        worker.on_free = hook
        raise KeyboardInterrupt("between sending and waiting")

    worker.on_free = interrupt
    with pytest.raises(KeyboardInterrupt):
        echo("never awaited")
    assert [echo(i) for i in range(5)] == list(range(5))  # each caller its own answer
    m.close()
    wait_for(lambda: not _open_fds() - before, "the closed manager's descriptors to close")
    wait_for(driver.finished.is_set, "the first subinterpreter's driver thread to end")


def test_calls_queued_behind_a_call_that_ignores_its_interrupt_fail_at_once(monkeypatch):
    import os

    from multipy.backends import subinterpreter

    _needs_channel()
    monkeypatch.setattr(subinterpreter, "INTERRUPT_GRACE", 0.2)
    r, w = os.pipe()
    try:
        with InterpreterManager(1, backend="subinterpreter") as m:
            m.register_module_source("helpers", HELPERS)
            with m.acquire_one() as s:
                read = s.create_movable(s.global_("os", "read"))
                echo = s.create_movable(s.global_("helpers", "echo"))
            assert echo(0) == 0
            driver = m._workers[0]._driver
            outcomes = []

            def call(fn, *args) -> None:
                try:
                    outcomes.append(fn(*args))
                except BaseException as exc:  # the outcome is asserted below
                    outcomes.append(exc)

            stuck = threading.Thread(target=call, args=(read.with_timeout(2.0), r, 1))
            stuck.start()  # in native code: not interruptible
            wait_for(lambda: driver._busy == 1, "the stuck call to be in flight")
            queued = threading.Thread(target=call, args=(echo, 1))
            queued.start()
            wait_for(lambda: driver._busy == 2, "a call to queue behind it")
            for thread in (stuck, queued):
                thread.join(60)
            assert len(outcomes) == 2, outcomes
            timed_out = [o for o in outcomes if isinstance(o, CallTimeoutError)]
            given_up = [o for o in outcomes if isinstance(o, multipy.InterpreterCrashedError)]
            assert len(timed_out) == 1 and "did not stop when interrupted" in str(timed_out[0])
            assert len(given_up) == 1 and "was given up (timed out)" in str(given_up[0])
            os.write(w, b"x")  # the abandoned subinterpreter's call returns
            assert echo(2) == 2  # a new subinterpreter serves
            assert m.statistics().interpreters[0].restarts == 1
    finally:
        os.close(r)
        os.close(w)


def test_closing_with_several_calls_in_flight_fails_each_with_manager_closed(tmp_path):
    _needs_channel()
    m = InterpreterManager(1, backend="subinterpreter")
    m.register_module_source("helpers", HELPERS)
    with m.acquire_one() as s:
        spin = s.create_movable(s.global_("helpers", "mark_then_spin"))
        echo = s.create_movable(s.global_("helpers", "echo"))
    marker = str(tmp_path / "started")
    outcomes = []

    def call(fn, *args) -> None:
        try:
            outcomes.append(fn(*args))
        except BaseException as exc:  # the outcome is asserted below
            outcomes.append(exc)

    threads = [threading.Thread(target=call, args=(spin, marker))]
    threads[0].start()
    wait_started(marker)
    driver = m._workers[0]._driver
    threads += [threading.Thread(target=call, args=(echo, i)) for i in range(3)]
    for thread in threads[1:]:
        thread.start()
    wait_for(lambda: driver._busy == 4, "three calls to queue behind the spinning one")
    m.close(timeout=0.2)
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert len(outcomes) == 4 and all(isinstance(o, ManagerClosedError) for o in outcomes), outcomes


# -- futures and asyncio ------------------------------------------------------------------


def test_submit_and_acall_deliver_each_answer_through_the_completion_thread(manager):
    import asyncio

    with session_on(manager, 0) as s:
        bumped = s.global_("helpers", "echo").submit(7).result(timeout=60)
        assert bumped.deref() == 7
        echo = s.create_movable(s.global_("helpers", "echo"))
        boom = s.create_movable(s.global_("helpers", "boom"))
    futures = [echo.submit(i) for i in range(30)]
    assert [f.result(timeout=60) for f in futures] == list(range(30))

    async def main():
        values = await asyncio.gather(*(echo.acall(i) for i in range(30)))
        with pytest.raises(ValueError, match="from the subinterpreter"):
            await boom.acall("from the subinterpreter")
        return values

    assert asyncio.run(main()) == list(range(30))
    assert any(t.name.startswith("multipy-completion") for t in threading.enumerate())


def test_the_native_extension_loads_in_an_own_gil_subinterpreter():
    try:
        from multipy import _native
    except ImportError as exc:
        pytest.skip(f"multipy._native is not built for this Python ({exc})")
    import _interpreters

    iid = _interpreters.create()  # isolated: its own GIL
    try:
        out = _interpreters.run_string(
            iid, f"import sys; sys.path[:0] = {sys.path!r}; import multipy._native as n; n.Channel")
        assert out is None  # no exception crossed back
    finally:
        _interpreters.destroy(iid)
    assert _native.Channel.__module__ == "multipy._native"


def test_a_frame_written_in_parts_arrives_whole_after_a_partial_write(monkeypatch):
    # writev may write part of a frame (a signal landed): the rest follows.
    import os

    from multipy.transport import subinterp_wire as wire

    real = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, parts: real(fd, [parts[0][:3]]))
    r, w = os.pipe()
    try:
        wire.write_all(w, [b"header", b"payload", b"slots"])
        assert os.read(r, 100) == b"headerpayloadslots"
    finally:
        os.close(r)
        os.close(w)


def test_the_binary_forms_of_the_common_call_fall_back_without_encoding_twice(monkeypatch):
    from multipy.transport import subinterp_wire as wire
    from multipy.transport.codec import FAST_CALL, FAST_VALUE, Encoder

    encoder = Encoder(None)
    pickled = []
    monkeypatch.setattr(encoder, "_pickle", lambda *a: pickled.append(a) or b"\x80")
    call = wire.fast_request(encoder, 14, (3, None, (1, 2.5, None), {}, 1, None), ())
    assert call[0] == FAST_CALL
    assert wire.fast_value(encoder, 7)[0] == FAST_VALUE
    assert wire.fast_request(encoder, 14, (3, None, (1 << 70,), {}, 1, None), ()) is None
    assert wire.fast_value(encoder, 1 << 70) is None
    assert pickled == []  # the fallback is the caller's own pickle, not a second one here


@contextlib.contextmanager
def _gate_and(tmp_path, name, **options):
    """One subinterpreter with ``gates.gated`` (runs until ``release`` exists, after
    creating ``started``) and ``helpers.<name>`` as replicated objects."""
    _needs_channel()
    started, release = str(tmp_path / "started"), str(tmp_path / "release")
    with InterpreterManager(1, backend="subinterpreter", **options) as m:
        m.register_module_source("helpers", HELPERS)
        m.register_module_source("gates", GATED)
        with m.acquire_one() as s:
            gated = s.create_movable(s.global_("gates", "gated"))
            other = s.create_movable(s.global_("helpers", name))
        yield m, gated, other, started, release


def test_a_posted_call_follows_a_running_one_into_the_subinterpreter(tmp_path):
    # On the channel the subinterpreter takes requests in order from its ring: a
    # posted call is sent behind the one it runs (as on the process backend), not
    # held in the dispatcher until that one ends.
    with _gate_and(tmp_path, "echo") as (m, gated, echo, started, release):
        assert echo(0) == 0 and m._workers[0].posted_depth > 1
        first = gated.submit(started, release, 7)
        wait_started(started)
        second = echo.submit(8)
        worker = m._workers[0]
        wait_for(lambda: worker.posted_in_flight == 2, "the second call to follow the first")
        assert not second.done()
        open(release, "w").close()
        assert first.result(timeout=60) == 7 and second.result(timeout=60) == 8
        assert [f.result(timeout=60) for f in [echo.submit(i) for i in range(20)]] == list(range(20))
        wait_for(lambda: not worker._driver.posted, "the posted calls to be forgotten")


@pytest.mark.parametrize("how", ["posted", "blocking"])
def test_a_call_past_its_timeout_queued_behind_another_is_dropped_at_once(tmp_path, how):
    # Its caller is told at the deadline, while the call ahead still runs (past the
    # interrupt's grace period: nothing is interrupted or given up); it never runs,
    # the subinterpreter is kept, and its skip reply is settled unread (by the bell
    # watch for a posted call, by a later send for a blocking one).
    with _gate_and(tmp_path, "bump", call_timeout=0.3) as (m, gated, bump, started, release):
        assert bump(0) == 0  # loaded before the call that times out
        ahead = []
        thread = threading.Thread(
            target=lambda: ahead.append(gated.with_timeout(None)(started, release, 7)))
        thread.start()
        try:
            wait_started(started)
            with pytest.raises(CallTimeoutError, match="dropped without running"):
                if how == "posted":
                    bump.submit(100).result(timeout=60)  # sent behind the running call
                else:
                    bump(100)
            assert thread.is_alive()  # the call ahead still runs: nobody waited for it
        finally:
            open(release, "w").close()
            thread.join(60)
        assert ahead == [7]
        assert bump(1) == 1  # the dropped call never ran
        assert m.statistics().interpreters[0].restarts == 0
        # Replies come in order: its skip reply came before bump(1)'s, so the next send
        # takes it (bump(1)'s send may have come before it).
        assert bump(2) == 3
        driver = m._workers[0]._driver
        wait_for(lambda: not driver.posted and not driver.left and not driver._busy,
                 "the dropped call's reply to be settled")


def test_an_acall_cancelled_while_queued_in_the_subinterpreter_never_runs(tmp_path):
    import asyncio

    with _gate_and(tmp_path, "bump") as (m, gated, bump, started, release):
        assert bump(0) == 0
        worker = m._workers[0]

        async def main():
            first = asyncio.ensure_future(gated.acall(started, release, 7))
            await asyncio.to_thread(wait_started, started)
            queued = asyncio.ensure_future(bump.acall(100))
            await asyncio.to_thread(wait_for, lambda: worker.posted_in_flight == 2,
                                    "the call to be queued in the subinterpreter")
            queued.cancel()
            await asyncio.sleep(0)
            open(release, "w").close()
            assert await first == 7
            with pytest.raises(asyncio.CancelledError):
                await queued

        asyncio.run(main())
        assert bump(1) == 1  # the cancelled call never ran


_SECOND_INTERPRETER = '''
import sys
sys.path[:0] = PATHS
from multipy import _native
from multipy.runtime.balancer import LoadBalancer

balancer = LoadBalancer(1)
assert _native.take_turn(balancer) is None          # declined: the Python path serves
assert _native.give_back(balancer, 0) is False
assert balancer.acquire() == 0 and balancer.in_flight(0) == 1
for call in (lambda: _native.held_blocks(object(), set()),  # (refused before the arena is read)
             lambda: _native.call_setup(*[None] * 8)):
    try:
        call()
    except RuntimeError as exc:
        assert "first interpreter of this process" in str(exc), exc
    else:
        raise AssertionError("a second interpreter used the first one's cached objects")
'''


def test_a_second_interpreter_never_shares_the_extensions_cached_objects():
    # The extension's caches (types it makes, interned names) belong to the first
    # interpreter that filled them: in another one the functions that fill them
    # refuse, and the balancer's one-step versions decline.
    from multipy.runtime.balancer import LoadBalancer
    from multipy.transport.channel import _native_module

    if _native_module is None:
        pytest.skip("multipy._native is not loaded (MULTIPY_NATIVE=0, or not built)")
    import _interpreters

    balancer = LoadBalancer(1)
    assert _native_module.take_turn(balancer) == 0  # this interpreter fills the caches first
    assert _native_module.give_back(balancer, 0) is True
    iid = _interpreters.create()
    try:
        failed = _interpreters.exec(iid, f"PATHS = {list(sys.path)!r}\n" + _SECOND_INTERPRETER)
    finally:
        _interpreters.destroy(iid)
    assert failed is None, failed.formatted if hasattr(failed, "formatted") else failed
    assert _native_module.take_turn(balancer) == 0  # still served here
