"""Start-up: shared imports (``preload=``), all interpreters starting at once, and
loading an object everywhere up front (``ReplicatedObj.load_everywhere``).

The ``preload`` modules here are written into a temporary directory that the
managers get as their environment, so that the directory of the rendezvous is
part of the module's source.
"""

from __future__ import annotations

import os
import textwrap

import pytest

import multipy
from multipy import InterpreterManager, PathEnvironment
from multipy.errors import InterpreterStartError

# Records where it was imported: the fork server's pid when it was shared.
PROBE = "import os\nIMPORTED_IN = os.getpid()\n"

# Waits in every interpreter until all have imported it: it finishes only when the
# interpreters run their start-up imports at the same time.  The fork server (no
# interpreter id) skips it, so that each interpreter imports it itself.
RENDEZVOUS = """
import os, time
import multipy
if multipy.interpreter_id() is None:
    raise ImportError("imported per interpreter on purpose")
open(os.path.join({dir!r}, str(os.getpid())), "w").close()
deadline = time.monotonic() + 60
while len(os.listdir({dir!r})) < {n}:
    if time.monotonic() > deadline:
        raise TimeoutError("the other interpreters did not import this module meanwhile")
    time.sleep(0.01)
"""

# Starts a thread when imported: must not be imported before a fork.
THREADED = """
import os, threading
threading.Thread(target=threading.Event().wait, daemon=True, name="threaded-import").start()
IMPORTED_IN = os.getpid()
"""

RAISES = "raise RuntimeError('this module cannot be imported anywhere')\n"


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    root = tmp_path_factory.mktemp("preload")
    meeting = root / "meeting"
    meeting.mkdir()
    sources = {"startup_probe": PROBE, "startup_threaded": THREADED, "startup_raises": RAISES,
               "startup_rendezvous": RENDEZVOUS.format(dir=str(meeting), n=2)}
    for name, source in sources.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    return root


def _imported_in(manager, module):
    pids = {}
    for interp in manager.all_instances():
        with interp.acquire_session() as s:
            pids[interp.index] = (s.global_(module, "IMPORTED_IN").deref(),
                                  s.global_("os", "getpid")().deref())
    return pids


@pytest.fixture(scope="module")
def preloaded(backend, modules):
    env = PathEnvironment(str(modules))
    with InterpreterManager(2, env, backend=backend,
                            preload=("startup_probe", "startup_rendezvous")) as manager:
        yield manager


def test_preload_modules_are_imported_once_where_interpreters_are_forked_from(preloaded):
    if preloaded.backend != "process":
        pytest.skip("thread interpreters share the host's modules: imported once by construction")
    for index, (imported_in, pid) in _imported_in(preloaded, "startup_probe").items():
        assert imported_in != pid, f"interpreter {index} imported the module itself"
    assert preloaded.statistics().notes == ()


def test_interpreters_run_their_start_up_imports_at_the_same_time(preloaded):
    # Each interpreter's import of startup_rendezvous waited for the other's: had
    # the manager started them one after the other, the first would have timed out.
    for interp in preloaded.all_instances():
        with interp.acquire_session() as s:
            assert s.global_("sys", "modules").attr("__contains__")("startup_rendezvous").deref()


def test_a_module_that_starts_threads_is_imported_per_interpreter_with_a_note(backend, modules):
    if backend != "process":
        pytest.skip("only the process backend forks interpreters from a server")
    env = PathEnvironment(str(modules))
    with InterpreterManager(2, env, backend=backend, preload=("startup_threaded",)) as manager:
        for index, (imported_in, pid) in _imported_in(manager, "startup_threaded").items():
            assert imported_in == pid, f"interpreter {index} was forked after the import"
        (note,) = manager.statistics().notes
        assert note.startswith("startup_threaded: imported in every interpreter")
        assert "started threads" in note


def test_a_preload_module_that_raises_fails_the_start_naming_it(backend, modules):
    env = PathEnvironment(str(modules))
    with pytest.raises(InterpreterStartError, match="cannot be imported anywhere"):
        InterpreterManager(2, env, backend=backend, preload=("startup_raises",))


def test_load_everywhere_loads_the_object_in_every_interpreter(preloaded, examples):
    model = preloaded.load_package(examples["simple"]).load_pickle("model", "model.pkl")
    assert model.load_everywhere() is model
    assert model.loaded_in() == [0, 1]
    assert model.load_everywhere().loaded_in() == [0, 1]   # again: nothing to do


def test_statistics_have_no_notes_without_preload(manager):
    assert manager.statistics().notes == ()
    assert isinstance(multipy.ManagerStatistics.__dataclass_fields__["notes"].default, tuple)


def test_the_fork_server_of_a_preload_list_stops_with_its_last_interpreter(backend, modules):
    if backend != "process":
        pytest.skip("only the process backend forks interpreters from a server")
    with InterpreterManager(1, PathEnvironment(str(modules)), backend=backend,
                            preload=("startup_probe",)) as manager:
        with manager.acquire_one() as s:
            server = s.global_("os", "getppid")().deref()
        assert os.path.exists(f"/proc/{server}")
    # close() waited for the server to exit (it is reaped, so its pid is gone).
    assert not os.path.exists(f"/proc/{server}")
