"""A fault that raises at any stage of a call fails only that call, on every backend.

The table (``_faults.RAISES``) raises while pickling the arguments in the host,
unpickling them in the interpreter, in the model, pickling the result in the
interpreter and unpickling it in the host.  Each row asserts the error type,
its message, that the interpreter was not restarted and that it keeps serving.
The crash rows are process-only (test_reliability.py); the subinterpreter
backend runs the same table in test_subinterpreter.py.
"""

from __future__ import annotations

import pytest
import torch

from _faults import RAISES


@pytest.fixture(scope="module")
def run(manager):
    """A ReplicatedObj of ``_faults.run`` on every interpreter."""
    with manager.acquire_one() as s:
        return s.create_movable(s.global_("_faults", "run"))


@pytest.mark.parametrize("stage, make_args, expected, words", RAISES, ids=[r[0] for r in RAISES])
def test_a_fault_that_raises_at_each_stage_fails_only_that_call(manager, run, stage, make_args,
                                                                 expected, words):
    before = manager.statistics()
    with pytest.raises(expected, match=words):
        run(*make_args())
    x = torch.arange(6.0)
    for _ in range(2 * len(manager)):
        assert torch.equal(run("echo", x), x)
    after = manager.statistics()
    assert after.restarts == before.restarts
    assert [i.pid for i in after.interpreters] == [i.pid for i in before.interpreters]
