"""The interpreter's serving loop: the common call (a loaded replicated object
called with positional tensors and scalars) is served by the extension's loop
(``multipy._native.serve_calls``) on the process backend, every other request by
the Python loop, in the order they came.  Each behaviour holds on every backend
and without the extension (``MULTIPY_NATIVE=0``: the Python loop serves all).
"""

from __future__ import annotations

import gc
import threading

import pytest
import torch

import multipy
from _rows import logged, movable_rows, open_gate
from _wait import wait_for

INTERPRETERS = 1  # every call of a test reaches the same interpreter

MODULE = """
import torch

calls = []

def times_ten(module, args, output):
    return output * 10

class Model(torch.nn.Module):
    def forward(self, x, *rest):
        calls.append(("forward", float(x.sum())))
        if (x < 0).any():
            raise ValueError(f"negative input {float(x.min())}")  # the model's raising line
        if float(x.sum()) == 42.0:  # registers a hook on itself, from inside its own call
            self.register_forward_hook(times_ten)
        return x + 1

def record(x, tag="plain"):
    calls.append((tag, float(x.sum())))
    return x

kept = []

def keep(x):
    kept.append(x)
    return x * 2

def shout(x):
    print("shout", float(x.sum()), end="")  # no newline: only the reply's flush sends it
    return x

def take_calls():
    out = list(calls)
    calls.clear()
    return out
"""


@pytest.fixture(scope="module")
def objects(manager):
    """``(model, record, take_calls, keep, shout)``: replicated objects of ``MODULE``;
    ``take_calls()`` returns (and forgets) what ran in the interpreter, in order.
    Each is called as a binary call (no session objects left to drop, which a
    request would carry, and then be pickled)."""
    manager.register_module_source("loop_models", MODULE)
    with manager.acquire_one() as s:
        made = [s.create_movable(s.global_("loop_models", name)
                                 if name != "Model" else s.global_("loop_models", name)())
                for name in ("Model", "record", "take_calls", "keep", "shout")]
    for obj in made:
        obj.load_everywhere()
    model, record, take, keep, shout = made
    take()  # carries the session's drops

    def take_calls():
        return [tuple(c) for c in take()]

    return model, record, take_calls, keep, shout


def test_a_model_raising_gives_the_caller_its_exception_with_its_traceback(objects):
    model, _, take_calls = objects[:3]
    with pytest.raises(ValueError, match=r"negative input -1\.0") as info:
        model(torch.full((1, 16), -1.0))
    assert "the model's raising line" in info.value.__cause__.tb
    assert "forward" in info.value.__cause__.tb
    assert torch.equal(model(torch.zeros(1, 16)), torch.ones(1, 16))  # serves on
    assert take_calls() == [("forward", -16.0), ("forward", 0.0)]


def test_a_hook_the_model_registers_while_being_served_runs_on_the_next_call(objects):
    # No other request comes between the two calls: the loop that serves them must
    # read the module's hooks on every call, not once.
    model, _, take_calls = objects[:3]
    fresh = torch.full((1, 2), 21.0)
    assert torch.equal(model(fresh), torch.full((1, 2), 22.0))  # registers times_ten
    assert torch.equal(model(torch.zeros(1, 2)), torch.full((1, 2), 10.0))  # (0 + 1) * 10
    assert take_calls() == [("forward", 42.0), ("forward", 0.0)]


def test_uncommon_requests_between_common_ones_are_served_in_order(objects, manager):
    # Keyword arguments make a request the Python loop serves (a pickle); posted
    # together, the calls queue in the interpreter and must run as they were sent.
    _, record, take_calls = objects[:3]
    futures = []
    for i in range(8):
        x = torch.full((1, 4), float(i))
        futures.append(record.submit(x, tag="keyword") if i % 3 == 1 else record.submit(x))
    for i, f in enumerate(futures):
        assert torch.equal(f.result(timeout=60), torch.full((1, 4), float(i)))
    assert take_calls() == [("keyword" if i % 3 == 1 else "plain", 4.0 * i) for i in range(8)]


def test_what_the_model_prints_reaches_the_caller_before_the_call_returns(objects, manager,
                                                                           capfd):
    if manager.backend != "process":
        pytest.skip("only the process backend copies an interpreter's output")
    shout = objects[4]
    x = torch.ones(1, 8)
    capfd.readouterr()
    assert torch.equal(shout(x), x)
    assert "shout 8.0" in capfd.readouterr().out


def test_an_argument_the_model_keeps_is_not_reused_under_it(objects, manager):
    if manager.backend != "process":
        pytest.skip("only the process backend passes arguments in arena blocks")
    _, record, take_calls, keep = objects[:4]
    assert torch.equal(keep(torch.ones(1, 8)), torch.full((1, 8), 2.0))
    for i in range(4):  # the host reuses the argument blocks that the interpreter let go
        assert torch.equal(record(torch.full((1, 8), -1.0 - i)), torch.full((1, 8), -1.0 - i))
    with manager.acquire_one() as s:
        assert s.exec_("import loop_models\nresult = loop_models.kept[0].tolist()") == [[1.0] * 8]
        s.exec_("import loop_models\nloop_models.kept.clear()")
    take_calls()


def _arena_blocks_in_use(manager) -> int:
    """Result blocks the interpreter's loop holds (its results arena's used blocks)."""
    with manager.acquire_one() as s:
        return s.exec_("import gc\n"
                       "from multipy.backends._process_main import Loop\n"
                       "loop = next(o for o in gc.get_objects() if type(o) is Loop)\n"
                       "result = len(loop.results._used)")


def test_a_call_taken_past_its_deadline_never_runs_and_its_releases_apply(tmp_path):
    """A posted call of the common kind queued behind a running call past its
    timeout is answered unrun; the result blocks the host freed, which went with
    it, are freed in the interpreter all the same."""
    gate_path, log = str(tmp_path / "gate"), str(tmp_path / "log")
    with multipy.InterpreterManager(1, backend="process", call_timeout=0.5) as manager:
        if manager._workers[0].posted_depth == 1:
            pytest.skip("one call in flight at a time here: a posted call waits in the "
                        "dispatcher, where its timeout does not run yet")
        manager.register_module_source("loop_models", MODULE)
        with manager.acquire_one() as s:
            model = s.create_movable(s.global_("loop_models", "Model")())
        model.load_everywhere()
        held = movable_rows(manager)
        held(torch.ones(1))  # loaded
        kept = model(torch.ones(1, 16))  # a result block that the late call frees
        baseline = None
        result: list = []
        blocked = threading.Thread(target=lambda: result.append(
            held.with_timeout(None)(torch.zeros(1), gate=gate_path, log=log, tag="running")))
        blocked.start()
        wait_for(lambda: logged(log), "the blocking call to start")
        del kept
        gc.collect()
        late = model.submit(torch.full((1, 16), 3.0))  # binary call; carries the freed block
        with pytest.raises(multipy.CallTimeoutError, match="dropped without running"):
            late.result(timeout=60)
        open_gate(gate_path)
        blocked.join(60)
        assert result and torch.equal(result[0], torch.ones(1))
        del result[:]
        gc.collect()
        with manager.acquire_one() as s:
            ran = [tuple(c) for c in s.global_("loop_models", "take_calls")().deref()]
        assert ran == [("forward", 16.0)]  # the late call never ran
        baseline = _arena_blocks_in_use(manager)
        assert baseline == 0, f"{baseline} result blocks still held: a release was lost"
        assert torch.equal(model(torch.zeros(1, 16)), torch.ones(1, 16))  # serves on
        assert manager.statistics().restarts == 0
