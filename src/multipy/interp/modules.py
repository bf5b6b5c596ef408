"""Modules registered from source, importable inside one interpreter.

Two ways to keep one copy of every registered module per interpreter, one per
kind of interpreter:

``SourceFinder``   an interpreter that is a whole Python process (``process``,
                   ``subinterpreter``): a meta-path finder installed in that
                   interpreter's own ``sys.meta_path``; registered modules live
                   in its own ``sys.modules``.
``ThreadModules``  an interpreter that is a thread of the host process
                   (``thread``): ``sys.modules`` is shared by every thread, so
                   registered modules never enter it.  Each interpreter keeps
                   its own ``{name: module}`` and an import hook serves them to
                   the threads that interpreter runs on::

        import foomodule  (in interpreter 1's thread)
           └─▶ sys.modules miss ─▶ importlib._bootstrap._find_and_load  (hooked)
                 └─▶ thread-local ThreadModules of interpreter 1 ─▶ its own module
        import foomodule  (in the host, or in a thread multipy did not start)
           └─▶ not registered there: the ordinary import system (ModuleNotFoundError)

What ``ThreadModules`` isolates and what it does not:

* isolated: every registered module (its globals, its functions, the classes it
  defines), per interpreter, and modules that a registered module imports from
  other registered modules;
* shared by the host and all thread interpreters, by design: ``sys.modules``
  itself, the standard library, ``torch``, ``numpy`` and everything imported
  from ``sys.path``, ``builtins``;
* not reached by the hook: the ``import`` statement consults ``sys.modules``
  before any hook, so a registered name that the host process has already
  imported as an ordinary module resolves to the host's module for ``import``
  statements (``importlib.import_module`` and ``session.global_`` still give the
  interpreter's registered copy); a registered submodule of an ordinary package
  (``"json.extra"``) is set as an attribute of that shared package by whichever
  interpreter imported it last: import it by its full name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import linecache
import sys
import threading
import types


def _origin(name: str) -> str:
    return f"<registered module {name}>"


def _remember_source(name: str, source: str) -> None:
    """Put ``source`` in ``linecache`` so tracebacks show registered modules' lines
    (``traceback`` never asks a loader for files named ``<...>``)."""
    lines = source.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    linecache.cache[_origin(name)] = (len(source), None, lines, _origin(name))


class SourceFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds and loads modules from registered source strings (one interpreter
    per process: installed in that process's ``sys.meta_path``)."""

    def __init__(self) -> None:
        self.sources: dict[str, str] = {}

    def register(self, name: str, source: str) -> None:
        compile(source, _origin(name), "exec")  # syntax errors surface here
        self.sources[name] = source
        _remember_source(name, source)
        sys.modules.pop(name, None)

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.sources:
            return importlib.util.spec_from_loader(fullname, self, origin=_origin(fullname))
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        code = compile(self.sources[module.__name__], module.__spec__.origin, "exec")
        exec(code, module.__dict__)

    def install(self) -> "SourceFinder":
        sys.meta_path.insert(0, self)
        return self

    def activate_for_thread(self) -> None:
        """Nothing to do: this finder serves every thread of its process."""

    def close(self) -> None:
        """Nothing to do: the finder lives as long as its process."""


_local = threading.local()


