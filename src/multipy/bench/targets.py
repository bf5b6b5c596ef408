"""What a benchmark runs on: a torch.package archive and its example inputs.

A target is named on the command line either by an archive path or by the
name of a built-in example (``smallops``, ``resnet``, ``identity``...), which
is written once into a cache directory and reused.

Example:
    >>> target = resolve_target("smallops")                  # doctest: +SKIP
    >>> target.name, target.jit is not None                  # doctest: +SKIP
    ('smallops', True)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .errors import TargetError

__all__ = ["Target", "TargetError", "cache_dir", "example_archive", "resolve_target"]


@dataclasses.dataclass(frozen=True)
class Target:
    """A package to benchmark: ``<archive>`` with ``model/model.pkl`` and
    ``model/example.pkl``, and its TorchScript reference when one sits next to it."""

    name: str
    archive: Path
    jit: Path | None


def cache_dir() -> Path:
    """Where generated example archives are kept, per multipy and torch version.

    ``$MULTIPY_CACHE`` wins, else ``$XDG_CACHE_HOME/multipy`` or ``~/.cache/multipy``.
    """
    import torch

    from .. import __version__

    root = os.environ.get("MULTIPY_CACHE")
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "multipy")
    version = f"multipy-{__version__}-torch-{torch.__version__}".replace("+", "_")
    return Path(root) / "examples" / version


def example_archive(name: str, out: str | os.PathLike | None = None) -> Path:
    """The archive of example ``name`` in ``out`` (default: the cache), written if absent.

    Example:
        >>> example_archive("identity", "/tmp/ex").name       # doctest: +SKIP
        'identity.pt'
    """
    from ..examples import EXAMPLES, generate, jit_path

    if name not in EXAMPLES:
        raise TargetError(f"no example named {name!r}; examples: {', '.join(sorted(EXAMPLES))}")
    directory = Path(out) if out is not None else cache_dir()
    archive = directory / f"{name}.pt"
    complete = archive.exists() and (not EXAMPLES[name].has_jit or jit_path(archive).exists())
    if not complete:
        archive = generate(directory, [name])[name]
    return archive


def resolve_target(spec: str, /, *, out: str | os.PathLike | None = None) -> Target:
    """A :class:`Target` for an archive path or an example name.

    Raises :class:`TargetError` when ``spec`` is neither, or when the archive
    is not a torch.package archive with ``model/model.pkl`` and
    ``model/example.pkl`` (the bench needs example inputs to call the model).
    """
    from ..examples import EXAMPLES, jit_path
    from ..package import inspect_package

    path = Path(spec)
    if path.exists():
        archive = path
    elif spec in EXAMPLES:
        archive = example_archive(spec, out)
    else:
        raise TargetError(f"{spec!r} is neither a torch.package archive nor an example name "
                          f"(examples: {', '.join(sorted(EXAMPLES))})")
    try:
        pickles = inspect_package(archive).pickles
    except (OSError, ValueError) as exc:
        raise TargetError(str(exc)) from None
    missing = [p for p in ("model/model.pkl", "model/example.pkl") if p not in pickles]
    if missing:
        raise TargetError(
            f"{archive} lacks {', '.join(missing)} (it has: {', '.join(pickles) or 'no pickles'}); "
            "write the model with multipy.package.save_package(path, model, "
            "example_inputs=(...,)) so the bench can call it")
    reference = jit_path(archive)
    return Target(archive.stem, archive, reference if reference.exists() else None)
