"""The loop's poll for a lone awaited call's reply (``_native.poll_awaited``): right
after a served request is sent, when it is the one call in flight of the process and
its interpreter took it at once, the loop polls the reply slot (up to
``LoopCompletions.reply_poll``) instead of going back to epoll, settles the reply in
C (its ``await`` does not suspend) and the interpreter rings no bell for it.

These tests check that a polled call leaves the same books as a rung one, that a
reply that comes after the poll gave up still resolves its call (the bell rings for
it: the host clears the polled word before its last look), that an interpreter
dying during the poll fails the call at once, and that calls racing the poll's end
never lose their wake-up.  Gated calls (``_rows.rows(gate=...)``) decide what is in
flight; the interpreter's own timing only decides how many tries a case takes.
"""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

import multipy
from _rows import logged, open_gate
from _awaited import books as _state, call_on_loop as _call, delta as _delta, idle
from _wait import wait_for
from multipy.backends.completions import LoopCompletions
from multipy.runtime import dispatch
from multipy.transport import channel

INTERPRETERS = 2
TRIES = 300  # one-at-a-time calls a case may take to meet an awake interpreter

pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def model(manager):
    with manager.acquire_one() as s:
        return s.create_movable(s.global_("_rows", "rows"))


@pytest.fixture
def polls(monkeypatch, backend):
    """What each poll did: the list of poll_awaited's answers (True settled, False gave
    up, None not polled); ``budget(seconds)`` sets the loops' poll; rings of the bell
    are counted in ``polls.rings``."""
    if dispatch._poll_awaited is None:
        pytest.skip("the poll is the extension's (MULTIPY_NATIVE=0 runs without it)")

    class Polls(list):
        rings = 0

        def budget(self, seconds):
            monkeypatch.setattr(LoopCompletions, "reply_poll", seconds)

    real, taken = dispatch._poll_awaited, Polls()

    def counting(request):
        got = real(request)
        taken.append(got)
        return got

    def ring(watch, completions, real_ring=channel._ring_awaited):
        taken.rings += 1
        return real_ring(watch, completions) if real_ring is not None else False

    monkeypatch.setattr(dispatch, "_poll_awaited", counting)
    monkeypatch.setattr(channel, "_ring_awaited", ring)
    return taken





def _until_settled(model, polls, wanted):
    """Calls one at a time until ``wanted`` of them were settled by the poll (or TRIES
    calls were made): their outputs."""
    async def main():
        outs = []
        while polls.count(True) < wanted and len(outs) < TRIES:
            outs.append(await _call(model, torch.full((2,), float(len(outs)))))
        return outs

    return asyncio.run(main())


def test_a_polled_call_leaves_the_books_of_a_rung_one_and_rings_no_bell(
        model, manager, backend, polls):
    polls.budget(0.5)
    before, rings = _state(manager), polls.rings
    outs = _until_settled(model, polls, 10)
    n, settled = len(outs), polls.count(True)
    polled = _delta(before, _state(manager))
    assert [o[0].item() for o in outs] == [i * 2 + 1 for i in range(n)]
    if backend != "process":  # no shared-memory channel: nothing to poll
        assert set(polls) == {None}
        return
    assert settled == 10, polls
    # A polled reply rings no bell (at worst one in a race: the interpreter read the
    # polled word after the loop, having found the reply, cleared it).
    assert polls.rings - rings <= n - settled + settled // 2, (polls.rings - rings, polls)

    polls.budget(0.0)  # the same calls, every reply rung for
    del polls[:]
    before = _state(manager)
    outs = _until_settled(model, polls, 1)  # (none is polled: TRIES calls)
    rung = _delta(before, _state(manager))
    # none is polled (at budget 0 submit_async does not ask)
    assert all(p is None for p in polls) and len(outs) == TRIES
    assert polled == {**rung, "calls": n, "latencies": n}
    assert rung == {"calls": TRIES, "latencies": TRIES, "failures": 0, **idle(INTERPRETERS)}


