"""Errors cross cleanly and leave the manager usable.

torch::deploy's ThrowsSafely and ErrorsReplicatingObj, and the failure model
for Python-level errors: the original exception type with the
interpreter-side traceback as ``__cause__``; ``InterpreterError`` when the type
cannot be rebuilt; clear errors for bad packages, missing pickles, missing
extern modules, values that cannot cross and ``Obj`` handles used in the wrong
session.  After every error a normal call must still work.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import textwrap

import pytest
import torch
from torch.package import PackageExporter

import multipy
from multipy.errors import RemoteTraceback

HELPERS = '''
class LocalError(Exception):
    """Exists only inside the interpreters: the host cannot rebuild it."""

def raise_value_error(message):
    raise ValueError(message)  # registered-module raising line

def raise_local_error():
    raise LocalError("local boom")

def make_lambda():
    return lambda: 0

def accept(value):
    return "accepted"

def leave(how):
    import sys
    if how == "exit":
        sys.exit(3)
    if how == "interrupt":
        raise KeyboardInterrupt("raised by the model")
    raise GeneratorExit("closing")
'''


@pytest.fixture(scope="module")
def helpers(manager):
    manager.register_module_source("errors_helper", HELPERS)
    return manager


@pytest.fixture(scope="module")
def simple(helpers, examples):
    return helpers.load_package(examples["simple"]).load_pickle("model", "model.pkl")


# -- exceptions raised by user code ---------------------------------------------------


def test_a_remote_exception_keeps_its_type_and_the_traceback_of_a_file_module(helpers, assert_usable):
    with helpers.acquire_one() as s:
        with pytest.raises(ValueError, match="bad value 17") as info:
            s.global_("_types", "raise_value_error")("bad value 17")
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "raise ValueError(message)  # the line a remote traceback must show" in cause.tb
    assert "_types.py" in cause.tb
    assert str(cause) == cause.tb
    assert_usable(helpers)


def test_a_remote_traceback_shows_the_source_line_of_a_registered_module(helpers, assert_usable):
    with helpers.acquire_one() as s:
        with pytest.raises(ValueError, match="from a registered module") as info:
            s.global_("errors_helper", "raise_value_error")("from a registered module")
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "errors_helper" in cause.tb
    assert "raise ValueError(message)  # registered-module raising line" in cause.tb
    assert_usable(helpers)


def test_an_exception_type_unknown_to_the_host_becomes_interpreter_error(helpers, assert_usable):
    with helpers.acquire_one() as s:
        with pytest.raises(multipy.InterpreterError) as info:
            s.global_("errors_helper", "raise_local_error")()
    error = info.value
    assert error.type_name == "errors_helper.LocalError"
    assert error.message == "local boom"
    assert "LocalError" in str(error) and "local boom" in str(error)
    assert "raise_local_error" in error.remote_traceback
    assert isinstance(error.__cause__, RemoteTraceback)
    assert_usable(helpers)


@pytest.mark.parametrize("how, type_name", [("exit", "builtins.SystemExit"),
                                             ("interrupt", "builtins.KeyboardInterrupt"),
                                             ("generator_exit", "builtins.GeneratorExit")])
def test_sys_exit_or_keyboard_interrupt_raised_by_the_model_is_interpreter_error(
        helpers, assert_usable, how, type_name):
    # Raised as themselves in the host they would end its program (SystemExit) or pass
    # for its own Ctrl-C; blocking, posted and async callers alike get an Exception.
    import asyncio

    with helpers.acquire_one() as s:
        leave = s.global_("errors_helper", "leave")
        with pytest.raises(multipy.InterpreterError) as info:
            leave(how)
        with pytest.raises(multipy.InterpreterError):
            leave.submit(how).result(timeout=60)
        with pytest.raises(multipy.InterpreterError):
            asyncio.run(leave.acall(how))
    assert info.value.type_name == type_name
    assert "raised by the code in the interpreter" in str(info.value)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert_usable(helpers)


def test_replicated_calls_re_raise_remote_exceptions(helpers, simple, assert_usable):
    with pytest.raises(TypeError, match="str"):
        simple("not a tensor")
    with pytest.raises(TypeError, match="positional argument"):
        simple(torch.rand(10, 20), torch.rand(10, 20))  # forward takes one input
    with pytest.raises(RuntimeError, match="size"):
        simple(torch.rand(3, 3))  # shapes do not broadcast
    out = simple(torch.zeros(10, 20))
    assert out.shape == (10, 20)
    assert_usable(helpers)


# -- bad packages (ThrowsSafely) ------------------------------------------------------


def test_loading_a_missing_package_names_the_path(helpers, tmp_path, assert_usable):
    missing = tmp_path / "does_not_exist.pt"
    with pytest.raises(FileNotFoundError, match="does_not_exist.pt"):
        helpers.load_package(missing)
    assert_usable(helpers)


def test_loading_a_file_that_is_not_a_zip_names_the_path(helpers, tmp_path, assert_usable):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a zip archive" * 10)
    with pytest.raises(multipy.PackageError) as info:
        helpers.load_package(garbage)
    assert str(garbage) in str(info.value)
    assert "not a torch.package archive" in str(info.value)
    with pytest.raises(multipy.PackageError, match="directory_package"):
        (tmp_path / "directory_package").mkdir()
        helpers.load_package(tmp_path / "directory_package")
    assert_usable(helpers)


def test_a_missing_pickle_lists_what_the_package_holds(helpers, examples, assert_usable):
    package = helpers.load_package(examples["simple"])
    with pytest.raises(multipy.PackageError) as info:
        package.load_pickle("model", "no_such.pkl")
    message = str(info.value)
    assert "model/no_such.pkl" in message
    assert "model/model.pkl" in message and "model/example.pkl" in message
    with pytest.raises(multipy.PackageError, match="model/model.pkl"):
        package.load_text("extra_files", "missing_text")
    assert package.load_pickle("model", "model.pkl")(torch.zeros(10, 20)).shape == (10, 20)
    assert_usable(helpers)


EXTERN_MODULE = "multipy_test_fake_dep_xyz"


@pytest.fixture
def package_with_missing_extern(tmp_path):
    """An archive whose model class lives in an extern module that the interpreters lack:
    the module exists only while the archive is written."""
    source_dir = tmp_path / "src"
    source_dir.mkdir()
    (source_dir / f"{EXTERN_MODULE}.py").write_text(textwrap.dedent("""
        import torch

        class Thing(torch.nn.Module):
            def forward(self, x):
                return x
    """))
    path = tmp_path / "needs_extern.pt"
    sys.path.insert(0, str(source_dir))
    try:
        module = importlib.import_module(EXTERN_MODULE)
        with PackageExporter(str(path)) as exporter:
            exporter.extern(EXTERN_MODULE)
            exporter.save_pickle("model", "model.pkl", module.Thing())
    finally:
        sys.path.remove(str(source_dir))
        sys.modules.pop(EXTERN_MODULE, None)
        importlib.invalidate_caches()
    assert importlib.util.find_spec(EXTERN_MODULE) is None
    return path


def test_an_extern_module_the_environment_lacks_is_named(helpers, package_with_missing_extern,
                                                         assert_usable):
    package = helpers.load_package(package_with_missing_extern)
    with pytest.raises(multipy.ExternModuleError) as info:
        package.load_pickle("model", "model.pkl")
    message = str(info.value)
    assert EXTERN_MODULE in message
    assert "sys.path" in message  # the paths searched
    assert isinstance(info.value, ModuleNotFoundError)
    assert_usable(helpers)


# -- ownership (ErrorsReplicatingObj) -------------------------------------------------


def test_create_movable_of_an_obj_from_another_session_is_refused(helpers, assert_usable):
    first, second = helpers.all_instances()
    with first.acquire_session() as a, second.acquire_session() as b:
        module = a.global_("torch.nn", "Module")()
        with pytest.raises(multipy.OwnershipError, match="different session"):
            b.create_movable(module)
        with pytest.raises(multipy.OwnershipError, match="different session"):
            helpers.create_movable(module, b)
        assert a.create_movable(module).hasattr("forward")
    assert_usable(helpers)


def test_an_obj_from_another_session_on_the_same_interpreter_is_refused(helpers, assert_usable):
    interp = helpers.all_instances()[0]
    with interp.acquire_session() as a, interp.acquire_session() as b:
        module = a.global_("torch.nn", "Module")()
        assert b.is_owner(module) is False and a.is_owner(module) is True
        with pytest.raises(multipy.OwnershipError, match="different session"):
            b.create_movable(module)
    assert_usable(helpers)


def test_an_obj_passed_to_another_sessions_call_is_refused(helpers, assert_usable):
    first, second = helpers.all_instances()
    with first.acquire_session() as a, second.acquire_session() as b:
        module = a.global_("torch.nn", "Module")()
        with pytest.raises(multipy.OwnershipError, match="different session"):
            b.global_("builtins", "id")(module)
        with pytest.raises(multipy.OwnershipError, match="different session"):
            b.global_("builtins", "id")(x=[module])
        # the owning session still uses it
        assert a.global_("builtins", "isinstance")(module, a.global_("torch.nn", "Module")).deref()
    assert_usable(helpers)


def test_an_obj_used_after_its_session_closed_is_refused(helpers, assert_usable):
    with helpers.acquire_one() as s:
        module = s.global_("torch.nn", "Module")()
        length = s.global_("builtins", "len")
    with pytest.raises(multipy.OwnershipError, match="closed"):
        module.deref()
    with pytest.raises(multipy.OwnershipError, match="closed"):
        length([1, 2])
    with pytest.raises(multipy.OwnershipError, match="closed"):
        module.attr("training")
    assert_usable(helpers)


# -- values that cannot cross ----------------------------------------------------------


def test_a_result_that_cannot_cross_names_its_type(helpers, assert_usable):
    with helpers.acquire_one() as s:
        made = s.global_("errors_helper", "make_lambda")()  # fine: it stays inside
        assert made().deref() == 0
        with pytest.raises(multipy.TransportError, match="function"):
            made.deref()
        with pytest.raises(multipy.TransportError, match="function"):
            s.global_("errors_helper", "make_lambda").call_value()
        assert s.global_("builtins", "sum")([1, 2]).deref() == 3
    with helpers.acquire_one() as s:
        replicated = s.create_movable(s.global_("_types", "make_lambda"))
    with pytest.raises(multipy.TransportError, match="function"):
        replicated()
    assert_usable(helpers)


def test_an_argument_that_cannot_cross_names_its_type(helpers, simple, assert_usable):
    with helpers.acquire_one() as s:
        accept = s.global_("errors_helper", "accept")
        with pytest.raises(multipy.TransportError, match="function"):
            accept(lambda: 0)
        with pytest.raises(multipy.TransportError, match="function"):
            accept({"nested": [lambda: 0]})
        assert accept(1).deref() == "accepted"
    with pytest.raises(multipy.TransportError, match="function"):
        simple(lambda: 0)
    assert simple(torch.zeros(10, 20)).shape == (10, 20)
    assert isinstance(multipy.TransportError("x"), TypeError)
    assert_usable(helpers)
