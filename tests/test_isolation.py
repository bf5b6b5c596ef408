"""Interpreters are isolated: separate object spaces, module globals and registered modules.

torch::deploy's DifferentInterps and RegisterModule.  deploy proved separate
heaps with ``id(None)`` differing between interpreters; multipy's process
interpreters are forked from one fork server, so static objects such as
``None`` sit at the same *virtual* address in every one of them even though
the address spaces are separate.  These tests therefore check the isolation
itself: a change made in one interpreter is not seen by another.
"""

from __future__ import annotations

import importlib.util
import os

import re

import pytest

STATE_MODULE = """
VALUE = 0

def set_value(v):
    global VALUE
    VALUE = v
    return VALUE

def get_value():
    return VALUE
"""


@pytest.fixture(scope="module")
def registered(manager):
    manager.register_module_source("isolation_state", STATE_MODULE)
    manager.register_module_source("foomodule", "def add1(x):\n    return x + 1\n")
    return manager


def _interp(manager, index):
    return manager.all_instances()[index]


def test_interpreters_run_in_separate_processes(manager):
    if manager.backend != "process":
        pytest.skip(f"the {manager.backend} backend runs every interpreter in the host process")
    pids = []
    for interp in manager.all_instances():
        with interp.acquire_session() as s:
            pids.append(s.global_("os", "getpid")().deref())
    assert pids == [i.pid for i in manager.all_instances()]
    assert len(set(pids)) == 2
    assert os.getpid() not in pids


def test_a_builtin_changed_in_one_interpreter_is_unchanged_in_another(manager):
    if manager.backend == "thread":
        pytest.skip("thread interpreters share the builtins module of their host process")
    with _interp(manager, 0).acquire_session() as s:
        builtins = s.global_("builtins", "__import__")("builtins")
        s.global_("builtins", "setattr")(builtins, "multipy_isolation_marker", 7)
        assert s.global_("builtins", "multipy_isolation_marker").deref() == 7
    try:
        with _interp(manager, 1).acquire_session() as s:
            builtins = s.global_("builtins", "__import__")("builtins")
            assert s.global_("builtins", "hasattr")(builtins, "multipy_isolation_marker").deref() is False
        import builtins as host_builtins

        assert not hasattr(host_builtins, "multipy_isolation_marker")
    finally:
        with _interp(manager, 0).acquire_session() as s:
            builtins = s.global_("builtins", "__import__")("builtins")
            s.global_("builtins", "delattr")(builtins, "multipy_isolation_marker")


def test_a_module_global_set_in_one_interpreter_is_unchanged_in_the_others(registered):
    manager = registered
    try:
        with _interp(manager, 0).acquire_session() as s:
            assert s.global_("isolation_state", "set_value")(42).deref() == 42
            assert s.global_("isolation_state", "get_value")().deref() == 42
        with _interp(manager, 1).acquire_session() as s:
            assert s.global_("isolation_state", "get_value")().deref() == 0
            assert s.global_("isolation_state", "VALUE").deref() == 0
        with _interp(manager, 0).acquire_session() as s:
            assert s.global_("isolation_state", "get_value")().deref() == 42
    finally:
        with _interp(manager, 0).acquire_session() as s:
            s.global_("isolation_state", "set_value")(0)


def test_registered_module_works_in_every_interpreter(registered):
    manager = registered
    seen = []
    for interp in manager.all_instances():
        with interp.acquire_session() as s:
            assert s.global_("foomodule", "add1")(2).deref() == 3
            seen.append(s.global_("multipy", "interpreter_id")().deref())
    assert seen == [0, 1]


def test_registered_modules_are_not_importable_in_the_host(registered):
    assert importlib.util.find_spec("foomodule") is None
    assert importlib.util.find_spec("isolation_state") is None


def test_each_interpreter_has_its_own_copy_of_a_registered_module(registered):
    manager = registered
    first, second = manager.all_instances()
    try:
        with first.acquire_session() as s:
            module = s.global_("importlib", "import_module")("isolation_state")
            s.global_("builtins", "setattr")(module, "COPY_OF", first.index)
        with second.acquire_session() as s:  # the first interpreter's change is not seen here
            module = s.global_("importlib", "import_module")("isolation_state")
            assert s.global_("builtins", "hasattr")(module, "COPY_OF").deref() is False
            s.global_("builtins", "setattr")(module, "COPY_OF", second.index)
        with first.acquire_session() as s:  # nor this one's there
            assert s.global_("isolation_state", "COPY_OF").deref() == first.index
    finally:
        for interp in (first, second):
            with interp.acquire_session() as s:
                s.exec_("import isolation_state\nisolation_state.__dict__.pop('COPY_OF', None)\nresult = None")


def test_registering_a_module_again_replaces_it_everywhere(registered):
    manager = registered
    manager.register_module_source("versioned_module", "VERSION = 1")
    for interp in manager.all_instances():
        with interp.acquire_session() as s:
            assert s.global_("versioned_module", "VERSION").deref() == 1
    manager.register_module_source("versioned_module", "VERSION = 2")
    for interp in manager.all_instances():
        with interp.acquire_session() as s:
            assert s.global_("versioned_module", "VERSION").deref() == 2


def test_a_module_source_with_a_syntax_error_is_refused_in_the_host(registered, assert_usable):
    with pytest.raises(SyntaxError) as info:
        registered.register_module_source("broken_module", "def f(:\n    pass\n")
    assert info.value.filename == "<registered module broken_module>" and info.value.lineno == 1
    assert_usable(registered)
    with registered.acquire_one() as s:
        with pytest.raises(ModuleNotFoundError, match="broken_module"):
            s.global_("broken_module", "f")


@pytest.mark.parametrize("name, source, words", [
    ("numbers", 5, "source is the module's Python source text, a str, got int 5"),
    ("numbers", b"X = 1", "a str, got bytes"),
    (5, "X = 1", "name is a module name"),
    ("not a name", "X = 1", "got str 'not a name'"),
    ("", "X = 1", "name is a module name"),
])
def test_a_module_registered_with_a_wrong_name_or_source_is_refused_with_what_is_expected(
        registered, assert_usable, name, source, words):
    with pytest.raises(TypeError, match=re.escape(words)):
        registered.register_module_source(name, source)
    assert_usable(registered)
