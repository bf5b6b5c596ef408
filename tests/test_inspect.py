"""Behaviour of ``multipy.package.inspect_package`` (a read-only zip listing)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from multipy.examples import generate
from multipy.package import PackageContents, format_contents, inspect_package


@pytest.fixture(scope="session")
def simple(tmp_path_factory: pytest.TempPathFactory) -> PackageContents:
    archive = generate(tmp_path_factory.mktemp("inspect"), ["simple"])["simple"]
    return inspect_package(archive)


def write_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def test_lists_the_interned_model_module(simple):
    assert simple.modules == ("multipy.examples.models",)


def test_lists_model_and_example_pickles(simple):
    assert simple.pickles == ("model/example.pkl", "model/model.pkl")


def test_lists_extra_files_as_resources(simple):
    assert simple.resources == ("extra_files/binary", "extra_files/text")


def test_lists_externs_from_the_extern_modules_record(simple):
    assert "torch" in simple.externs
    assert list(simple.externs) == sorted(simple.externs)
    assert not any(name.startswith("multipy") for name in simple.externs)
    assert simple.mocked == ()


def test_counts_tensor_storages_and_their_bytes(simple):
    # Simple(10, 20).weight and the (10, 20) example input, float32 each.
    assert simple.storage_count == 2
    assert simple.storage_bytes == 2 * 10 * 20 * 4


def test_strips_the_archive_root_and_reads_metadata_records(simple):
    assert simple.root == "simple"
    assert simple.python_version and simple.python_version.count(".") == 2
    assert simple.byteorder == "little"


def test_reports_mocked_modules_apart_from_interned_ones(tmp_path):
    pytest.importorskip("numpy")
    from torch.package import PackageExporter

    archive = tmp_path / "mocked.pt"
    with PackageExporter(str(archive)) as exporter:
        exporter.mock(["numpy", "numpy.**"])
        exporter.save_source_string("uses_numpy", "import numpy\n")
    contents = inspect_package(archive)
    assert contents.modules == ("uses_numpy",)  # the ``_mock`` helper is hidden
    assert contents.mocked == ("numpy",)


def test_maps_init_files_to_package_names_without_unpickling(tmp_path):
    archive = write_zip(
        tmp_path / "handmade.pt",
        {
            "root/a/__init__.py": b"",
            "root/a/b.py": b"raise SystemExit('executed!')",
            "root/x/y.pkl": b"not a pickle at all",
            "root/x/notes.txt": b"hi",
            "root/.data/extern_modules": b"torch\nbuiltins\n",
            "root/.data/0.storage": b"\0" * 12,
        },
    )
    contents = inspect_package(archive)
    assert contents.modules == ("a", "a.b")
    assert contents.pickles == ("x/y.pkl",)
    assert contents.resources == ("x/notes.txt",)
    assert contents.externs == ("builtins", "torch")
    assert (contents.storage_count, contents.storage_bytes) == (1, 12)
    assert contents.python_version is None


def test_missing_path_raises_file_not_found_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        inspect_package(missing)


def test_non_zip_file_raises_value_error_naming_the_path(tmp_path):
    bogus = tmp_path / "bogus.pt"
    bogus.write_text("definitely not a zip")
    with pytest.raises(ValueError, match="not a zip file") as excinfo:
        inspect_package(bogus)
    assert str(bogus) in str(excinfo.value)


def test_directory_raises_value_error_naming_the_path(tmp_path):
    with pytest.raises(ValueError, match="not a torch.package archive") as excinfo:
        inspect_package(tmp_path)
    assert str(tmp_path) in str(excinfo.value)


def test_zip_without_a_single_root_folder_is_rejected(tmp_path):
    archive = write_zip(tmp_path / "flat.zip", {"a.py": b"", "other/b.py": b""})
    with pytest.raises(ValueError, match="one root folder") as excinfo:
        inspect_package(archive)
    assert str(archive) in str(excinfo.value)


def test_format_contents_reports_every_section(simple):
    report = format_contents(simple)
    assert report.splitlines()[0].startswith(f"torch.package archive {simple.path}")
    for expected in (
        "modules (1):",
        "    multipy.examples.models",
        "pickles (2):",
        "    model/model.pkl",
        "    extra_files/text",
        "mocked (0): -",
        "storages: 2 (1.6 KiB)",
    ):
        assert expected in report