class ThreadModules(importlib.abc.Loader):
    """The registered modules of one interpreter that runs on a thread of the host.

    ``extra_paths`` are directories searched for ordinary modules by this
    interpreter's threads only (a :class:`~multipy.PathEnvironment`'s
    site-packages); what is found there is imported once for the whole process.

    >>> modules = ThreadModules()
    >>> modules.register("foomodule", "def add1(x):\\n    return x + 1\\n")
    >>> modules.activate_for_thread()
    >>> import foomodule
    >>> foomodule.add1(2)
    3
    >>> modules.deactivate_for_thread(); modules.close()
    """

    def __init__(self, extra_paths: tuple[str, ...] = ()) -> None:
        self.sources: dict[str, str] = {}
        self.modules: dict[str, types.ModuleType] = {}
        self.extra_paths = list(extra_paths)
        self._closed = False
        _hook.acquire()

    def register(self, name: str, source: str) -> None:
        compile(source, _origin(name), "exec")  # syntax errors surface here
        self.sources[name] = source
        _remember_source(name, source)
        self.modules.pop(name, None)  # registering again replaces the module

    def activate_for_thread(self) -> None:
        """Serve this interpreter's modules to imports made on the calling thread."""
        _local.modules = self

    @staticmethod
    def deactivate_for_thread() -> None:
        _local.modules = None

    def module(self, name: str) -> types.ModuleType:
        """This interpreter's copy of registered module ``name`` (executed on first use)."""
        module = self.modules.get(name)
        if module is not None:
            return module
        spec = importlib.util.spec_from_loader(name, self, origin=_origin(name))
        module = importlib.util.module_from_spec(spec)
        self.modules[name] = module  # a module that imports itself sees the partial one
        try:
            self.exec_module(module)
        except BaseException:
            if self.modules.get(name) is module:
                del self.modules[name]
            raise
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(importlib.import_module(parent), child, module)
        return module

    # -- importlib.abc.Loader ----------------------------------------------------
    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        name = module.__name__
        exec(compile(self.sources[name], _origin(name), "exec"), module.__dict__)

    def close(self) -> None:
        """Drop the modules; the import hook goes when the last interpreter closes."""
        if self._closed:
            return
        self._closed = True
        self.modules.clear()
        if getattr(_local, "modules", None) is self:
            _local.modules = None
        _hook.release()


def current_thread_modules() -> ThreadModules | None:
    """The :class:`ThreadModules` of the interpreter running the calling thread, if any."""
    return getattr(_local, "modules", None)


def registered_global(module: str, qualname: str):
    """``module.qualname`` as the calling interpreter sees it: how pickles made by
    one thread interpreter name what a registered module defines, so that another
    interpreter resolves it to its own copy."""
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class _InterpreterFinder(importlib.abc.MetaPathFinder):
    """Answers ``find_spec`` on interpreter threads: registered names, then the
    environment's extra directories.  Host threads get ``None`` (not found here)."""

    def find_spec(self, fullname, path=None, target=None):
        modules = getattr(_local, "modules", None)
        if modules is None:
            return None
        if fullname in modules.sources:
            return importlib.util.spec_from_loader(fullname, modules, origin=_origin(fullname))
        if path is None and modules.extra_paths:
            return importlib.machinery.PathFinder.find_spec(fullname, modules.extra_paths)
        return None


class _ImportHook:
    """Installs the ``_find_and_load`` hook and the finder while any
    :class:`ThreadModules` is open, and removes them after the last one closes.

    ``_find_and_load`` is what both the ``import`` statement (from C, looked up
    by name on every ``sys.modules`` miss) and ``importlib.import_module`` call;
    it has kept that name and signature since Python 3.3.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._original = None
        self._finder = _InterpreterFinder()

    def acquire(self) -> None:
        with self._lock:
            self._users += 1
            if self._users == 1:
                bootstrap = sys.modules["importlib._bootstrap"]
                original = bootstrap._find_and_load

                def _find_and_load(name, import_):
                    modules = getattr(_local, "modules", None)
                    if modules is not None and name in modules.sources:
                        return modules.module(name)
                    return original(name, import_)

                _find_and_load.__wrapped__ = original
                self._original = original
                bootstrap._find_and_load = _find_and_load
                sys.meta_path.insert(0, self._finder)

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                bootstrap = sys.modules["importlib._bootstrap"]
                if getattr(bootstrap._find_and_load, "__wrapped__", None) is self._original:
                    bootstrap._find_and_load = self._original
                self._original = None
                try:
                    sys.meta_path.remove(self._finder)
                except ValueError:
                    pass


_hook = _ImportHook()
