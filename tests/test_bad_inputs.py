"""Bad and unusual inputs a user can give: each gets a clear error, nothing leaks.

Every test passes something wrong or odd (a wrong-typed argument, a corrupt
pickle inside a good archive, a value that cannot cross, a sparse tensor, an
archive loaded again and again) and checks three things: the exception type,
the key words of its message (what was wrong and what to do), and that the
manager still serves the next call.  The whole module runs inside one count of
the host's open file descriptors and ``/dev/shm`` entries, which must not grow.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import zipfile

import pytest
import torch

import multipy
from multipy.backends.process import ProcessBackend
from multipy.package import save_package


# -- nothing left behind ---------------------------------------------------------------


def _open_fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the descriptor listdir itself used, closed by now
    return out


def _shm_entries() -> set[str]:
    # Only names this host's libraries make: other programs may use /dev/shm meanwhile.
    return {n for n in os.listdir("/dev/shm") if "multipy" in n or n.startswith("torch_")}


@pytest.fixture(scope="module", autouse=True)
def nothing_leaks():
    """The host's descriptors and /dev/shm entries, counted around the whole module."""
    ProcessBackend.warm()  # the fork server lives as long as the host, like the stdlib's
    gc.collect()
    fds, shm = _open_fds(), _shm_entries()
    yield
    gc.collect()
    grown = {fd: target for fd, target in _open_fds().items() if fds.get(fd) != target}
    assert not grown, f"descriptors left open by the bad-input tests: {grown}"
    assert _shm_entries() <= shm, f"/dev/shm entries left behind: {_shm_entries() - shm}"


@pytest.fixture(scope="module")
def archive(examples, tmp_path_factory) -> str:
    """A private copy of the ``simple`` example: descriptors on it are this module's."""
    path = tmp_path_factory.mktemp("bad_inputs") / "simple.pt"
    shutil.copy(examples["simple"], path)
    return str(path)


def _fds_on(path: str) -> int:
    return sum(1 for target in _open_fds().values() if target == path)


def _fds_on_in_interpreter(session, path: str) -> int:
    return session.exec_(
        "import gc, os\n"
        "gc.collect()\n"
        "fds = os.listdir('/proc/self/fd')\n"
        f"result = sum(1 for fd in fds if os.path.realpath('/proc/self/fd/' + fd) == {path!r})")


# -- sparse tensors ----------------------------------------------------------------------


def test_sparse_tensors_that_crossed_are_not_kept_by_either_side(manager):
    pending = torch._utils._sparse_tensors_to_validate
    sparse = torch.eye(4).to_sparse()
    with manager.acquire_one() as s:
        clone = s.global_("torch", "clone")
        for _ in range(50):
            out = clone.call_value(sparse)
        assert torch.equal(out.to_dense(), torch.eye(4))
        kept = s.exec_("import torch\nresult = len(torch._utils._sparse_tensors_to_validate)")
    assert kept == 0, "the interpreter keeps every sparse argument it received"
    assert len(pending) == 0, "the host keeps every sparse result it received"


def test_a_movable_holding_a_sparse_tensor_is_not_kept_by_the_loader(manager):
    first, second = manager.all_instances()
    with first.acquire_session() as s:
        movable = s.create_movable(s.global_("torch", "eye")(3).attr("to_sparse")())
    with second.acquire_session() as s:
        loaded = s.from_movable(movable)
        assert torch.equal(loaded.deref().to_dense(), torch.eye(3))
        kept = s.exec_("import torch\nresult = len(torch._utils._sparse_tensors_to_validate)")
    assert kept == 0


# -- archives ------------------------------------------------------------------------------


def test_a_dropped_package_leaves_no_descriptor_on_its_archive(manager, archive, assert_usable):
    for _ in range(5):
        model = manager.load_package(archive).load_pickle("model", "model.pkl")
        assert model(torch.zeros(10, 20)).shape == (10, 20)
        for interp in manager.all_instances():
            with interp.acquire_session() as s:
                s.from_movable(model)
        with manager.load_package(archive).acquire_session() as s:
            s.self.attr("load_text")("extra_files", "text")
    del model, s
    gc.collect()
    sessions = [interp.acquire_session() for interp in manager.all_instances()]
    for s in sessions:  # the next request carries the release
        s.global_("builtins", "len")
    for s in sessions:
        assert _fds_on_in_interpreter(s, archive) == 0
        s.close()
    gc.collect()
    assert _fds_on(archive) == 0
    assert_usable(manager)


def test_an_object_keeps_its_package_open_after_the_package_handle_is_dropped(manager, archive):
    model = manager.load_package(archive).load_pickle("model", "model.pkl")
    gc.collect()
    with manager.acquire_one() as s:
        s.global_("builtins", "len")  # carries any release
    for interp in manager.all_instances():  # loaded lazily, from the same package, in each
        with interp.acquire_session() as s:
            assert s.from_movable(model).attr("weight").deref().shape == (10, 20)
    assert model(torch.zeros(10, 20)).shape == (10, 20)


