"""A reply reaches only its caller on the ``subinterpreter`` backend: a call
interrupted before its request is written, while its caller waits, or while its
result is unpickled never shifts the answers of later calls.

The same points as ``test_interrupts.py`` (which covers the other backends),
with pure-Python helpers: CPython 3.13+, no torch (``make test-subinterpreters``).
An interrupt while the caller waits abandons the subinterpreter (a new one
serves later calls); the others keep it.
"""

from __future__ import annotations

import sys

import pytest

if sys.version_info < (3, 13):
    pytest.skip("the subinterpreter backend needs CPython 3.13+ (own-GIL `_interpreters`); "
                "run `make test-subinterpreters`, which uses pyenv's 3.13",
                allow_module_level=True)

from _interrupting import arm, interrupted_while_waiting, sigusr1_interrupts
from multipy import InterpreterManager

HELPERS = '''
import os
import signal

def echo(value):
    return value

def gate(directory, value):
    with open(os.path.join(directory, "started"), "w") as f:
        f.write("s")
    with open(os.path.join(directory, "release")) as f:
        f.read()
    return value

class RaisesSignalWhenUnpickled:
    def __reduce__(self):
        return (signal.raise_signal, (signal.SIGUSR1,))

def interrupting_result():
    return RaisesSignalWhenUnpickled()
'''


class InterruptsWhenPickled:
    """An argument whose pickling in the host raises KeyboardInterrupt."""

    def __reduce__(self):
        raise KeyboardInterrupt("while pickling the arguments")


@pytest.fixture(scope="module")
def manager():
    with sigusr1_interrupts(), InterpreterManager(1, backend="subinterpreter") as m:
        m.register_module_source("helpers", HELPERS)
        yield m


def call(manager, name, *args):
    with manager.acquire_one() as s:
        return s.global_("helpers", name).call_value(*args)


def assert_own_answers(manager, n: int = 20) -> None:
    for i in range(n):
        try:
            out = call(manager, "echo", ("answer", i))
        except KeyboardInterrupt as exc:  # would end the test session: fail this test only
            pytest.fail(f"call {i} was interrupted by another call's result: {exc!r}")
        assert out == ("answer", i), f"call {i} got {out!r}, not its own answer"


def test_interrupted_before_the_request_is_written(manager):
    with pytest.raises(KeyboardInterrupt):
        call(manager, "echo", InterruptsWhenPickled())
    assert_own_answers(manager)


def test_interrupted_while_waiting_for_the_reply(manager):
    interrupted_while_waiting(lambda directory: call(manager, "gate", directory, ("stale", 7)))
    assert_own_answers(manager)


def test_interrupted_while_the_result_is_unpickled(manager):
    arm()
    with pytest.raises(KeyboardInterrupt):
        call(manager, "interrupting_result")
    assert_own_answers(manager)

