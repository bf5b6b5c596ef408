"""A served request's reply settled in C (``_native.ring_awaited``): when an event
loop's bell rings for its one call in flight, a lone awaited request whose reply is
the common one, the reply is settled, the call ended and the loop's future set in
one C call; anything else goes on in Python (``BellWatch.on_bell``).  These tests
count which path each ring took and check that both leave the same statistics,
errors and interpreter state.

Calls that must stay in flight wait inside the interpreter for a gate file
(``_rows.rows(gate=...)``), so nothing here depends on timing.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import torch

import multipy
from _rows import logged, open_gate
from _awaited import books as _state, call_on_loop as _call, delta as _delta, idle
from _wait import wait_for
from multipy.backends.completions import LoopCompletions
from multipy.transport import channel

INTERPRETERS = 2

# A ring that raises is reported as unraisable (the loop's callback): a failure here.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def model(manager, backend):
    if backend != "process" or channel._ring_awaited is None:
        pytest.skip("the ring in C is the process backend's, on the call channel")
    with manager.acquire_one() as s:
        return s.create_movable(s.global_("_rows", "rows"))


@pytest.fixture(autouse=True)
def no_poll(monkeypatch):
    """Every reply here comes by the bell: the loop's poll for a lone call's reply
    (tests/test_reply_poll.py) would settle most of them before it rings."""
    monkeypatch.setattr(LoopCompletions, "reply_poll", 0.0)


@pytest.fixture
def rings(monkeypatch):
    """What each ring of a loop's bell did: [Python path, settled in C]; ``off()``
    sends every ring down the Python path."""
    class Taken(list):
        def off(self):
            monkeypatch.setattr(channel, "_ring_awaited", None)

    real, taken = channel._ring_awaited, Taken([0, 0])

    def counting(watch, completions):
        done = real(watch, completions)
        taken[done] += 1
        return done

    monkeypatch.setattr(channel, "_ring_awaited", counting)
    return taken





def _one_at_a_time(model, n):
    async def main():
        return [await _call(model, torch.full((2,), float(i))) for i in range(n)]

    return asyncio.run(main())


def test_one_call_at_a_time_is_settled_in_c_with_the_python_paths_statistics(
        model, manager, rings):
    before = _state(manager)
    outs = _one_at_a_time(model, 30)
    in_c = _delta(before, _state(manager))
    assert [o[0].item() for o in outs] == [i * 2 + 1 for i in range(30)]
    assert rings[1] >= 20, rings  # (a reply there before its watch still rings once)

    rings.off()
    before = _state(manager)
    outs = _one_at_a_time(model, 30)
    in_python = _delta(before, _state(manager))
    assert [o[0].item() for o in outs] == [i * 2 + 1 for i in range(30)]
    assert in_c == in_python == {"calls": 30, "latencies": 30, "failures": 0,
                                 **idle(INTERPRETERS)}


def test_an_error_reply_goes_the_python_way_and_keeps_its_type(model, manager, rings):
    async def main():
        with pytest.raises(ValueError, match="negative input") as info:
            await _call(model, torch.full((2,), -1.0))
        return info.value

    before = _state(manager)
    error = asyncio.run(main())
    assert _delta(before, _state(manager))["failures"] == 1
    assert rings[1] == 0 and rings[0] >= 1
    assert error.__cause__ is not None  # the interpreter's traceback, as for any call
    rings.off()
    before = _state(manager)
    asyncio.run(main())
    assert _delta(before, _state(manager))["failures"] == 1


def test_a_call_cancelled_in_flight_is_counted_and_its_result_dropped(
        model, manager, rings, tmp_path, assert_usable):
    gate, log = str(tmp_path / "gate"), str(tmp_path / "log")

    async def main():
        slow = asyncio.ensure_future(_call(model, torch.zeros(1), gate=gate, log=log, tag="c"))
        await asyncio.to_thread(wait_for, lambda: logged(log), "the call to start")
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        open_gate(gate)
        # the cancelled call's reply is still read: its interpreter comes back
        while any(manager._balancer._load):
            await asyncio.sleep(0.01)

    before = _state(manager)
    asyncio.run(main())
    after = _delta(before, _state(manager))
    assert after["calls"] == 1 and after["failures"] == 0
    assert after["load"] == [0] * INTERPRETERS and after["in_flight"] == [0] * INTERPRETERS
    assert_usable(manager)


def test_an_interpreter_killed_mid_call_fails_the_awaited_call_at_once(
        model, manager, rings, tmp_path):
    gate, log = str(tmp_path / "gate"), str(tmp_path / "log")  # never opened

    async def main():
        call = asyncio.ensure_future(_call(model, torch.zeros(1), gate=gate, log=log, tag="k"))
        await asyncio.to_thread(wait_for, lambda: logged(log), "the call to start")
        os.kill(int(logged(log)[0][1]), signal.SIGKILL)
        with pytest.raises(multipy.InterpreterCrashedError):
            await asyncio.wait_for(call, 120)  # the bell's end-of-file, not a timeout

    asyncio.run(main())
    assert rings[1] == 0  # the dead interpreter's ring went the Python way
    # the replacement serves the next calls, settled in C again
    wait_for(lambda: all(w.dead_reason is None and w._started for w in manager._workers),
             "the replacement to start")
    outs = _one_at_a_time(model, 10)
    assert [o[0].item() for o in outs] == [i * 2 + 1 for i in range(10)]
    assert rings[1] >= 5


class _NoMemoryToCount(int):
    """A worker's call count whose next increment fails as if memory had run out."""

    def __add__(self, other):
        raise MemoryError("no memory left to count the call")