def _gated_poll(model, polls, gate, log, tag, **kwargs):
    """A gated call whose poll ran and gave up (tried after a quick call, which leaves
    its interpreter awake, until one did): its task, still waiting for its gate."""
    async def main():
        for attempt in range(TRIES):
            await _call(model, torch.ones(1))  # the interpreter is awake and spinning
            del polls[:]
            task = asyncio.ensure_future(_call(model, torch.zeros(1), gate=gate, log=log,
                                               tag=f"{tag}{attempt}", **kwargs))
            await asyncio.sleep(0)  # the task's first step: the send, then the poll
            if polls == [False]:
                return task
            open_gate(gate)  # not polled (its interpreter was asleep): again
            await task
            os.unlink(gate)
        raise AssertionError(f"no poll in {TRIES} tries: {polls}")

    return main


def test_a_reply_after_the_poll_gave_up_still_resolves_its_call(
        model, manager, backend, polls, tmp_path, assert_usable):
    if backend != "process":
        pytest.skip("the poll is the process backend's, on the call channel")
    gate, log = str(tmp_path / "gate"), str(tmp_path / "log")
    polls.budget(0.02)  # gives up while the call waits for its gate

    async def main():
        task = await _gated_poll(model, polls, gate, log, "late")()
        assert not task.done()
        open_gate(gate)
        return await asyncio.wait_for(task, 120)  # the bell rang for it: no timeout

    before = _state(manager)
    out = asyncio.run(main())
    assert out.tolist() == [1.0]
    after = _delta(before, _state(manager))
    assert after["failures"] == 0 and after["load"] == [0] * INTERPRETERS
    assert after["in_flight"] == [0] * INTERPRETERS and after["posted"] == [0] * INTERPRETERS
    assert_usable(manager)


def test_many_calls_racing_the_polls_end_all_resolve(model, manager, backend, polls):
    if backend != "process":
        pytest.skip("the poll is the process backend's, on the call channel")
    # Polls that give up about when the reply comes: the host's last look and the
    # interpreter's read of the polled word race; a lost bell would hang a call.
    budgets = [2e-6, 5e-6, 10e-6, 20e-6, 40e-6, 80e-6, 160e-6]

    async def main():
        outs = []
        for i in range(400):
            LoopCompletions.reply_poll = budgets[i % len(budgets)]
            outs.append(await asyncio.wait_for(_call(model, torch.full((1,), float(i))), 120))
        return outs

    polls.budget(budgets[0])
    before = _state(manager)
    outs = asyncio.run(main())
    assert [o.item() for o in outs] == [i * 2 + 1 for i in range(400)]
    assert _delta(before, _state(manager)) == {
        "calls": 400, "latencies": 400, "failures": 0, **idle(INTERPRETERS)}


def test_an_interpreter_dying_during_the_poll_fails_the_call_at_once(
        model, manager, backend, polls, tmp_path):
    if backend != "process":
        pytest.skip("the poll is the process backend's, on the call channel")
    gate, log = str(tmp_path / "gate"), str(tmp_path / "log")
    # A poll that would outlast the test's time limit: only the interpreter's death,
    # which the poll looks for, ends it.
    polls.budget(400.0)

    async def main():
        for attempt in range(TRIES):
            await _call(model, torch.ones(1))
            del polls[:]
            with pytest.raises(multipy.InterpreterCrashedError):
                await _call(model, torch.zeros(1), exit_code=3)
            if polls == [False]:  # polled, and the poll gave up when it died
                return
            wait_for(lambda: all(w.dead_reason is None and w._started for w in manager._workers),
                     "the replacement to start")
        raise AssertionError(f"no poll in {TRIES} tries: {polls}")

    asyncio.run(main())
    wait_for(lambda: all(w.dead_reason is None and w._started for w in manager._workers),
             "the replacement to start")
    polls.budget(0.5)
    del polls[:]
    outs = _until_settled(model, polls, 3)  # the replacement's calls are polled again
    assert polls.count(True) == 3
    assert [o[0].item() for o in outs] == [i * 2 + 1 for i in range(len(outs))]
