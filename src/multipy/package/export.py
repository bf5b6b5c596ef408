"""Write an object to a ``torch.package`` archive in one call.

Example:
    >>> import torch
    >>> save_package("/tmp/lin.pt", torch.nn.Linear(2, 2),
    ...              example_inputs=(torch.rand(1, 2),))
    PosixPath('/tmp/lin.pt')
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch.package import PackageExporter

__all__ = ["EXAMPLE_RESOURCE", "save_package"]

#: Resource name (next to the model) under which example inputs are stored.
EXAMPLE_RESOURCE = "example.pkl"


def save_package(
    path: str | Path,
    obj: Any,
    *,
    package: str = "model",
    resource: str = "model.pkl",
    intern: str | Iterable[str] = (),
    extern: str | Iterable[str] = (),
    mock: str | Iterable[str] = (),
    example_inputs: tuple[Any, ...] | None = None,
    extra_files: Mapping[str, str | bytes] | None = None,
) -> Path:
    """Pickle ``obj`` into a new ``torch.package`` archive at ``path``.

    ``intern``/``extern``/``mock`` are glob patterns handed to the matching
    :class:`~torch.package.PackageExporter` methods (``torch`` and the
    standard library are externed implicitly).  ``example_inputs`` is saved as
    ``<package>/example.pkl``.  ``extra_files`` maps ``"package/resource"``
    (``"a/b/res"`` is resource ``res`` of package ``a.b``) to content:
    ``str`` is saved with ``save_text``, ``bytes`` with ``save_binary``.

    Returns the archive path.

    Example:
        >>> import torch
        >>> save_package("/tmp/id.pt", torch.nn.Identity(),
        ...              extra_files={"extra_files/text": "hello"})
        PosixPath('/tmp/id.pt')
    """
    path = Path(path)
    extra = _split_extra_files(extra_files or {})
    with warnings.catch_warnings():
        # torch.package itself still calls the deprecated TypedStorage API.
        warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
        with PackageExporter(str(path)) as exporter:
            for method, patterns in (
                (exporter.intern, intern),
                (exporter.extern, extern),
                (exporter.mock, mock),
            ):
                patterns = [patterns] if isinstance(patterns, str) else list(patterns)
                if patterns:
                    method(patterns)
            exporter.save_pickle(package, resource, obj)
            if example_inputs is not None:
                exporter.save_pickle(package, EXAMPLE_RESOURCE, tuple(example_inputs))
            for (pkg, name), content in extra.items():
                if isinstance(content, bytes):
                    exporter.save_binary(pkg, name, content)
                else:
                    exporter.save_text(pkg, name, content)
    return path


def _split_extra_files(
    extra_files: Mapping[str, str | bytes],
) -> dict[tuple[str, str], str | bytes]:
    """Turn ``{"pkg/resource": content}`` into ``{("pkg", "resource"): content}``."""
    split: dict[tuple[str, str], str | bytes] = {}
    for key, content in extra_files.items():
        pkg, sep, name = key.rpartition("/")
        if not sep or not pkg or not name:
            raise ValueError(f"extra file key {key!r} must look like 'package/resource'")
        split[(pkg.replace("/", "."), name)] = content
    return split
