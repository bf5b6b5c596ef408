"""Every interpreter a call takes from the load balancer is given back, whatever
happens between taking it and sending the call: an argument that raises while it
is looked at, the manager closed meanwhile, a batch that cannot be put together.

A slot never given back leaves its interpreter counted busy for ever: posted calls
(``submit``, ``acall``, batches) then wait for an idle interpreter that never comes.
"""

from __future__ import annotations

import pytest
import torch

import multipy
from multipy import ManagerClosedError

INTERPRETERS = 1


class _Shapeless(torch.Tensor):
    """A tensor whose ``dim()`` and ``shape`` raise, as a broken tensor subclass might."""

    def dim(self):
        raise RuntimeError("this tensor has no dimensions to give")

    @property
    def shape(self):
        raise RuntimeError("this tensor has no dimensions to give")


@pytest.fixture(scope="module")
def model(manager):
    with manager.acquire_one() as s:
        return s.create_movable(s.global_("_rows", "rows"))


def in_flight(manager) -> list[int]:
    return [i.in_flight for i in manager.statistics().interpreters]


def test_a_batched_call_whose_argument_raises_gives_its_interpreter_back(manager, model):
    fast = model.batched(max_batch_size=4)
    bad = torch.ones(2, 3).as_subclass(_Shapeless)
    with pytest.raises(RuntimeError, match="no dimensions"):
        fast(bad)
    assert in_flight(manager) == [0]
    out = fast.submit(torch.ones(2, 3)).result(timeout=60)  # an idle interpreter takes it
    assert torch.equal(out, torch.full((2, 3), 3.0))


def test_a_batch_that_cannot_be_put_together_runs_request_by_request(manager, model, monkeypatch):
    fast = model.batched(max_batch_size=8, max_delay_ms=600_000.0)
    # Queue two batchable requests behind a session holding the only interpreter.
    with manager.acquire_one():
        futures = [fast.submit(torch.full((1, 2), float(i))) for i in range(2)]

        def cannot_combine(requests):
            raise MemoryError("no room to concatenate the batch")

        monkeypatch.setattr(fast, "combine", cannot_combine)
    outs = [f.result(timeout=60) for f in futures]
    assert [o.tolist() for o in outs] == [[[1.0, 1.0]], [[3.0, 3.0]]]
    assert in_flight(manager) == [0]


def test_a_blocking_batched_call_racing_close_gives_its_interpreter_back(backend, monkeypatch):
    with multipy.InterpreterManager(1, backend=backend) as m:
        with m.acquire_one() as s:
            model = s.create_movable(s.global_("_rows", "rows"))
        fast = model.batched()
        dispatcher = m._dispatcher
        idle_now = dispatcher.idle_now

        def then_closed():
            index = idle_now()  # the caller holds this interpreter now
            m.close()
            return index

        monkeypatch.setattr(dispatcher, "idle_now", then_closed)
        with pytest.raises(ManagerClosedError, match="closed"):
            fast(torch.ones(1, 2))
        assert in_flight(m) == [0]
