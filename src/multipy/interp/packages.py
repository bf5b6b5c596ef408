"""torch.package archives opened with their storages shared between interpreters.

torch.package stores each tensor storage as an uncompressed, 64-byte aligned
zip entry.  Instead of reading those entries into private memory, every
interpreter maps the archive file copy-on-write and views each storage in
place: the page cache holds one copy of the weights however many interpreters
load the model, and an interpreter that writes to a weight gets a private copy
of just the pages it wrote.
"""

from __future__ import annotations

import contextlib
import importlib.util
import mmap
import os
import struct
import sys
import threading
import warnings
import weakref
import zipfile
from typing import Callable

from ..errors import ExternModuleError, PackageError

_LOCAL_HEADER = struct.Struct("<4s5H3I2H")


def stored_records(path: str) -> dict[str, tuple[int, int]]:
    """``{record name without the archive root: (data offset, size)}`` for
    uncompressed entries of the zip at ``path``."""
    out = {}
    with open(path, "rb") as raw, zipfile.ZipFile(raw) as zf:
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                continue
            raw.seek(info.header_offset)
            fields = _LOCAL_HEADER.unpack(raw.read(_LOCAL_HEADER.size))
            name_len, extra_len = fields[-2], fields[-1]
            data = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
            name = info.filename.split("/", 1)[1] if "/" in info.filename else info.filename
            out[name] = (data, info.file_size)
    return out


class StorageSource:
    """An archive file mapped copy-on-write once, and the storages viewed in it.

    One source may serve several importers of the same file (the thread
    backend's interpreters share one per process): their storages are then the
    same tensors.  Thread-safe.
    """

    def __init__(self, path: str) -> None:
        import numpy as np

        self._records = stored_records(path)
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self._base = np.frombuffer(self._mm, dtype=np.uint8)
        self._cache: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def storage(self, name, numel, dtype):
        """Record ``name`` as a tensor viewing the mapping, or ``None`` where it
        cannot be viewed in place (absent, short or not 64-byte aligned)."""
        import torch

        with self._lock:
            cached = self._cache.get((name, dtype))
            if cached is not None:
                return cached
            found = self._records.get(name)
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if found is None or found[1] < nbytes or found[0] % 64:
                return None
            offset, _ = found
            t = torch.from_numpy(self._base[offset:offset + nbytes])
            if dtype != torch.uint8:
                t = t.view(dtype)
            self._cache[(name, dtype)] = t
            return t


class SharedStorageReader:
    """A proxy for ``PackageImporter.zip_reader`` whose storages come from a
    :class:`StorageSource` (views of the archive mapped copy-on-write).
    Everything else is delegated."""

    def __init__(self, reader, source: StorageSource) -> None:
        self._reader = reader
        self._source = source
        self.preloaded: dict | None = None  # record name -> uint8 tensor (e.g. on a GPU)

    def get_storage_from_record(self, name, numel, dtype):
        import torch

        if self.preloaded is not None and name in self.preloaded:
            data = self.preloaded[name]
            return data if dtype == torch.uint8 else data.view(dtype)
        t = self._source.storage(name, numel, dtype)
        return t if t is not None else self._reader.get_storage_from_record(name, numel, dtype)

    def __getattr__(self, name):
        return getattr(self._reader, name)


@contextlib.contextmanager
def preloaded_storages(importer, storages: dict | None):
    """Serve the storages of one load from ``storages`` (tensors the host placed,
    e.g. on a GPU and mapped here by CUDA IPC) instead of the archive file."""
    reader = importer.zip_reader
    if storages is None or not hasattr(reader, "preloaded"):
        yield
        return
    reader.preloaded = storages
    try:
        yield
    finally:
        reader.preloaded = None


def _quiet_torch_package() -> None:
    # torch.package's own loader trips torch's TypedStorage deprecation warning on every
    # load; it says nothing the user can act on, so interpreters do not print it.
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)


def open_package(path: str, source_for: Callable[[str], StorageSource] = StorageSource):
    """A ``PackageImporter`` for ``path`` whose storages are shared: views of
    ``source_for(path)`` (default: a new mapping of the file).

    Raises :class:`ExternModuleError` when an extern module of the archive
    cannot be found in this interpreter's environment.
    """
    from torch.package import PackageImporter

    _quiet_torch_package()
    if not os.path.exists(path):
        raise PackageError(f"package {path!r} does not exist")
    importer = PackageImporter(path)
    importer.zip_reader = SharedStorageReader(importer.zip_reader, source_for(path))
    missing = sorted({m.split(".")[0] for m in importer.extern_modules
                      if m and _top_level_missing(m.split(".")[0])})
    if missing:
        names = ", ".join(repr(m) for m in missing)
        raise ExternModuleError(
            f"package {path!r} needs extern module(s) {names}, which this interpreter's "
            f"environment cannot import; searched sys.path = {sys.path}. Install them into the "
            "environment given to InterpreterManager (PathEnvironment(site_packages)), or "
            "mock or intern them when exporting the package.")
    return importer


def release_importer(importer) -> None:
    """Drop what torch keeps, process-wide, of a package's modules, so that
    ``importer`` (and the archive it holds open) is freed once nothing else
    uses it.

    Two registries outlive the importer otherwise: ``linecache``'s lazy source
    entries (made whenever a traceback or warning passes through package code)
    and ``torch.fx.wrap``'s record of the module globals of every caller.  In an
    interpreter process this only matters for long lives; in the ``thread``
    backend the importers live in the host, one per interpreter and package.
    """
    import linecache

    prefix = importer._mangler.parent_name() + "."
    for key in [k for k in list(linecache.cache) if isinstance(k, str) and k.startswith(prefix)]:
        linecache.cache.pop(key, None)
    fx = sys.modules.get("torch.fx._symbolic_trace")
    if fx is not None:
        wrapped = fx._wrapped_fns_to_patch
        for key, scope in list(wrapped.items()):
            if str(scope.get("__name__", "")).startswith(prefix):
                wrapped.pop(key, None)
        proxyable = fx._proxyable_classes
        for cls in list(proxyable):
            if str(getattr(cls, "__module__", "")).startswith(prefix):
                proxyable.pop(cls, None)


def _top_level_missing(name: str) -> bool:
    if name in sys.modules:
        return False
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def check_resource(importer, package: str, resource: str) -> None:
    """Raise :class:`PackageError` listing what exists when a resource is absent."""
    path = f"{package.replace('.', '/')}/{resource}"
    if importer.zip_reader.has_record(path):
        return
    records = importer.zip_reader.get_all_records()
    pickles = sorted(r for r in records if r.endswith(".pkl") and not r.startswith(".data/"))
    raise PackageError(
        f"no resource {path!r} in package {importer.filename!r}; "
        f"pickles there: {', '.join(pickles) or 'none'}")
