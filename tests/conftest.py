"""Shared fixtures: the example archives and one manager per test module and backend.

Interpreters are expensive to start, so every test module gets one
:class:`~multipy.InterpreterManager` (``manager``, module-scoped) per available
backend and its tests share it.  A module that needs more interpreters says so
with a module-level ``INTERPRETERS = 3``.  Tests that a backend cannot run call
``pytest.skip`` with the reason, based on ``manager.backend``.

The example archives are written once per session (``examples``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import multipy
from multipy.backends.base import BackendKind
from multipy.backends.capabilities import detect, why_unavailable
from multipy.examples import generate

TESTS_DIR = Path(__file__).resolve().parent

# Helper types (tests/_types.py) must be importable by the same module name in the
# host and in every interpreter; interpreters inherit the host's sys.path when
# the manager is created, so the tests directory must be on it first.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

#: Every backend the suite runs on: ``process`` always, the others where this
#: Python and this multipy build can run them.
BACKENDS = ["process"] + [
    name for name in ("thread",) if why_unavailable(BackendKind(name), detect()) is None
]


@pytest.fixture(scope="session")
def examples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{name: path}`` of every example archive (TorchScript references next to them)."""
    return generate(tmp_path_factory.mktemp("examples"))


@pytest.fixture(scope="session")
def example_inputs():
    """``example_inputs(path)``: the example inputs stored in an archive, loaded in the host."""

    def load(path: str | os.PathLike) -> tuple:
        return torch.package.PackageImporter(str(path)).load_pickle("model", "example.pkl")

    return load


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The backend name; module-scoped so each module runs once per backend."""
    return request.param


@pytest.fixture(scope="module")
def manager(request: pytest.FixtureRequest, backend: str):
    """One manager for the whole test module (``INTERPRETERS`` of them, default 2)."""
    n = getattr(request.module, "INTERPRETERS", 2)
    with multipy.InterpreterManager(n, backend=backend) as m:
        yield m


@pytest.fixture
def gate(tmp_path) -> tuple[str, str]:
    """A gate file path for ``_rows.rows(gate=...)`` (closed until ``_rows.open_gate``)
    and a log path for ``rows(log=...)``."""
    return str(tmp_path / "gate"), str(tmp_path / "log")


@pytest.fixture(scope="session")
def assert_usable():
    """``assert_usable(manager)``: every interpreter still serves an ordinary call."""

    def check(manager: multipy.InterpreterManager) -> None:
        for interp in manager.all_instances():
            with interp.acquire_session() as s:
                assert s.global_("builtins", "sum")([1, 2, 3]).deref() == 6
                out = s.global_("torch", "ones")(2, 2).deref()
            assert torch.equal(out, torch.ones(2, 2))

    return check


@pytest.fixture(scope="module")
def rows_model(manager):
    """``_rows.rows`` as a ReplicatedObj of the module's manager (``x * 2 + 1``;
    gates, logs and crashes on request: see tests/_rows.py)."""
    from _rows import movable_rows

    return movable_rows(manager)
