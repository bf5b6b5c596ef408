"""Package: a torch.package archive loaded into a manager.

Resources (``load_text``/``load_binary``) are read by the host straight from
the zip, without running anything from the archive.  Pickles become
:class:`~multipy.runtime.replicated.ReplicatedObj` handles, loaded in each
interpreter on first use with their storages shared.
"""

from __future__ import annotations

import itertools
import os
import re
import weakref
import zipfile
from typing import TYPE_CHECKING

from ..errors import PackageError
from ..transport.messages import Drop, Op, Recipe
from .replicated import ReplicatedObj
from .session import InterpreterSession

if TYPE_CHECKING:
    from .manager import InterpreterManager

_ids = itertools.count(1)


def check_archive(path: str) -> list[str]:
    """Record names (without the archive root) of a torch.package archive.

    Raises ``FileNotFoundError`` / :class:`PackageError` naming ``path``.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"package {path!r} does not exist")
    if os.path.isdir(path) or not zipfile.is_zipfile(path):
        raise PackageError(
            f"{path!r} is not a torch.package archive (not a zip file); "
            "write one with torch.package.PackageExporter or multipy.package.save_package")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            bad = zf.testzip() if os.path.getsize(path) < (64 << 20) else None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise PackageError(f"{path!r} is a damaged zip archive: {exc}") from exc
    if bad is not None:
        raise PackageError(f"{path!r} is a damaged zip archive: record {bad!r} fails its CRC check")
    return [n.split("/", 1)[1] for n in names if "/" in n]


class Package:
    """A torch.package archive opened by an :class:`InterpreterManager`.

    >>> package = manager.load_package("simple.pt")        # doctest: +SKIP
    >>> model = package.load_pickle("model", "model.pkl")  # doctest: +SKIP
    >>> package.load_text("extra_files", "text")  # doctest: +SKIP
    'hello'
    """

    def __init__(self, manager: "InterpreterManager", path: str) -> None:
        self._manager = manager
        self.path = os.path.abspath(path)
        self._records = check_archive(self.path)
        self._id = next(_ids)
        self._on_device: dict[str, dict] = {}
        manager._packages[self._id] = self
        # Each interpreter that opened the archive keeps an importer (and the file)
        # until every handle that can use it -- this one, the objects loaded from
        # it, its sessions -- is gone.
        weakref.finalize(self, _forget, manager._workers, self._id)

    def __repr__(self) -> str:
        return f"<Package {self.path!r}>"

    def _resource(self, package: str, resource: str) -> str:
        if not isinstance(package, str) or not isinstance(resource, str):
            raise TypeError(f"a resource is named by two str, its package and its name "
                            f"(e.g. 'model', 'model.pkl'), got {package!r}, {resource!r}")
        name = f"{package.replace('.', '/')}/{resource}"
        if name not in self._records:
            listing = sorted(r for r in self._records if not r.startswith(".data/") and not r.endswith(".py"))
            raise PackageError(f"no resource {name!r} in package {self.path!r}; resources there: "
                               f"{', '.join(listing) or 'none'}")
        return name

    def load_pickle(self, package: str, resource: str, /, *,
                    map_location=None) -> ReplicatedObj:
        """The pickled object ``package/resource`` as a :class:`ReplicatedObj`.

        It is loaded at once in one interpreter (so a bad pickle fails here) and
        lazily in the others.  ``map_location`` is torch.package's: with a CUDA
        device (``"cuda:0"``) the host uploads the archive's storages to that
        GPU once and every interpreter maps them by CUDA IPC, so N interpreters
        hold one copy of the weights in device memory.

        >>> model = package.load_pickle("model", "model.pkl", map_location="cuda:0")  # doctest: +SKIP
        """
        self._resource(package, resource)
        location = None if map_location is None else str(map_location)
        storages = self._device_storages(location) if location and location.startswith("cuda") else None
        replicated = ReplicatedObj(self._manager, (int(Recipe.PICKLE), self._id, self.path, package,
                                                   resource, location, storages), uses=(self,))
        try:
            self._manager._with_worker(
                lambda worker: worker.request(Op.MATERIALIZE, (replicated._id,),  # loads: unbounded
                                              materializes=replicated._id,
                                              recipe=replicated._recipe))
        except Exception as exc:
            advice = _not_runnable_from_archive(exc, self.path)
            if advice is None:
                raise
            raise advice from exc
        return replicated

    def _device_storages(self, device: str) -> dict:
        """The archive's storages on ``device``, uploaded once and kept by the host
        (the owner of the memory every interpreter maps)."""
        cached = self._on_device.get(device)
        if cached is None:
            import warnings

            import numpy as np
            import torch

            from ..interp.packages import stored_records
            from ..transport.cuda_link import share_by_mapping

            cached = {}
            with open(self.path, "rb") as f:
                data = np.fromfile(f, dtype=np.uint8)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for name, (offset, size) in stored_records(self.path).items():
                    if name.startswith(".data/") and name.endswith(".storage"):
                        cached[name] = share_by_mapping(
                            torch.from_numpy(data[offset:offset + size]).to(device))
            self._on_device[device] = cached
        return cached

    def _read(self, package: str, resource: str) -> bytes:
        name = self._resource(package, resource)
        with zipfile.ZipFile(self.path) as zf:
            root = zf.namelist()[0].split("/", 1)[0]
            return zf.read(f"{root}/{name}")

    def load_text(self, package: str, resource: str, /) -> str:
        """A text resource of the archive (read by the host; nothing is executed).

        Raises :class:`PackageError` naming the resource when it is not UTF-8 text.
        """
        data = self._read(package, resource)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PackageError(
                f"resource {self._resource(package, resource)!r} of package {self.path!r} is "
                f"not UTF-8 text ({exc}); load pickles with load_pickle and read other bytes "
                "with load_binary") from exc

    def load_binary(self, package: str, resource: str, /) -> bytes:
        """A binary resource of the archive (read by the host; nothing is executed)."""
        return self._read(package, resource)

    def acquire_session(self) -> InterpreterSession:
        """A session whose ``self`` is that interpreter's ``PackageImporter``."""
        session = self._manager.acquire_one()
        try:
            session.self = session._request_obj(Op.PACKAGE_IMPORTER, (self._id, self.path))
            session._keep.append(self)
        except BaseException:
            session.close()
            raise
        return session


def _forget(workers, package_id: int) -> None:
    for worker in workers:
        worker.drop((int(Drop.PACKAGE), package_id))


# An interned module's files live inside the archive, under a mangled name such as
# "<torch_package_0>.transformers/models": a library that lists or opens its own
# files on disk fails there with a path like that in its error.
_MANGLED = re.compile(r"<torch_package_\d+>\.([A-Za-z_]\w*)")


def _not_runnable_from_archive(exc: BaseException, path: str) -> PackageError | None:
    """A PackageError saying to extern the library, when ``exc`` comes from an interned
    library looking for its own files; else ``None``.

    >>> str(_not_runnable_from_archive(FileNotFoundError("'<torch_package_0>.lib/data'"), "m.pt"))[:52]
    'lib, interned in m.pt, cannot run from the archive: '
    """
    match = _MANGLED.search(str(exc))
    if match is None:
        return None
    name = match.group(1)
    return PackageError(
        f"{name}, interned in {path}, cannot run from the archive: it looks for its own files "
        f"on disk ({type(exc).__name__}: {exc}). Extern it instead: "
        f"save_package(..., extern=\"{name}.**\") (or exporter.extern(\"{name}.**\"), or "
        f"multipy package ... --extern '{name}.**'), and install {name} where the interpreters "
        "import from.")
