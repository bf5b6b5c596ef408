"""``multipy bench``: the harness, the strategies, the CSV/plot and the CLI end to end.

Windows are a fraction of a second: these tests check what is measured and
reported, not how fast anything is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from multipy.bench import (CSV_COLUMNS, Fixtures, Row, Strategy, read_csv, run_sweep,
                           run_threads, table, thread_counts, write_csv)
from multipy.bench.harness import WARMUP_ITEMS
from multipy.bench.strategies import batch_inputs, benchmark_name
from multipy.bench.targets import TargetError, resolve_target

needs_cuda = pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA device (torch sees no GPU)")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


def run_multipy(*args: str, cache: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, MULTIPY_CACHE=str(cache), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "multipy", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


# ------------------------------------------------------------------- harness
def test_run_threads_counts_every_item_of_every_thread_inside_the_window():
    counts = [0, 0, 0]

    def factory(i):
        def item():
            counts[i] += 1
            time.sleep(0.001)
        return item

    result = run_threads(factory, 3, 0.2)
    assert result.n_threads == 3
    assert all(c > 3 for c in counts)  # every thread ran past its warm-up
    warmup = 3 * 3
    assert result.work_items_completed == sum(counts) - warmup
    assert result.seconds >= 0.2  # the window runs to its end
    assert result.work_items_per_second == pytest.approx(
        result.work_items_completed / result.seconds)
    assert 0 < result.p25_latency <= result.p50_latency <= result.p95_latency


def test_run_threads_starts_the_clock_only_when_every_thread_has_warmed_up():
    order = []                 # (thread, its n-th call), in the order the calls happened
    lock = threading.Lock()
    zero_warm = threading.Event()

    def factory(i):
        if i == 1:
            zero_warm.wait(60)  # a slow start: thread 0 is ready long before this one
        calls = 0

        def item():
            nonlocal calls
            calls += 1
            with lock:
                order.append((i, calls))
            if i == 0 and calls == WARMUP_ITEMS:
                zero_warm.set()
        return item

    result = run_threads(factory, 2, 0.2)
    timed = [k for k, (_, n) in enumerate(order) if n > WARMUP_ITEMS]
    assert timed and result.work_items_completed == len(timed)
    # No timed item ran before the last warm-up item: thread 0 waited for thread 1.
    assert min(timed) > order.index((1, WARMUP_ITEMS))


def test_run_threads_reraises_a_failing_thread_error_without_hanging():
    def factory(i):
        def item():
            if i == 1:
                raise ZeroDivisionError("item failed")
        return item

    with pytest.raises(ZeroDivisionError, match="item failed"):
        run_threads(factory, 3, 5.0)


def test_the_default_sweep_stops_at_the_maximum_and_includes_it():
    assert thread_counts(2) == [1, 2]
    assert thread_counts(6) == [1, 2, 4, 6]
    assert thread_counts(40) == [1, 2, 4, 8, 16, 32, 40]
    assert thread_counts(64) == [1, 2, 4, 8, 16, 32, 40, 64]


# -------------------------------------------------------------------- report
def test_csv_has_deploy_benchmarks_header_and_one_line_per_row(tmp_path):
    rows = [Row("smallops", "threads", 1, 10, 20.0, 1.0, 2.0, 3.0),
            Row("smallops", "multi_python", 2, 30, 60.5, 1.5, 2.5, 3.5)]
    path = tmp_path / "b.csv"
    write_csv(path, rows)
    assert path.read_text().splitlines()[0] == (
        "benchmark, strategy, n_threads, work_items_completed, work_items_per_second, "
        "p25_latency, p50_latency, p95_latency, device")
    back = read_csv(path)
    assert [tuple(r) for r in back] == [CSV_COLUMNS] * 2
    assert back[1]["strategy"] == "multi_python" and float(back[1]["work_items_per_second"]) == 60.5
    assert back[0]["device"] == "cpu"


def test_the_table_adds_images_per_second_at_a_batch_above_one():
    from rich.console import Console

    rows = [Row("resnet@b8", "threads", 1, 10, 20.0, 1.0, 2.0, 3.0, "cuda")]

    def render(**kwargs) -> str:
        console = Console(record=True, width=200)
        console.print(table(rows, **kwargs))
        return console.export_text()

    assert "images/s" not in render()
    text = render(batch=8)
    assert "images/s" in text and "160.0" in text  # 20 items/s x 8


# ------------------------------------------------------------------ batching
def test_batch_inputs_repeats_every_tensor_along_dim_0_to_batch_rows():
    import torch

    image = torch.randn(1, 3, 4, 4)
    pair = torch.arange(6.0).reshape(2, 3)
    scalar = torch.tensor(2.0)
    out = batch_inputs((image, [pair, {"s": scalar, "k": 3}], "text"), 5)
    big, (rows, extra), text = out
    assert big.shape == (5, 3, 4, 4)
    assert all(torch.equal(big[i], image[0]) for i in range(5))
    assert rows.shape == (5, 3)  # rows cycle: 0, 1, 0, 1, 0
    assert torch.equal(rows, pair[[0, 1, 0, 1, 0]])
    assert extra["s"] is scalar and extra["k"] == 3 and text == "text"
    assert big.is_contiguous() and big.data_ptr() != image.data_ptr()
    same = (image,)
    assert batch_inputs(same, 1) is same  # batch 1: the example as it is
    with pytest.raises(ValueError, match="at least 1"):
        batch_inputs(same, 0)
    assert benchmark_name("resnet", 1) == "resnet"
    assert benchmark_name("resnet", 8) == "resnet@b8"


def test_fixtures_feed_the_model_the_batched_example_and_name_rows_by_batch(cache):
    import torch

    with Fixtures(resolve_target("smallops", out=cache), max_interpreters=1, batch=3) as fx:
        assert fx.name == "smallops@b3" and fx.device == "cpu" and not fx.cuda
        (x,) = fx.args
        assert x.shape == (3, 16)
        with torch.inference_mode():
            assert fx.eager()(*fx.args).shape[0] == 3


# ---------------------------------------------------------------- strategies
def test_jit_is_skipped_with_a_note_when_the_package_has_no_torchscript_reference(cache):
    sweep = run_sweep([resolve_target("batched_model", out=cache)],
                      [Strategy.JIT, Strategy.THREADS], [1, 2], seconds=0.05,
                      max_interpreters=2)
    assert [(r.strategy, r.n_threads) for r in sweep.rows] == [("threads", 1), ("threads", 2)]
    assert len(sweep.notes) == 1 and "jit skipped" in sweep.notes[0]


def test_limit_stops_at_max_interpreters_while_process_pool_follows_the_threads(cache):
    sweep = run_sweep([resolve_target("smallops", out=cache)],
                      [Strategy.LIMIT, Strategy.PROCESS_POOL], [1, 2], seconds=0.2,
                      max_interpreters=1)
    assert [(r.strategy, r.n_threads) for r in sweep.rows] == [
        ("limit", 1), ("process_pool", 1), ("process_pool", 2)]
    assert all(r.work_items_per_second > 0 for r in sweep.rows)


def test_a_target_without_example_inputs_is_refused_with_how_to_fix_it(tmp_path):
    import torch

    from multipy.package import save_package

    archive = save_package(tmp_path / "bare.pt", torch.nn.Identity())
    with pytest.raises(TargetError, match="example_inputs"):
        resolve_target(str(archive))


# ------------------------------------------------------------------------ CLI
def test_bench_cli_writes_the_csv_table_and_plot(tmp_path, cache):
    csv, png = tmp_path / "bench.csv", tmp_path / "bench.png"
    proc = run_multipy("bench", "smallops", "--max-interpreters", "2", "--threads", "1,2",
                       "--seconds", "0.3", "--strategies", "threads,multi_python,one_python",
                       "--csv", str(csv), "--plot", str(png), cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert csv.read_text().splitlines()[0] == ", ".join(CSV_COLUMNS)
    rows = read_csv(csv)
    assert sorted((r["strategy"], int(r["n_threads"])) for r in rows) == sorted(
        (s, n) for s in ("threads", "multi_python", "one_python") for n in (1, 2))
    assert all(r["benchmark"] == "smallops" for r in rows)
    assert all(float(r["work_items_per_second"]) > 0 for r in rows)
    assert all(int(r["work_items_completed"]) > 0 for r in rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "multi_python" in proc.stdout and "items/s" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_bench_overhead_prints_p50_and_p99_over_a_direct_call(cache):
    proc = run_multipy("bench", "--overhead", "--overhead-calls", "200", "--rounds", "2", cache=cache)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("overhead ")]
    assert [line.split(":")[0] for line in lines] == ["overhead 1x16", "overhead 1x3x224x224"]
    assert all("p50" in line and "(rounds " in line and "p99" in line and "µs" in line
               and "(200 calls in 2 interleaved rounds)" in line for line in lines)


@pytest.mark.parametrize("native", ["1", "0"])
def test_bench_dispatch_reports_calls_and_host_cpu_per_thread_count_beside_the_pipe(cache, native, monkeypatch):
    monkeypatch.setenv("MULTIPY_NATIVE", native)
    proc = run_multipy("bench", "--dispatch", "--threads", "1,3", "--seconds", "0.4", "--rounds", "2",
                       cache=cache)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "median of 2 interleaved round(s)" in out
    assert "bare os.pipe ping-pong between two Python processes" in out
    assert ("MULTIPY_NATIVE=0" in out) == (native == "0")
    rows = [line for line in out.splitlines() if "no-op interpreter" in line]
    assert [int(line.split()[0]) for line in rows] == [1, 3]
    assert all("calls/s (rounds " in line and "x the pipe ping-pong of the same round" in line
               and "µs/call" in line for line in rows)


def test_dispatch_report_takes_medians_and_compares_each_round_with_its_own_pipe():
    from multipy.bench.dispatch import Dispatch, DispatchReport, Round, dispatch_lines

    # The pipe swings 10x between rounds; each round's calls follow it.
    report = DispatchReport([Round([Dispatch(1, 2000, 1.0, 0.01), Dispatch(16, 1000, 1.0, 0.02)], 1000.0),
                             Round([Dispatch(1, 200, 1.0, 0.001), Dispatch(16, 100, 1.0, 0.002)], 100.0),
                             Round([Dispatch(1, 600, 1.0, 0.003), Dispatch(16, 300, 1.0, 0.003)], 300.0)],
                            "native", "process")
    assert [r.calls_per_s for r in report.rows] == [600.0, 300.0]
    assert report.pipe_round_trips_per_s == 300.0
    assert report.ratios(1) == [1.0, 1.0, 1.0]
    line = dispatch_lines(report)[3]
    assert line.startswith(" 16 host thread(s) -> 1 no-op interpreter: 300 calls/s (rounds 100-1,000; "
                           "1.00x the pipe ping-pong of the same round, rounds 1.00-1.00), "
                           "host CPU 20.0 µs/call")


def test_bench_memory_reports_the_extra_pss_as_a_ratio_of_the_weights(cache):
    proc = run_multipy("bench", "--memory", "--memory-mb", "40", cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert "4 interpreters" in proc.stdout
    ratio = [line for line in proc.stdout.splitlines() if line.startswith("extra for the big")]
    assert len(ratio) == 1 and "x the weights" in ratio[0]


def test_bench_cli_at_batch_2_repeats_the_inputs_and_names_the_batch(tmp_path, cache):
    csv = tmp_path / "b2.csv"
    proc = run_multipy("bench", "smallops", "--batch", "2", "--max-interpreters", "1",
                       "--threads", "1", "--seconds", "0.2",
                       "--strategies", "limit,multi_python,threads", "--csv", str(csv),
                       cache=cache)
    assert proc.returncode == 0, proc.stderr
    rows = read_csv(csv)
    assert sorted(r["strategy"] for r in rows) == ["limit", "multi_python", "threads"]
    assert all(r["benchmark"] == "smallops@b2" and r["device"] == "cpu" for r in rows)
    assert all(float(r["work_items_per_second"]) > 0 for r in rows)
    assert "images/s" in proc.stdout and "batch 2" in proc.stdout


def test_bench_on_cuda_without_a_gpu_exits_2_with_one_line(monkeypatch, capsys):
    import torch

    from multipy.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "smallops", "--device", "cuda", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("multipy: error: no CUDA device: ") and err.count("\n") == 1


@needs_cuda
def test_bench_on_cuda_measures_gpu_rows_and_skips_the_cpu_only_strategies(cache):
    sweep = run_sweep([resolve_target("smallops", out=cache)],
                      [Strategy.LIMIT, Strategy.MULTI_PYTHON, Strategy.JIT, Strategy.THREADS,
                       Strategy.PROCESS_POOL], [1, 2], seconds=0.2, max_interpreters=2,
                      device="cuda", batch=2)
    assert [(r.strategy, r.n_threads) for r in sweep.rows] == [
        (s, n) for s in ("multi_python", "jit", "threads") for n in (1, 2)]
    assert all(r.benchmark == "smallops@b2" and r.device == "cuda" for r in sweep.rows)
    assert all(r.work_items_per_second > 0 for r in sweep.rows)
    assert sorted(n.split(":")[1].strip().split()[0] for n in sweep.notes) == [
        "limit", "process_pool"]


def test_the_ray_report_says_what_was_measured_and_passes_no_verdict():
    from multipy.bench.ray_serve import RayLatencyReport, RayMemoryReport, ray_lines

    labels = ["echo on uvicorn", "echo via Serve", "multipy serve", "multipy.ray via Serve"]
    latency = RayLatencyReport(10, 50, dict(zip(labels, [1.0, 11.0, 4.0, 19.0])),
                               dict(zip(labels, [2.0, 20.0, 8.0, 30.0])),
                               dict(zip(labels, [0.2, 5.0, 2.5, 8.0])), worker_niceness=0)
    memory = RayMemoryReport(2, 256_000_000, 795_000_000, 1_051_000_000, 440_000_000, 952_000_000)
    text = "\n".join(ray_lines(latency, memory))
    assert "10 rounds of 50 requests to each server in turn; Ray's workers at nice 0" in text
    assert "multipy.ray via Serve    p50  19.00 ms   p99  30.00 ms   CPU  8.00 ms/request" in text
    assert "p50 15.00 ms = 1.50x Serve's own proxy overhead" in text
    assert "-> 1.00 copies of the weights" in text and "-> 2.00 copies" in text
    for verdict in ("target", " met", "not met"):
        assert verdict not in text
