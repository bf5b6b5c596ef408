"""Where interpreters find ``extern`` modules.

torch::deploy's environments: :class:`NoopEnvironment` uses the host's own
``sys.path``; :class:`PathEnvironment` puts a site-packages directory first.
"""

from __future__ import annotations

import os
import sys


class Environment:
    """Base class: an environment decides an interpreter's ``sys.path``."""

    def sys_path(self) -> tuple[str, ...]:
        raise NotImplementedError


class NoopEnvironment(Environment):
    """Interpreters import what the host can import (the default).

    >>> NoopEnvironment().sys_path() == tuple(p for p in __import__("sys").path)
    True
    """

    def sys_path(self) -> tuple[str, ...]:
        return tuple(sys.path)

    def __repr__(self) -> str:
        return "NoopEnvironment()"


class PathEnvironment(Environment):
    """Interpreters search ``path`` (a site-packages directory) before the host's path.

    >>> env = PathEnvironment("/usr/lib")
    >>> env.sys_path()[0]
    '/usr/lib'
    """

    def __init__(self, path: str | os.PathLike, /) -> None:
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise FileNotFoundError(
                f"PathEnvironment({self.path!r}): no such directory; point it at a "
                "site-packages directory holding the modules your packages extern")

    def sys_path(self) -> tuple[str, ...]:
        return (self.path, *sys.path)

    def __repr__(self) -> str:
        return f"PathEnvironment({self.path!r})"
