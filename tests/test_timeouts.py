"""Timeouts: bad values are refused where they are given, ``None`` and ``inf``
mean no timeout, and loading an object is never bounded by a call's timeout.

The manager here has ``call_timeout=CALL_TIMEOUT``; the "slow" work below
(sleeping, loading) takes twice that inside the interpreter, so a timeout
applied where it must not be always fires, however slow the machine.
"""

from __future__ import annotations

import math

import pytest
import torch

import multipy
from _faults import SlowToLoad
from multipy.runtime.timeouts import check_timeout

CALL_TIMEOUT = 0.5
BAD = [("1", TypeError), (0, ValueError), (-1, ValueError), (float("nan"), ValueError),
       (True, TypeError), ([1], TypeError)]


@pytest.fixture(scope="module")
def manager(backend):
    with multipy.InterpreterManager(1, backend=backend, call_timeout=CALL_TIMEOUT) as m:
        yield m


@pytest.fixture(scope="module")
def run(manager):
    with manager.acquire_one() as s:
        return s.create_movable(s.global_("_faults", "run"))


def generation(manager) -> int:
    return manager.statistics().interpreters[0].generation


def assert_own_answers(run, n: int = 20) -> None:
    for i in range(n):
        x = torch.full((2,), float(i))
        assert torch.equal(run("echo", x), x), f"call {i} did not get its own answer"


@pytest.mark.parametrize("value, error", BAD, ids=repr)
def test_a_bad_call_timeout_is_refused_naming_it(backend, value, error):
    with pytest.raises(error, match="call_timeout"):
        multipy.InterpreterManager(1, backend=backend, call_timeout=value)


@pytest.mark.parametrize("value, error", BAD, ids=repr)
def test_a_bad_with_timeout_is_refused_before_anything_is_sent(manager, run, value, error):
    before = generation(manager)
    with pytest.raises(error, match="with_timeout"):
        run.with_timeout(value)("echo", torch.ones(2))
    assert_own_answers(run)
    assert generation(manager) == before  # a healthy interpreter is never killed for it


@pytest.mark.parametrize("value", [None, math.inf], ids=repr)
def test_none_and_inf_mean_no_timeout_even_under_a_call_timeout(manager, run, value):
    before = generation(manager)
    assert run.with_timeout(value)("sleep", 2 * CALL_TIMEOUT) == 2 * CALL_TIMEOUT
    assert generation(manager) == before


def test_inf_as_call_timeout_means_none():
    assert check_timeout(math.inf, "call_timeout") is None
    assert check_timeout(2, "call_timeout") == 2.0


def test_loading_a_replicated_object_is_not_bounded_by_call_timeout(manager):
    before = generation(manager)
    with manager.acquire_one() as s:
        slow = s.create_movable(s.global_("_faults", "SlowToLoad")(2 * CALL_TIMEOUT))
    assert slow.hasattr("seconds")       # loads it: unbounded
    slow.unload()
    assert slow(5) == 5                  # the first call loads it again, outside its timeout
    slow.unload()
    assert slow.with_timeout(CALL_TIMEOUT)(6) == 6
    assert generation(manager) == before


def test_posted_calls_load_their_object_outside_their_timeout(manager):
    import asyncio

    before = generation(manager)
    with manager.acquire_one() as s:
        slow = s.create_movable(s.global_("_faults", "SlowToLoad")(2 * CALL_TIMEOUT))
    assert slow.submit(5).result(timeout=60) == 5   # loads it first, by a request of its own
    slow.unload()
    assert asyncio.run(slow.acall(6)) == 6
    slow.unload()
    assert slow.batched().submit(7).result(timeout=60) == 7
    assert generation(manager) == before
    assert manager.statistics().interpreters[0].in_flight == 0


def test_load_pickle_is_not_bounded_by_call_timeout(manager, tmp_path):
    path = tmp_path / "slow.pt"
    with torch.package.PackageExporter(str(path)) as exporter:
        exporter.extern("_faults")
        exporter.save_pickle("model", "model.pkl", SlowToLoad(2 * CALL_TIMEOUT))
    before = generation(manager)
    model = manager.load_package(path).load_pickle("model", "model.pkl")
    assert model(7) == 7
    assert generation(manager) == before
