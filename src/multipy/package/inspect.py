"""List what a ``torch.package`` archive contains, without running any of it.

Only the stdlib :mod:`zipfile` is used: no module is imported, nothing is
unpickled, so inspecting an untrusted archive is safe.

Layout written by :class:`torch.package.PackageExporter` (every entry sits
under one archive root folder, which is stripped here)::

    <root>/pkg/mod.py              interned module ``pkg.mod``
    <root>/pkg/__init__.py         interned package ``pkg``
    <root>/model/model.pkl         pickle resource ``model/model.pkl``
    <root>/extra_files/text        other resource ``extra_files/text``
    <root>/.data/extern_modules    externed module names, one per line
    <root>/.data/python_version    Python version that wrote the archive
    <root>/.data/<n>.storage       raw tensor storage bytes
    <root>/.data/version           archive format version
    <root>/byteorder               byte order of the storages

Mocked modules are not recorded separately: torch.package writes each as a
``.py`` stub with fixed source, plus a helper module ``_mock``; they are
recognised by that stub.

Example:
    >>> contents = inspect_package("out/simple.pt")        # doctest: +SKIP
    >>> contents.modules                                   # doctest: +SKIP
    ('multipy.examples.models',)
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PackageContents", "format_contents", "inspect_package"]

_DATA = ".data/"
_MOCK_HELPER = "_mock"
# Source of a mocked module's stub (torch.package.package_exporter._MOCK_IMPL).
_MOCK_STUB_PREFIX = b"from _mock import MockedObject"


@dataclass(frozen=True)
class PackageContents:
    """What :func:`inspect_package` found in one archive.

    Resource names are ``"package/resource"`` with the archive root removed.

    Example:
        >>> PackageContents(path=Path("a.pt"), root="a").modules
        ()
    """

    path: Path
    root: str
    modules: tuple[str, ...] = ()  # interned modules, sorted
    pickles: tuple[str, ...] = ()  # "*.pkl" resources, sorted
    resources: tuple[str, ...] = ()  # other resources, sorted
    externs: tuple[str, ...] = ()  # sorted
    mocked: tuple[str, ...] = ()  # sorted
    storage_count: int = 0
    storage_bytes: int = 0
    python_version: str | None = None
    format_version: str | None = None
    byteorder: str | None = None


def inspect_package(path: str | Path) -> PackageContents:
    """Read the table of contents of the ``torch.package`` archive at ``path``.

    Raises ``FileNotFoundError`` if ``path`` does not exist and ``ValueError``
    if it is not a zip file or its entries do not share one root folder.

    Example:
        >>> inspect_package("out/simple.pt").pickles       # doctest: +SKIP
        ('model/example.pkl', 'model/model.pkl')
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no torch.package archive at {path}: file not found")
    if path.is_dir() or not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a torch.package archive (not a zip file)")
    try:
        with zipfile.ZipFile(path) as archive:
            return _read_contents(path, archive)
    except zipfile.BadZipFile as exc:
        raise ValueError(
            f"{path} is not a torch.package archive (not a zip file): {exc}"
        ) from exc


def _read_contents(path: Path, archive: zipfile.ZipFile) -> PackageContents:
    infos = [info for info in archive.infolist() if not info.is_dir()]
    root = _archive_root(path, infos)
    modules, mocked, pickles, resources = [], [], [], []
    storage_count = storage_bytes = 0
    records: dict[str, bytes] = {}
    for info in infos:
        name = info.filename[len(root) + 1 :]
        if name.startswith(_DATA):
            record = name[len(_DATA) :]
            if record.endswith(".storage"):
                storage_count += 1
                storage_bytes += info.file_size
            elif record in ("extern_modules", "python_version", "version"):
                records[record] = archive.read(info)
        elif name == "byteorder":
            records[name] = archive.read(info)
        elif name.endswith(".py"):
            module = _module_name(name)
            if module == _MOCK_HELPER:
                continue
            is_stub = archive.read(info).startswith(_MOCK_STUB_PREFIX)
            (mocked if is_stub else modules).append(module)
        elif name.endswith(".pkl"):
            pickles.append(name)
        else:
            resources.append(name)
    return PackageContents(
        path=path,
        root=root,
        modules=tuple(sorted(modules)),
        pickles=tuple(sorted(pickles)),
        resources=tuple(sorted(resources)),
        externs=tuple(sorted(_text(records.get("extern_modules")).split())),
        mocked=tuple(sorted(mocked)),
        storage_count=storage_count,
        storage_bytes=storage_bytes,
        python_version=_text(records.get("python_version")) or None,
        format_version=_text(records.get("version")) or None,
        byteorder=_text(records.get("byteorder")) or None,
    )


def _archive_root(path: Path, infos: list[zipfile.ZipInfo]) -> str:
    roots = {info.filename.split("/", 1)[0] for info in infos}
    if len(roots) != 1 or not all("/" in info.filename for info in infos):
        raise ValueError(
            f"{path} is not a torch.package archive "
            f"(expected every entry under one root folder, found {sorted(roots)})"
        )
    return roots.pop()


def _module_name(name: str) -> str:
    """``"a/b/__init__.py"`` -> ``"a.b"``; ``"a/b/c.py"`` -> ``"a.b.c"``."""
    parts = name[: -len(".py")].split("/")
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _text(record: bytes | None) -> str:
    return (record or b"").decode("utf-8", errors="replace").strip()


def format_contents(contents: PackageContents) -> str:
    """Render ``contents`` as a readable multi-line report.

    Example:
        >>> print(format_contents(PackageContents(Path("a.pt"), "a")))
        torch.package archive a.pt (root 'a', python ?)
          modules (0): -
          pickles (0): -
          resources (0): -
          externs (0): -
          mocked (0): -
          storages: 0 (0 B)
    """
    lines = [
        f"torch.package archive {contents.path} "
        f"(root {contents.root!r}, python {contents.python_version or '?'})"
    ]
    for label in ("modules", "pickles", "resources", "externs", "mocked"):
        items = getattr(contents, label)
        if not items:
            lines.append(f"  {label} (0): -")
            continue
        lines.append(f"  {label} ({len(items)}):")
        lines.extend(f"    {item}" for item in items)
    lines.append(
        f"  storages: {contents.storage_count} ({_human_bytes(contents.storage_bytes)})"
    )
    return "\n".join(lines)


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
