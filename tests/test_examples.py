"""Behaviour of the example archives written by ``multipy.examples.generate``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch.package import PackageImporter

from multipy.examples import EXAMPLES, generate, jit_path
from multipy.examples.__main__ import main

pytestmark = pytest.mark.filterwarnings(
    "ignore:TypedStorage is deprecated:UserWarning",
    r"ignore:`torch\.jit\.:DeprecationWarning",
)

JIT_EXAMPLES = sorted(name for name, ex in EXAMPLES.items() if ex.has_jit)
TOLERANCES = {"rtol": 1e-3, "atol": 1e-5}


@pytest.fixture(scope="session")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate(tmp_path_factory.mktemp("examples"))


def load(archive: Path) -> tuple[torch.nn.Module, tuple]:
    importer = PackageImporter(str(archive))
    return importer.load_pickle("model", "model.pkl"), importer.load_pickle(
        "model", "example.pkl"
    )


def test_generate_writes_one_archive_per_example(archives):
    assert list(archives) == list(EXAMPLES)
    for name, archive in archives.items():
        assert archive.name == f"{name}.pt"
        assert archive.is_file()


def test_jit_reference_is_written_only_where_torchscript_can_express_the_model(archives):
    for name, archive in archives.items():
        assert jit_path(archive).is_file() == EXAMPLES[name].has_jit, name
    assert {"batched_model", "uses_cuda", "uses_distributed"}.isdisjoint(JIT_EXAMPLES)


@pytest.mark.parametrize("name", JIT_EXAMPLES)
def test_packaged_model_matches_its_jit_reference(archives, name):
    model, example = load(archives[name])
    reference = torch.jit.load(str(jit_path(archives[name])))
    with torch.no_grad():
        torch.testing.assert_close(model(*example), reference(*example), **TOLERANCES)


def test_model_classes_are_interned_in_the_archive(archives):
    model, _ = load(archives["simple"])
    assert type(model).__module__.startswith("<torch_package_")
    assert type(model).__module__.endswith("multipy.examples.models")


FRESH_CHECK = textwrap.dedent(
    """
    import json, sys
    sys.modules["multipy"] = None  # make `import multipy` fail even if installed
    import torch
    from torch.package import PackageImporter

    names, jit_names, out = json.loads(sys.argv[1])
    for name in names:
        importer = PackageImporter(f"{out}/{name}.pt")
        model = importer.load_pickle("model", "model.pkl")
        example = importer.load_pickle("model", "example.pkl")
        if name in jit_names:
            reference = torch.jit.load(f"{out}/{name}_jit.pt")
            with torch.no_grad():
                torch.testing.assert_close(
                    model(*example), reference(*example), rtol=1e-3, atol=1e-5
                )
        print("ok", name)
    """
)


def test_archives_load_and_match_in_a_python_without_multipy(archives, tmp_path):
    out = next(iter(archives.values())).parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    payload = json.dumps([list(archives), JIT_EXAMPLES, str(out)])
    result = subprocess.run(
        [sys.executable, "-I", "-c", FRESH_CHECK, payload],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [w for name in archives for w in ("ok", name)]


def test_simple_archive_carries_extra_files(archives):
    importer = PackageImporter(str(archives["simple"]))
    assert importer.load_text("extra_files", "text") == "hello"
    assert importer.load_binary("extra_files", "binary") == b"hello"


def test_multi_return_returns_nested_tuple_without_mutating_input(archives):
    model, (x,) = load(archives["multi_return"])
    before = x.clone()
    plus_one, (doubled, masked) = model(x)
    torch.testing.assert_close(x, before)
    torch.testing.assert_close(plus_one, x + 1)
    torch.testing.assert_close(doubled, x * 2)
    assert bool((masked <= 0.5).all())


def test_batched_model_predicts_pairs_and_splits_batches_by_max_bs(archives):
    model, (i1, i2) = load(archives["batched_model"])
    torch.testing.assert_close(model(i1, i2), i1 + i2)
    pairs = [(i1[k], i2[k]) for k in range(len(i1))]
    assert [len(b) for b in model.make_batch(pairs, {"max_bs": "3"})] == [3, 3, 2]
    predictions = model.make_prediction(pairs)
    torch.testing.assert_close(torch.stack(predictions), i1 + i2)


def test_uses_distributed_returns_its_input(archives):
    model, (x,) = load(archives["uses_distributed"])
    assert model(x) is x


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU failure")
def test_uses_cuda_refuses_to_run_without_a_gpu(archives):
    model, (x,) = load(archives["uses_cuda"])
    with pytest.raises(AssertionError, match="CUDA is unavailable"):
        model(x)


def test_smallops_has_forty_linear_layers(archives):
    model, (x,) = load(archives["smallops"])
    assert len(model.layers) == 40
    assert model(x).shape == (1, 16)


def test_identity_returns_its_input_unchanged(archives):
    model, (x,) = load(archives["identity"])
    assert model(x) is x


def test_generate_is_deterministic_and_independent_of_the_subset(archives, tmp_path):
    alone = generate(tmp_path, ["simple"])
    first, _ = load(archives["simple"])
    second, _ = load(alone["simple"])
    torch.testing.assert_close(first.weight, second.weight, rtol=0, atol=0)


def test_generate_leaves_the_callers_rng_untouched(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate(tmp_path, ["identity"])
    torch.testing.assert_close(torch.rand(3), expected)


def test_generate_writes_only_the_requested_examples(tmp_path):
    assert list(generate(tmp_path, ["identity", "simple"])) == ["identity", "simple"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "identity.pt",
        "identity_jit.pt",
        "simple.pt",
        "simple_jit.pt",
    ]


def test_generate_rejects_unknown_example_names(tmp_path):
    with pytest.raises(ValueError, match="unknown example.*'nope'"):
        generate(tmp_path, ["simple", "nope"])


def test_cli_prints_one_line_per_archive_written(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # generation itself is warning-free
        assert main(["--out", str(tmp_path), "--only", "identity", "batched_model"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"identity: {tmp_path / 'identity.pt'} (+ identity_jit.pt)",
        f"batched_model: {tmp_path / 'batched_model.pt'}",
    ]