# -- resources that are not what they are loaded as -------------------------------------


@pytest.fixture(scope="module")
def odd_archive(tmp_path_factory) -> str:
    """A good archive holding a truncated and a garbled pickle, and a text resource."""
    directory = tmp_path_factory.mktemp("odd")
    with zipfile.ZipFile(save_package(directory / "good.pt", torch.nn.Linear(2, 2))) as zf:
        good = zf.read(next(n for n in zf.namelist() if n.endswith("/model/model.pkl")))
    garbled = bytearray(good)
    garbled[len(good) // 3: len(good) // 3 + 8] = b"\x8a\x8b\x6e\x00\xff\x71\x01\x42"
    path = directory / "odd.pt"
    save_package(path, torch.nn.Linear(2, 2), extra_files={
        "model/truncated.pkl": good[: len(good) // 2],
        "model/garbled.pkl": bytes(garbled),
        "model/notes.txt": "not a pickle",
    })
    return str(path)


@pytest.mark.parametrize("resource", ["truncated.pkl", "garbled.pkl", "notes.txt"])
def test_a_resource_that_is_not_a_good_pickle_is_a_package_error_naming_it(
        manager, odd_archive, resource, assert_usable):
    package = manager.load_package(odd_archive)
    with pytest.raises(multipy.PackageError) as info:
        package.load_pickle("model", resource)
    message = str(info.value)
    assert f"model/{resource}" in message and "could not be unpickled" in message
    assert "load_text" in message and "load_binary" in message  # what to use instead
    assert package.load_pickle("model", "model.pkl")(torch.ones(1, 2)).shape == (1, 2)
    assert_usable(manager)


def test_load_text_of_a_pickle_is_a_package_error_naming_it(manager, odd_archive):
    package = manager.load_package(odd_archive)
    with pytest.raises(multipy.PackageError) as info:
        package.load_text("model", "model.pkl")
    message = str(info.value)
    assert "model/model.pkl" in message and "not UTF-8 text" in message
    assert "load_pickle" in message and "load_binary" in message
    assert package.load_text("model", "notes.txt") == "not a pickle"
    assert package.load_binary("model", "model.pkl")[:1] == b"\x80"


# -- wrong-typed arguments -------------------------------------------------------------------


@pytest.fixture(scope="module")
def other(backend):
    """A second manager, started with ``preload`` given as one module name."""
    with multipy.InterpreterManager(1, backend=backend, preload="json") as m:
        yield m


def test_preload_as_one_str_is_one_module_name(other):
    with other.acquire_one() as s:
        assert s.exec_("import sys\nresult = 'json' in sys.modules")


@pytest.mark.parametrize("preload, words", [((None,), "got None"), (3, "a str or a sequence")])
def test_preload_of_something_else_is_a_type_error(preload, words):
    with pytest.raises(TypeError, match="preload names modules") as info:
        multipy.InterpreterManager(1, preload=preload)
    assert words in str(info.value)


def test_a_path_given_as_env_is_a_type_error_suggesting_path_environment():
    with pytest.raises(TypeError) as info:
        multipy.InterpreterManager(1, env="/tmp")
    assert "Environment" in str(info.value) and "PathEnvironment('/tmp')" in str(info.value)


@pytest.mark.parametrize("n, error", [(1.5, TypeError), ("2", TypeError), (True, TypeError)])
def test_a_count_that_is_not_an_int_is_a_type_error(n, error):
    with pytest.raises(error, match="number of interpreters"):
        multipy.InterpreterManager(n)


def test_an_absurd_count_is_refused_naming_the_knob_before_anything_starts(monkeypatch):
    children = set(os.listdir("/proc/self/task"))
    with pytest.raises(ValueError) as info:
        multipy.InterpreterManager(10**6)
    message = str(info.value)
    assert "1000000" in message and "MULTIPY_MAX_INTERPRETERS" in message
    assert set(os.listdir("/proc/self/task")) <= children  # no interpreter thread was started
    monkeypatch.setenv("MULTIPY_MAX_INTERPRETERS", "10")
    with pytest.raises(ValueError, match="limit of 10"):
        multipy.InterpreterManager(11)


def test_a_resource_named_by_something_else_than_str_is_a_type_error(manager, archive):
    package = manager.load_package(archive)
    for load in (package.load_pickle, package.load_text, package.load_binary):
        with pytest.raises(TypeError, match="two str") as info:
            load(None, "model.pkl")
        assert "None" in str(info.value)


def test_global_of_something_else_than_str_is_a_type_error(manager, assert_usable):
    with manager.acquire_one() as s:
        with pytest.raises(TypeError, match=r"global_\(module, name\) takes two str"):
            s.global_(None, "f")
        with pytest.raises(TypeError, match="two str"):
            s.global_("builtins", 3)
        assert s.global_("builtins", "len")([1, 2]).deref() == 2
    assert_usable(manager)


def test_from_movable_of_something_else_than_a_replicated_obj_is_a_type_error(manager, archive):
    with manager.acquire_one() as s:
        obj = s.global_("builtins", "len")
        with pytest.raises(TypeError, match="from_movable takes a ReplicatedObj") as info:
            s.from_movable(obj)
        assert "create_movable" in str(info.value)
        with pytest.raises(TypeError, match="got str"):
            s.from_movable("model.pkl")


def test_an_interpreter_of_another_manager_is_refused(manager, other, archive):
    model = manager.load_package(archive).load_pickle("model", "model.pkl")
    stranger = other.all_instances()[0]
    with pytest.raises(ValueError, match="another InterpreterManager"):
        model.unload(stranger)
    with pytest.raises(ValueError, match="another InterpreterManager"):
        model.acquire_session(stranger)
    with pytest.raises(TypeError, match="expected an Interpreter"):
        model.unload(0)
    with other.acquire_one() as s:
        with pytest.raises(ValueError, match="another InterpreterManager"):
            s.from_movable(model)
    model.unload(manager.all_instances()[0])
    assert model(torch.zeros(10, 20)).shape == (10, 20)


# -- arguments that cannot cross ---------------------------------------------------------------


def _lambda_message(call) -> str:
    with pytest.raises(multipy.TransportError) as info:
        call()
    return str(info.value)


def test_an_argument_that_cannot_cross_is_named_as_the_caller_wrote_it(manager, archive,
                                                                      assert_usable):
    model = manager.load_package(archive).load_pickle("model", "model.pkl")
    with manager.acquire_one() as s:
        f = s.global_("builtins", "repr")
        message = _lambda_message(lambda: f(1, lambda: 0))
        assert message.startswith("argument 2 of the call is a function")
        message = _lambda_message(lambda: f.call_value(1, key={"a": [lambda: 0]}))
        assert message.startswith("keyword argument 'key' of the call at ['a'][0] is a function")
    message = _lambda_message(lambda: model(lambda: 0))
    assert message.startswith("argument 1 of the call is a function")
    message = _lambda_message(lambda: model.call_method("forward", torch.zeros(10, 20), extra=lambda: 0))
    assert message.startswith("keyword argument 'extra' of the call")
    assert "Pass plain values" in message and "Return plain values" not in message
    assert "arguments[" not in message
    assert model(torch.zeros(10, 20)).shape == (10, 20)
    assert_usable(manager)


COUNT_OBJECTS = "from multipy.interp.state import current_state\nresult = len(current_state().objects)"


def with_releases_queued(interp, s):
    """``(objects held, repr)`` in session ``s``, with three objects of another session
    on ``interp`` released and their releases queued for the next request."""
    held = s.exec_(COUNT_OBJECTS)
    f = s.global_("builtins", "repr")
    with interp.acquire_session() as other_session:
        for _ in range(3):
            other_session.global_("builtins", "len")  # released by the next request
    return held, f


def test_an_argument_whose_rebuilding_raises_still_carries_the_releases(manager, assert_usable):
    from _faults import OnLoad

    interp = manager.all_instances()[0]
    with interp.acquire_session() as s:
        held, f = with_releases_queued(interp, s)
        with pytest.raises(RuntimeError, match="injected fault"):
            f.call_value(OnLoad("interpreter", "raise"))  # its own error, type kept
        assert s.exec_(COUNT_OBJECTS) == held + 1
    assert_usable(manager)


class HostOnlyPoint:
    """A class the tests make look defined in the host's ``__main__``."""

    def __init__(self, x):
        self.x = x


def test_an_object_of_a_class_of_the_hosts_main_is_explained(manager, monkeypatch, assert_usable):
    if manager.backend != "process":
        pytest.skip("thread interpreters share the host's __main__, so its classes cross")
    monkeypatch.setattr(HostOnlyPoint, "__module__", "__main__")
    monkeypatch.setattr(sys.modules["__main__"], "HostOnlyPoint", HostOnlyPoint, raising=False)
    interp = manager.all_instances()[0]
    with interp.acquire_session() as s:
        held, f = with_releases_queued(interp, s)
        with pytest.raises(multipy.TransportError) as info:
            f.call_value(HostOnlyPoint(1))
        # The request that could not be rebuilt still released the other session's objects.
        assert s.exec_(COUNT_OBJECTS) == held + 1
        assert f.call_value(2) == "2"
    message = str(info.value)
    assert "'HostOnlyPoint'" in message and "host's __main__" in message
    assert "cannot import" in message and "Move the class into a module" in message
    assert "intern" in message
    assert_usable(manager)