def test_an_error_after_the_reply_was_taken_ends_the_call_with_it(model, manager, rings,
                                                                    assert_usable):
    # Past the settle the reply is the call's alone: an error in the books that follow
    # (here counting the call) must still give back the interpreter and its count and
    # tell the caller, never leave the call for ever in flight.
    async def main():
        return await asyncio.wait_for(_call(model, torch.ones(2)), 60)

    _one_at_a_time(model, 2)  # loaded everywhere (a first load goes the Python way)
    before, settled = _state(manager), rings[1]
    workers = manager._workers
    calls = [w.calls for w in workers]
    try:
        for w in workers:
            w.calls = _NoMemoryToCount(w.calls)
        with pytest.raises(MemoryError, match="no memory left to count"):
            asyncio.run(main())
    finally:
        for w, n in zip(workers, calls):
            w.calls = n
    assert rings[1] == settled + 1  # it was the ring settled in C
    assert _delta(before, _state(manager)) == {
        "calls": 0, "latencies": 0, "failures": 1, **idle(INTERPRETERS)}
    assert not any(w.lock.locked() for w in workers)
    assert [o[0].item() for o in _one_at_a_time(model, 3)] == [1.0, 3.0, 5.0]
    assert_usable(manager)


def test_a_served_request_is_settled_in_c(manager, backend, tmp_path):
    # The served path itself (the HTTP app, its handler and ServedModel.infer), not a
    # stand-in: ring_awaited recognises its case by the names of the objects it walks,
    # and a rename anywhere on the way would send every request the Python way.
    pytest.importorskip("starlette", reason="needs the serve extra: pip install 'multipy[serve]'")
    import _serve_models
    from starlette.testclient import TestClient

    from multipy import _native
    from multipy.serve import ModelRegistry, ServeOptions, build_app
    from multipy.serve.protocol import decode_response, encode_request

    if backend != "process" or channel._ring_awaited is None:
        pytest.skip("the ring in C is the process backend's, on the call channel")
    archive = tmp_path / "models.pt"
    _serve_models.write(archive)
    registry = ModelRegistry(manager, {"affine": f"{archive}:model/affine.pkl"}, ServeOptions())
    body, _ = encode_request([("INPUT__0", torch.ones(2, 3))], binary=False)
    with TestClient(build_app(registry)) as client:
        answers = []
        for i in range(20):
            if i == 5:  # loaded by then (a first load goes the Python way)
                settled = _native.ring_settled()
            response = client.post("/v2/models/affine/infer", content=body)
            assert response.status_code == 200, response.text
            answers.append(decode_response(response.content, None))
        settled = _native.ring_settled() - settled
    assert all(len(a) == len(answers[0]) for a in answers)
    # One request at a time: each ring settles its request in C (a reply there before
    # its watch rang still rings once, and that ring finds nothing: hence not all 15).
    assert settled >= 10, settled
