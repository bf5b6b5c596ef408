"""Packaging a model: the plan of what is interned, externed and mocked (and why),
``multipy package``, and the advice when an interned library cannot run from an archive."""

from __future__ import annotations

import re
import sys
import textwrap

import pytest
import torch

from multipy.cli import main
from multipy.errors import PackageError
from multipy.package import format_plan, inspect_package, plan_package, save_package

TINY = """
import torch
import tinylib

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return tinylib.double(self.fc(x))

def build():
    return Tiny()
"""
TINYLIB = "def double(x):\n    return x * 2\n"

# A library that reads its own directory when imported, as transformers' lazy
# imports do: it cannot run from inside an archive.
SELFSCAN = """
import os
SUBMODULES = sorted(os.listdir(os.path.dirname(__file__)))

def double(x):
    return x * 2
"""
SELFSCAN_MODEL = """
import torch
import selfscan

class UsesSelfscan(torch.nn.Module):
    def forward(self, x):
        return selfscan.double(x)
"""


@pytest.fixture(scope="module")
def code(tmp_path_factory):
    root = tmp_path_factory.mktemp("code")
    (root / "tinymodel.py").write_text(textwrap.dedent(TINY))
    (root / "tinylib.py").write_text(TINYLIB)
    (root / "selfscan").mkdir()
    (root / "selfscan" / "__init__.py").write_text(textwrap.dedent(SELFSCAN))
    (root / "selfscan_model.py").write_text(textwrap.dedent(SELFSCAN_MODEL))
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    for name in ("tinymodel", "tinylib", "selfscan", "selfscan_model"):
        sys.modules.pop(name, None)


def test_the_plan_says_what_each_module_becomes_and_why(code):
    import tinymodel

    plan = plan_package(tinymodel.build(), intern="tinymodel", extern="tiny*")
    by_name = {m.name: m for m in plan.modules}
    assert plan.ok
    assert by_name["tinymodel"].action == "intern"
    assert by_name["tinymodel"].why == "matched --intern tinymodel"
    assert by_name["tinymodel"].needed_by == "the pickle model/model.pkl"
    assert by_name["tinylib"].action == "extern"
    assert by_name["tinylib"].why == "matched --extern tiny*"
    assert by_name["tinylib"].needed_by == "tinymodel"
    assert by_name["torch"].why == "torch and the standard library are always externed"


def test_a_module_no_pattern_covers_is_a_problem_with_advice(code):
    import tinymodel

    plan = plan_package(tinymodel.build(), intern="tinymodel")
    assert not plan.ok
    assert plan.problems == ("tinylib: no intern, extern or mock pattern matched it "
                             "(needed by tinymodel)",)
    assert "--extern 'tinylib.**'" in format_plan(plan)


def test_package_dry_run_reports_and_writes_nothing(code, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(code)
    out = tmp_path / "tiny.pt"
    assert main(["package", "tinymodel:build", "-o", str(out), "--intern", "tinymodel",
                 "--extern", "tinylib", "--dry-run"]) == 0
    report = capsys.readouterr().out
    assert "interned (source copied into the archive" in report
    assert re.search(r"\n  tinylib +matched --extern tinylib; needed by tinymodel\n", report)
    assert f"dry run: {out} not written" in report
    assert not out.exists()


def test_package_writes_the_archive_as_planned(code, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(code)
    out = tmp_path / "tiny.pt"
    assert main(["package", "tinymodel:build", "-o", str(out), "--intern", "tinymodel",
                 "--intern", "tinylib"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    contents = inspect_package(out)
    assert {"tinymodel", "tinylib"} <= set(contents.modules)


def test_package_with_an_uncovered_module_exits_1_and_writes_nothing(code, tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.chdir(code)
    out = tmp_path / "tiny.pt"
    assert main(["package", "tinymodel:build", "-o", str(out), "--intern", "tinymodel"]) == 1
    captured = capsys.readouterr()
    assert "not covered (intern, extern or mock each of these): 1" in captured.out
    assert "1 module(s) not covered" in captured.err
    assert not out.exists()


@pytest.mark.parametrize("argv, words", [
    (["package", "tinymodel", "-o", "x.pt"], "expected MODULE:FACTORY"),
    (["package", "no_such_module:build", "-o", "x.pt"], "cannot import 'no_such_module'"),
    (["package", "tinymodel:nothing", "-o", "x.pt"], "no callable 'nothing'"),
])
def test_package_usage_errors_exit_2(code, argv, words, capsys, monkeypatch):
    monkeypatch.chdir(code)
    assert main(argv) == 2
    assert words in capsys.readouterr().err


def test_a_factory_that_raises_exits_1_with_its_error_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "x.pt"
    assert main(["package", "json:loads", "-o", str(out)]) == 1  # loads() needs an argument
    err = capsys.readouterr().err
    assert "multipy: error: json:loads() raised TypeError:" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_an_interned_library_that_reads_its_own_files_gets_extern_it_advice(
        code, tmp_path, manager, assert_usable):
    import selfscan_model

    archive = save_package(tmp_path / "selfscan.pt", selfscan_model.UsesSelfscan(),
                           intern=("selfscan_model", "selfscan"))
    with pytest.raises(PackageError, match=r"selfscan, interned in .* cannot run from the "
                                           r"archive.*Extern it instead.*extern=\"selfscan\.\*\*\""):
        manager.load_package(archive).load_pickle("model", "model.pkl")
    # Externed, it runs (the interpreters import it from their sys.path, as the host does).
    archive = save_package(tmp_path / "selfscan2.pt", selfscan_model.UsesSelfscan(),
                           intern="selfscan_model", extern="selfscan")
    model = manager.load_package(archive).load_pickle("model", "model.pkl")
    assert torch.equal(model(torch.ones(2)), torch.full((2,), 2.0))
    assert_usable(manager)
