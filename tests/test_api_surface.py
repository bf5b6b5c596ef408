"""The public API is exactly what ``multipy.__all__`` declares, and deploy's pybind cases work.

A change to the public surface must be deliberate: it shows up here.  The
pybind cases are torch::deploy's Python-binding tests (print, tensor passing,
``len(manager)``).
"""

from __future__ import annotations

import pytest
import torch

import multipy

EXPECTED_ALL = [
    "BackendUnavailableError",
    "CallTimeoutError",
    "Environment",
    "ExternModuleError",
    "Interpreter",
    "InterpreterCrashedError",
    "InterpreterError",
    "InterpreterManager",
    "InterpreterSession",
    "InterpreterStartError",
    "InterpreterStatistics",
    "ManagerClosedError",
    "ManagerStatistics",
    "MultipyError",
    "NoopEnvironment",
    "Obj",
    "OwnershipError",
    "Package",
    "PackageError",
    "PathEnvironment",
    "ReplicatedObj",
    "TransportError",
    "interpreter_device",
    "interpreter_id",
    "shared_location",
]

ERRORS = ["BackendUnavailableError", "CallTimeoutError", "ExternModuleError",
          "InterpreterCrashedError", "InterpreterError", "InterpreterStartError",
          "ManagerClosedError", "OwnershipError", "PackageError", "TransportError"]


def test_all_is_the_expected_public_surface():
    assert sorted(multipy.__all__) == sorted(EXPECTED_ALL)
    assert len(multipy.__all__) == len(set(multipy.__all__))


@pytest.mark.parametrize("name", EXPECTED_ALL)
def test_every_public_name_is_importable_and_documented(name):
    namespace: dict = {}
    exec(f"from multipy import {name}", namespace)
    obj = namespace[name]
    assert obj.__module__.startswith("multipy."), f"multipy.{name} comes from {obj.__module__}"
    assert (obj.__doc__ or "").strip(), f"multipy.{name} has no docstring"


@pytest.mark.parametrize("name", ERRORS)
def test_every_error_is_a_multipy_error(name):
    assert issubclass(getattr(multipy, name), multipy.MultipyError)


def test_runtime_names_are_the_same_objects_as_the_top_level_ones():
    import multipy.runtime as runtime

    for name in runtime.__all__:
        assert getattr(runtime, name) is getattr(multipy, name)


def test_version_is_a_string():
    assert isinstance(multipy.__version__, str) and multipy.__version__.count(".") >= 1


# -- torch::deploy's pybind tests -----------------------------------------------------------


def test_pybind_print_hello(manager, capsys):
    with manager.acquire_one() as s:
        result = s.global_("builtins", "print")("hello!")
        assert result.deref() is None
    assert "hello!" in capsys.readouterr().out


def test_pybind_tensor_passing_conv2d(manager):
    torch.manual_seed(0)
    with manager.acquire_one() as s:
        conv = s.global_("torch.nn", "Conv2d")(6, 2, 2, 1)
        out = conv(torch.ones(1, 6, 6, 6)).deref()
        weight, bias = conv.attr("weight").deref(), conv.attr("bias").deref()
    assert type(out) is torch.Tensor
    assert out.shape == (1, 2, 5, 5)
    expected = torch.nn.functional.conv2d(torch.ones(1, 6, 6, 6), weight.detach(), bias.detach())
    torch.testing.assert_close(out, expected)


def test_pybind_multiple_len_manager(manager):
    assert len(manager) == 2
