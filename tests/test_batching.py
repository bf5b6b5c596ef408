"""Dynamic batching: ``ReplicatedObj.batched()``.

Answers go back to the right callers row by row, requests group by shape,
one bad request fails alone, and a lone caller never waits a timer -- checked
through ``statistics()``, never by timing.  Batches are made deterministic by
holding every interpreter with a gated call (``_rows.rows(gate=...)``) while
requests queue, then opening the gate.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import multipy

from _rows import hold_every_interpreter, logged, movable_rows, open_gate
from _wait import wait_for

INTERPRETERS = 2
NEVER = 600_000.0  # max_delay_ms for tests that form batches only when an interpreter frees


@pytest.fixture(scope="module")
def pool():
    with concurrent.futures.ThreadPoolExecutor(32) as executor:
        yield executor


def batch_rows_seen(log) -> list[int]:
    """Rows of every call the interpreters ran with tag "b" (one line per batch)."""
    return sorted(int(line[2]) for line in logged(log) if line[0] == "b")


# -- answers reach their callers ---------------------------------------------------------


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=st.lists(st.tuples(st.integers(1, 3), st.sampled_from([(4,), (2, 3), (5,)])),
                       min_size=32, max_size=32))
def test_32_threads_each_get_their_own_rows(rows_model, pool, shapes):
    batched = rows_model.batched(max_batch_size=16)
    inputs = [torch.randn(rows, *rest).abs() + i for i, (rows, rest) in enumerate(shapes)]
    outs = list(pool.map(lambda x: batched(x), inputs))
    for x, out in zip(inputs, outs):
        assert torch.equal(out, x * 2 + 1)
    stats = batched.statistics()
    assert stats.requests == 32
    assert max(stats.batch_sizes) <= 16


def test_blocking_callers_queued_behind_busy_interpreters_get_their_own_rows(
        rows_model, manager, gate, pool):
    gate_path, log = gate
    batched = rows_model.batched(max_delay_ms=NEVER)
    dispatcher = manager._dispatcher
    held = hold_every_interpreter(rows_model, manager, gate_path, log)
    # ten requests of 1 or 2 rows of 3 (one batch), three of 1 row of 4 (another
    # batch, which fails: one of them is bad, and fails alone)
    xs = [torch.full((i % 2 + 1, 3), float(i)) for i in range(10)]
    xs += [torch.full((1, 4), 1.0), torch.full((1, 4), -1.0), torch.full((1, 4), 2.0)]
    outs = [pool.submit(batched, x) for x in xs]
    # every caller is blocked in the dispatcher's queue (no interpreter is free)
    wait_for(lambda: len(dispatcher._incoming) + len(dispatcher._pending) == len(xs),
             "the blocking callers to queue")
    open_gate(gate_path)
    for x, out in zip(xs, outs):
        if x.min() < 0:
            with pytest.raises(ValueError, match="negative input"):
                out.result(timeout=60)
        else:
            assert torch.equal(out.result(timeout=60), x * 2 + 1)
    for f in held:
        f.result(timeout=60)
    stats = batched.statistics()
    assert stats.batch_sizes == {10: 1, 3: 1} and stats.queued == 13 and stats.retried_alone == 3


def test_tuple_and_dict_results_are_split_by_rows(rows_model, manager, gate):
    gate_path, log = gate
    batched = rows_model.batched(max_delay_ms=NEVER)
    held = hold_every_interpreter(rows_model, manager, gate_path, log)
    xs = [torch.full((i % 3 + 1, 4), float(i)) for i in range(6)]
    tuples = [batched.submit(x, x, shape="tuple") for x in xs]
    dicts = [batched.submit(x, shape="dict") for x in xs]
    open_gate(gate_path)
    for x, t, d in zip(xs, tuples, dicts):
        out, extra = t.result(timeout=60)
        assert torch.equal(out, x * 2 + 1) and torch.equal(extra, x + x)
        got = d.result(timeout=60)
        assert set(got) == {"out", "sum"}
        assert torch.equal(got["out"], x * 2 + 1) and torch.equal(got["sum"], x.sum(-1, keepdim=True))
    for f in held:
        f.result(timeout=60)
    assert batched.statistics().batch_sizes == {6: 2}


def test_acall_batches_concurrent_tasks_of_one_event_loop(rows_model):
    batched = rows_model.batched()

    async def main():
        xs = [torch.full((1, 8), float(i)) for i in range(64)]
        return xs, await asyncio.gather(*(batched.acall(x) for x in xs))

    xs, outs = asyncio.run(main())
    assert all(torch.equal(o, x * 2 + 1) for x, o in zip(xs, outs))
    assert batched.statistics().requests == 64


@pytest.fixture(scope="module")
def mix_model(manager):
    with manager.acquire_one() as s:
        return s.create_movable(s.global_("_rows", "mix"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_batched_matrix_products_equal_unbatched_ones_within_float_rounding(
        rows_model, mix_model, manager, gate, dtype):
    """A batch's matrix product may round differently from one row's: float answers
    agree with unbatched ones to float rounding, integer answers exactly."""
    gate_path, log = gate
    gen = torch.Generator().manual_seed(1)
    xs = [(torch.randn(1, 16, generator=gen) * 100).to(dtype) for _ in range(24)]
    alone = [mix_model(x) for x in xs]
    batched = mix_model.batched(max_delay_ms=NEVER)
    held = hold_every_interpreter(rows_model, manager, gate_path, log)
    futures = [batched.submit(x) for x in xs]
    open_gate(gate_path)
    outs = [f.result(timeout=60) for f in futures]
    for f in held:
        f.result(timeout=60)
    assert batched.statistics().batch_sizes == {24: 1}
    for out, expected in zip(outs, alone):
        assert out.dtype == expected.dtype and out.shape == expected.shape
        if dtype.is_floating_point:
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(out, expected)


# -- grouping ---------------------------------------------------------------------------


def test_requests_group_by_shape_and_by_equal_other_arguments(rows_model, manager, gate):
    gate_path, log = gate
    batched = rows_model.batched(max_batch_size=32, max_delay_ms=NEVER)
    held = hold_every_interpreter(rows_model, manager, gate_path, log)
    calls = ([(torch.full((1, 4), float(i)), {}) for i in range(5)]
             + [(torch.full((2, 8), float(i)), {}) for i in range(3)]
             + [(torch.full((1, 4), float(i)), {"scale": 3.0}) for i in range(2)]
             + [(torch.full((1, 4), float(i)).double(), {}) for i in range(2)])
    futures = [batched.submit(x, log=log, tag="b", **kw) for x, kw in calls]
    open_gate(gate_path)
    for (x, kw), f in zip(calls, futures):
        assert torch.equal(f.result(timeout=60), x * kw.get("scale", 2.0) + 1)
    for f in held:
        f.result(timeout=60)
    # one call per group: 5 rows of 1x4, 3 requests of 2x8 (6 rows), 2 with scale=3, 2 float64
    assert batch_rows_seen(log) == [2, 2, 5, 6]
    assert batched.statistics().batch_sizes == {2: 2, 3: 1, 5: 1}


def test_a_batch_holds_at_most_max_batch_size_rows(rows_model, manager, gate):
    gate_path, log = gate
    batched = rows_model.batched(max_batch_size=4, max_delay_ms=NEVER)
    held = hold_every_interpreter(rows_model, manager, gate_path, log)
    xs = [torch.full((rows, 2), float(i)) for i, rows in enumerate([1, 2, 1, 3, 1, 1])]
    futures = [batched.submit(x, log=log, tag="b") for x in xs]
    open_gate(gate_path)
    for x, f in zip(xs, futures):
        assert torch.equal(f.result(timeout=60), x * 2 + 1)
    for f in held:
        f.result(timeout=60)
    assert all(rows <= 4 for rows in batch_rows_seen(log))
    assert sum(batch_rows_seen(log)) == 9


def test_calls_that_cannot_be_concatenated_run_alone(rows_model):
    batched = rows_model.batched()
    x = torch.ones(3, 2)
    assert torch.equal(batched(x, torch.ones(2, 2)), x * 2 + 1)  # its tensors' rows differ
    assert torch.equal(batched(x, [torch.ones(1)]), x * 2 + 1)  # a tensor inside a list
    assert torch.equal(batched(torch.tensor(2.0)), torch.tensor(5.0))  # 0-dim
    assert batched.statistics().batches == 0


# -- failures -------------------------------------------------------------------------------


def test_one_bad_request_fails_alone_with_the_models_own_exception(rows_model, manager, gate):
    gate_path, log = gate
    batched = rows_model.batched(max_delay_ms=NEVER)
    held = hold_every_interpreter(rows_model, manager, gate_path, log)
    xs = [torch.full((1, 3), float(i)) for i in range(6)]
    xs[3] = torch.tensor([[1.0, -1.0, 1.0]])
    futures = [batched.submit(x) for x in xs]
    open_gate(gate_path)
    for i, (x, f) in enumerate(zip(xs, futures)):
        if i == 3:
            with pytest.raises(ValueError, match="negative input"):
                f.result(timeout=60)
        else:
            assert torch.equal(f.result(timeout=60), x * 2 + 1)
    for f in held:
        f.result(timeout=60)
    stats = batched.statistics()
    assert stats.batch_sizes == {6: 1} and stats.retried_alone == 6


def test_a_cancelled_queued_request_leaves_its_batch(rows_model, manager, gate):
    gate_path, log = gate
    batched = rows_model.batched(max_delay_ms=NEVER)
    held = hold_every_interpreter(rows_model, manager, gate_path, log)
    futures = [batched.submit(torch.full((1, 2), float(i))) for i in range(4)]
    assert futures[1].cancel()
    open_gate(gate_path)
    for i in (0, 2, 3):
        assert torch.equal(futures[i].result(timeout=60), torch.full((1, 2), 2.0 * i + 1))
    for f in held:
        f.result(timeout=60)
    assert batched.statistics().batch_sizes == {3: 1}


def test_a_batch_cut_short_by_close_fails_its_callers_with_manager_closed(backend, tmp_path):
    if backend != "process":
        pytest.skip(f"the {backend} backend cannot stop a call in flight at close")
    hold, gate_path, log = str(tmp_path / "hold"), str(tmp_path / "gate"), str(tmp_path / "log")
    manager = multipy.InterpreterManager(2, backend=backend)
    try:
        model = movable_rows(manager)
        held = hold_every_interpreter(model, manager, hold, log)
        batched = model.batched(max_delay_ms=NEVER)
        futures = [batched.submit(torch.ones(1, 2), gate=gate_path, log=log, tag="b")
                   for _ in range(3)]
        open_gate(hold)  # the three go out as one batch, which waits on its gate
        wait_for(lambda: batch_rows_seen(log) == [3], "the batch to start")
    finally:
        manager.close(timeout=0.2)  # the batch is cut short: its interpreter is killed
    for f in held:
        f.result(timeout=60)
    for f in futures:  # not retried request by request on a closed manager, and no hang
        with pytest.raises(multipy.ManagerClosedError):
            f.result(timeout=60)


# -- no timer while idle ---------------------------------------------------------------------


def test_a_lone_caller_is_sent_at_once_every_time(rows_model):
    batched = rows_model.batched(max_delay_ms=NEVER)  # a timer would hold each call forever
    for i in range(10):
        assert torch.equal(batched(torch.full((1, 4), float(i))), torch.full((1, 4), 2.0 * i + 1))
    for i in range(10, 20):
        future = batched.submit(torch.full((1, 4), float(i)))  # through the dispatcher's queue
        assert torch.equal(future.result(timeout=60), torch.full((1, 4), 2.0 * i + 1))
    stats = batched.statistics()
    assert stats.sent_on_arrival == 20 and stats.queued == 0
    assert stats.batch_sizes == {1: 20}


def test_a_request_queued_past_max_delay_is_committed_to_a_busy_interpreter(rows_model, manager, gate):
    gate_path, log = gate
    batched = rows_model.batched(max_delay_ms=0.0)
    held = hold_every_interpreter(rows_model, manager, gate_path, log)
    first = batched.submit(torch.ones(1, 2), log=log, tag="b")
    second = batched.submit(torch.ones(1, 2), log=log, tag="b")
    open_gate(gate_path)
    assert torch.equal(first.result(timeout=60), torch.full((1, 2), 3.0))
    assert torch.equal(second.result(timeout=60), torch.full((1, 2), 3.0))
    for f in held:
        f.result(timeout=60)
    # each was committed on arrival (its delay already over), before the other came
    assert batch_rows_seen(log) == [1, 1]
    assert batched.statistics().queued == 2


def test_a_request_past_max_delay_when_every_interpreter_has_a_committed_batch_joins_one(
        rows_model, manager, gate):
    gate_path, log = gate
    batched = rows_model.batched(max_delay_ms=0.0)
    held = hold_every_interpreter(rows_model, manager, gate_path, log)
    futures = [batched.submit(torch.full((1, 2), float(i)), log=log, tag="b") for i in range(3)]
    open_gate(gate_path)
    for i, f in enumerate(futures):
        assert torch.equal(f.result(timeout=60), torch.full((1, 2), 2.0 * i + 1))
    for f in held:
        f.result(timeout=60)
    # one committed batch per interpreter; the third request joins the first to go out
    assert batch_rows_seen(log) == [1, 2]
    assert batched.statistics().queued == 3


def test_batched_validates_its_options(rows_model):
    with pytest.raises(ValueError, match="max_batch_size"):
        rows_model.batched(max_batch_size=0)
    with pytest.raises(ValueError, match="max_delay_ms"):
        rows_model.batched(max_delay_ms=-1)
