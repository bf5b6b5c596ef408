"""Modules registered from source, importable inside one interpreter.

A meta-path finder that serves ``name -> source`` pairs.  Each interpreter has
its own finder and so its own copy of every registered module.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys


class SourceFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds and loads modules from registered source strings."""

    def __init__(self) -> None:
        self.sources: dict[str, str] = {}

    def register(self, name: str, source: str) -> None:
        compile(source, f"<registered module {name}>", "exec")  # syntax errors surface here
        self.sources[name] = source
        sys.modules.pop(name, None)

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.sources:
            return importlib.util.spec_from_loader(fullname, self, origin=f"<registered module {fullname}>")
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        code = compile(self.sources[module.__name__], module.__spec__.origin, "exec")
        exec(code, module.__dict__)

    def install(self) -> "SourceFinder":
        sys.meta_path.insert(0, self)
        return self
