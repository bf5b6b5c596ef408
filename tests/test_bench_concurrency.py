"""``multipy bench --async`` and ``--batching``: what they measure and report.

Windows are a fraction of a second: these tests check the rows, the answer
check and the CSV, not how fast anything is.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from multipy.bench import CSV_COLUMNS, read_csv
from multipy.bench.concurrency import batching_lines, measure_batching


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


def test_batching_checks_every_batched_answer_against_the_unbatched_one(cache, monkeypatch):
    monkeypatch.setenv("MULTIPY_CACHE", str(cache))
    rows, checks = measure_batching("identity", interpreters=1, callers=(1, 8), seconds=0.4,
                                    rounds=2)
    assert [(r.strategy, r.n_threads) for r in rows] == [
        ("unbatched", 1), ("batched", 1), ("unbatched", 8), ("batched", 8)]
    for check in checks:
        assert check.answers > 0
        # identity returns its rows: a batched answer is the very same numbers
        assert check.identical == check.answers and check.not_close == 0
    assert checks[0].sent_on_arrival == checks[0].answers  # a lone caller never queues
    assert checks[0].queued == 0
    lines = batching_lines(rows, checks)
    assert lines[0].startswith("batching, 1 caller(s): batched ")
    assert "0 outside allclose" in lines[1]


def test_bench_cli_async_and_batching_print_ratios_and_write_the_csv(tmp_path, cache):
    csv = tmp_path / "concurrency.csv"
    env = dict(os.environ, MULTIPY_CACHE=str(cache), COLUMNS="200")
    proc = subprocess.run(
        [sys.executable, "-m", "multipy", "bench", "--async", "--batching", "--model", "identity",
         "--callers", "1,4", "--seconds", "0.3", "--max-interpreters", "1", "--csv", str(csv)],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "asyncio: one event-loop thread, 64 concurrent acall tasks:" in proc.stdout
    assert "x 16 blocking host threads" in proc.stdout
    assert "batching, 4 caller(s): batched" in proc.stdout
    assert csv.read_text().splitlines()[0] == ", ".join(CSV_COLUMNS)
    rows = read_csv(csv)
    assert sorted((r["strategy"], int(r["n_threads"])) for r in rows) == sorted([
        ("blocking_threads", 16), ("asyncio", 64), ("unbatched", 1), ("batched", 1),
        ("unbatched", 4), ("batched", 4)])
    assert all(int(r["work_items_completed"]) > 0 for r in rows)
    assert "Traceback" not in proc.stderr


def test_interleaved_windows_alternate_which_strategy_runs_first():
    from multipy.bench.concurrency import _rounds
    from multipy.bench.harness import Result

    ran = []

    def measure(name, items):
        def window(seconds):
            ran.append(name)
            return Result(1, items, seconds, 1.0, 2.0, 3.0)
        return window

    merged = _rounds({"a": measure("a", 10), "b": measure("b", 30)}, seconds=4.0, rounds=4)
    assert ran == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert list(merged) == ["a", "b"]
    assert merged["a"].work_items_completed == 40 and merged["a"].seconds == 4.0
    assert merged["b"].work_items_per_second == 30.0


def test_kept_answers_are_copies_that_share_no_memory_with_the_result():
    import torch

    from multipy.bench.concurrency import _copy

    a, b = torch.ones(2), torch.zeros(3)
    copied = _copy({"x": (a, [b, 7]), "y": "text"})
    assert copied["y"] == "text" and copied["x"][1][1] == 7
    assert isinstance(copied["x"], tuple) and isinstance(copied["x"][1], list)
    for before, after in ((a, copied["x"][0]), (b, copied["x"][1][0])):
        assert torch.equal(before, after)
        assert after.untyped_storage().data_ptr() != before.untyped_storage().data_ptr()
