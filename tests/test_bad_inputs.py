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
import zipfile

import pytest
import torch

import multipy
from multipy.backends.process import ProcessBackend


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
