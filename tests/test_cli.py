"""The ``multipy`` command line: inspect, info, examples, demo and its error handling.

Commands that start interpreters run in a subprocess (``python -m multipy``),
the way a user runs them; the others call ``multipy.cli.main`` in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from multipy.cli import main


def run_multipy(*args: str, cache: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, MULTIPY_CACHE=str(cache), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "multipy", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def examples_dir(tmp_path_factory) -> Path:
    from multipy.examples import generate

    out = tmp_path_factory.mktemp("examples")
    generate(out, ["simple", "identity"])
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


# ------------------------------------------------------------------- inspect
def test_inspect_lists_the_modules_pickles_and_resources_of_an_archive(examples_dir, capsys):
    assert main(["inspect", str(examples_dir / "simple.pt")]) == 0
    out = capsys.readouterr().out
    assert "multipy.examples.models" in out
    assert "model/model.pkl" in out and "model/example.pkl" in out
    assert "extra_files/text" in out
    assert "torch" in out  # externs


def test_inspect_of_a_missing_path_exits_2_with_one_line_naming_it(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert main(["inspect", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("multipy: error:")
    assert str(missing) in err


def test_inspect_of_a_file_that_is_not_a_zip_exits_2(tmp_path, capsys):
    bogus = tmp_path / "model.pt"
    bogus.write_text("not a zip")
    assert main(["inspect", str(bogus)]) == 2
    assert "not a zip" in capsys.readouterr().err


def test_inspect_runs_no_code_from_the_archive(tmp_path, capsys):
    marker = tmp_path / "ran"
    archive = tmp_path / "evil.pt"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("evil/evil_mod.py", f"open({str(marker)!r}, 'w').close()\n")
        zf.writestr("evil/model/model.pkl", b"cevil_mod\nboom\n.")
        zf.writestr("evil/.data/extern_modules", "os\n")
    assert main(["inspect", str(archive)]) == 0
    assert "evil_mod" in capsys.readouterr().out
    assert not marker.exists()


def test_a_missing_path_gives_no_traceback_from_the_real_command(tmp_path, cache):
    proc = run_multipy("inspect", str(tmp_path / "missing.pt"), cache=cache)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]


# ---------------------------------------------------------------------- info
def test_info_reports_versions_capabilities_and_the_process_backend(cache):
    proc = run_multipy("info", cache=cache)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "torch " in out and "python " in out
    assert "process: available" in out
    assert "auto picks process" in out
    for backend in ("thread", "subinterpreter"):
        assert f"  {backend}: " in out


def test_info_says_which_call_channel_runs_and_why(cache, monkeypatch):
    from multipy.transport.channel import NATIVE

    proc = run_multipy("info", cache=cache)
    channel = [line for line in proc.stdout.splitlines() if line.startswith("call channel: ")]
    assert len(channel) == 1
    assert channel[0].startswith("call channel: native" if NATIVE else "call channel: pure Python")
    monkeypatch.setenv("MULTIPY_NATIVE", "0")
    proc = run_multipy("info", cache=cache)
    assert "call channel: pure Python: MULTIPY_NATIVE=0 turns the C extension off" in proc.stdout


# ------------------------------------------------------------------ examples
def test_examples_writes_the_archives_asked_for(tmp_path, capsys):
    assert main(["examples", "--out", str(tmp_path), "--only", "simple", "identity"]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {
        "simple.pt", "simple_jit.pt", "identity.pt", "identity_jit.pt"}
    assert "simple: " in capsys.readouterr().out


def test_examples_with_an_unknown_name_exits_2_listing_the_known_ones(tmp_path, capsys):
    assert main(["examples", "--out", str(tmp_path), "--only", "nonesuch"]) == 2
    err = capsys.readouterr().err
    assert "nonesuch" in err and "resnet" in err
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- usage errors
@pytest.mark.parametrize("argv, words", [
    (["bench", "smallops", "--threads", "0"], "at least 1"),
    (["bench", "smallops", "--threads", "two"], "whole number"),
    (["bench", "smallops", "--strategies", "threads,warp"], "unknown strategy warp"),
    (["bench", "smallops", "--seconds", "-1"], "more than 0"),
    (["bench"], "name at least one package"),
    (["demo", "--interpreters", "0"], "at least 1"),
])
def test_bad_arguments_exit_2_with_the_reason_and_no_traceback(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err
    assert "Traceback" not in err


def test_bench_of_an_unknown_package_name_exits_2(capsys):
    assert main(["bench", "no_such_model_or_file"]) == 2
    err = capsys.readouterr().err
    assert "neither a torch.package archive nor an example name" in err


def test_bench_refuses_a_csv_path_in_a_missing_directory_before_measuring(tmp_path, capsys):
    assert main(["bench", "smallops", "--csv", str(tmp_path / "no" / "x.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------- demo
def test_demo_checks_outputs_against_eager_and_prints_plain_ratios_and_a_plot(tmp_path, cache):
    plot = tmp_path / "demo.png"
    proc = run_multipy("demo", "--interpreters", "2", "--seconds", "0.3", "--no-real-model",
                       "--out", str(tmp_path), "--plot", str(plot), cache=cache, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "smallops: outputs match eager PyTorch on all 2 interpreter(s)" in out
    for label in ("small-op model", "plain threads, one model", "multipy, 2 interpreters",
                  "limit: 2 bare processes", "vs threads", "items/s"):
        assert label in out
    assert "smallops: multipy " in out and "x plain threads" in out and "x the limit" in out
    assert not {"target", "met"} & set(out.lower().replace(",", " ").split())
    assert (tmp_path / "smallops.pt").exists()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Traceback" not in proc.stderr


def test_bench_of_a_model_that_raises_exits_1_naming_the_row_and_the_error(tmp_path, capsys):
    import torch

    from multipy.package import save_package

    # Linear(2, 2) on a 1x3 input: every call raises a shape error.
    archive = save_package(tmp_path / "broken.pt", torch.nn.Linear(2, 2),
                           example_inputs=(torch.randn(1, 3),))
    assert main(["bench", str(archive), "--strategies", "threads", "--threads", "1",
                 "--seconds", "0.1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "broken: threads x1 failed: RuntimeError" in err and "shapes" in err


def test_bench_on_a_backend_that_cannot_run_here_exits_1_with_the_reason(capsys):
    from multipy.backends.base import BackendKind
    from multipy.backends.capabilities import detect, why_unavailable

    why = why_unavailable(BackendKind.SUBINTERPRETER, detect())
    if why is None:
        pytest.skip("the subinterpreter backend can run here")
    assert main(["bench", "smallops", "--backend", "subinterpreter", "--strategies",
                 "multi_python", "--threads", "1", "--seconds", "0.1"]) == 1
    err = capsys.readouterr().err
    assert "multi_python x1 failed" in err and "unavailable" in err


def test_soak_command_reports_and_exits_zero_when_nothing_is_wrong(capsys):
    from multipy.cli import main

    assert main(["soak", "--seconds", "3", "--kill-every", "1", "--threads", "4"]) == 0
    out = capsys.readouterr().out
    assert "correct results" in out and "shared memory left held: 0" in out


def test_startup_figure_times_import_torch_and_a_manager_serving_the_archive(tmp_path):
    from multipy.bench.startup import measure_startup
    from multipy.examples import generate

    archive = generate(tmp_path, ["smallops"])["smallops"]
    result = measure_startup(str(archive), interpreters=2, repeat=1)
    assert result.interpreters == 2
    assert result.import_torch > 0 and result.manager_ready > 0
    # The manager's figure runs the model on every interpreter: an archive that
    # cannot serve fails the measurement instead of timing an idle manager.
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a package")
    with pytest.raises(subprocess.CalledProcessError):
        measure_startup(str(broken), interpreters=1, repeat=1)
