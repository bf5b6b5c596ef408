"""`multipy serve` command-line mistakes: one line, exit 2, nothing started."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'multipy[serve]'")

from multipy.cli import main  # noqa: E402
from multipy.serve import ModelSpec  # noqa: E402


@pytest.mark.parametrize("argv, message", [
    (["serve"], "name at least one model"),
    (["serve", "simple"], "expected NAME=PATH, got 'simple'"),
    (["serve", "simple=/nonexistent/simple.pt"], "model 'simple': no file /nonexistent/simple.pt"),
    (["serve", "a/b=x.pt"], "must be non-empty and have no '/'"),
    (["serve", "m=x.pt:model/"], "expected PATH:package/resource"),
    (["serve", "--config", "/nonexistent.json"], "--config /nonexistent.json"),
])
def test_a_mistake_on_the_command_line_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("multipy: error: ") and message in err
    assert "Traceback" not in err


def test_a_config_file_with_an_unknown_option_names_it(tmp_path, capsys):
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"models": {"m": str(config)}, "max_queu": 3}))
    assert main(["serve", "--config", str(config)]) == 2
    assert "unknown option max_queu" in capsys.readouterr().err


def test_a_config_file_with_a_bad_value_names_it(tmp_path, capsys):
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"models": {"m": str(config)}, "max_queue": 0}))
    assert main(["serve", "--config", str(config)]) == 2
    assert "max_queue must be a whole number of at least 1, got 0" in capsys.readouterr().err


def test_a_path_may_name_the_pickle_inside_the_archive():
    assert ModelSpec.parse("m", "/a/b.pt") == ModelSpec("m", "/a/b.pt", "model", "model.pkl")
    assert ModelSpec.parse("m", "/a/b.pt:weights/net.pkl") == ModelSpec(
        "m", "/a/b.pt", "weights", "net.pkl")
    assert ModelSpec.parse("m", "/a/b.pt:my/pkg/net.pkl").package == "my.pkg"
