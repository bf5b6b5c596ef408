"""The object table and the operations of the worker protocol.

One :class:`InterpreterState` lives in each interpreter.  A backend's worker
loop decodes a :class:`~multipy.transport.messages.Request`, calls
:meth:`InterpreterState.handle`, and encodes what it returns (or the exception
it raised).  Nothing here knows how the request arrived.

Objects the host holds handles to live in ``objects`` (id -> object).
Replicated objects live in ``replicated`` (replicated id -> object) and are
materialized on first use from their recipe: a package pickle or a movable.
"""

from __future__ import annotations

import sys
import threading
import traceback
from typing import Any

from ..errors import ExternModuleError, MultipyError, PackageError
from ..transport.messages import Drop, GradMode, Handle, MovablePayload, Op, Recipe, RemoteException
from .modules import SourceFinder

_local = threading.local()
_process_state: "InterpreterState | None" = None


def current_state() -> "InterpreterState":
    state = getattr(_local, "state", None) or _process_state
    if state is None:
        raise RuntimeError("not running inside a multipy interpreter")
    return state


class InterpreterState:
    """Everything one interpreter holds on behalf of the host."""

    def __init__(self, index: int, *, finder: SourceFinder | None = None,
                 importer_factory=None, movables=None) -> None:
        """``finder`` keeps the registered modules (default: a :class:`SourceFinder`
        installed in this process); ``importer_factory(path)`` opens a package
        (default: :func:`~multipy.interp.packages.open_package`); ``movables`` is
        ``(make, load)`` for create_movable/from_movable (default: pickles with
        tensors in a shared segment, :mod:`~multipy.interp.movable`).  In-process
        backends pass their own, so that interpreters sharing a process stay
        isolated from one another and share tensors by reference."""
        self.index = index
        self.objects: dict[int, Any] = {}
        self._next = 1
        self.replicated: dict[int, Any] = {}
        self.importers: dict[int, Any] = {}
        self.prefixes: dict[str, int] = {}
        self.finder = finder if finder is not None else SourceFinder().install()
        self.open_segments: list = []
        self._importer_factory = importer_factory
        self._movables = movables
        self._ops = {
            Op.PING: self._ping,
            Op.REGISTER_MODULE: self._register_module,
            Op.PACKAGE_IMPORTER: self._package_importer,
            Op.LOAD_PICKLE: self._load_pickle,
            Op.GLOBAL: self._global,
            Op.CALL: self._call,
            Op.ATTR: self._attr,
            Op.HASATTR: self._hasattr,
            Op.DEREF: self._deref,
            Op.MAKE_MOVABLE: self._make_movable,
            Op.MATERIALIZE: self._ensure_replicated,
            Op.REPLICATED_HANDLE: self._replicated_handle,
            Op.UNLOAD: self._unload,
            Op.CALL_REPLICATED: self._call_replicated,
            Op.HASATTR_REPLICATED: self._hasattr_replicated,
            Op.EXEC: self._exec,
            Op.IMPORT: self._import,
        }

    def activate_for_process(self) -> None:
        global _process_state
        _process_state = self

    def activate_for_thread(self) -> None:
        """Make this the calling thread's interpreter (object table and registered modules)."""
        _local.state = self
        self.finder.activate_for_thread()

    def close(self) -> None:
        """Drop every object this interpreter holds (in-process backends)."""
        self.objects.clear()
        self.replicated.clear()
        for package_id in list(self.importers):
            self._forget_package(package_id)
        self.prefixes.clear()
        self.close_adopted_segments()
        self.finder.close()

    # -- the dispatcher ---------------------------------------------------

    def handle(self, op: Op, args: tuple, drop: tuple = ()) -> Any:
        for item in drop:
            self._drop(item)
        return self._ops[op](*args)

    def release(self, drop: tuple) -> None:
        """Apply the host's releases of a request that cannot be handled."""
        for item in drop:
            self._drop(item)

    def _drop(self, item) -> None:
        kind, ident = item
        if kind == Drop.OBJECT:
            self.objects.pop(ident, None)
        elif kind == Drop.PACKAGE:
            self._forget_package(ident)
        else:
            self.replicated.pop(ident, None)

    def _forget_package(self, package_id: int) -> None:
        """The host dropped its last handle on a package: release its importer (the
        objects loaded from it keep what they use; a later load opens it again)."""
        from .packages import release_importer

        importer = self.importers.pop(package_id, None)
        if importer is None:
            return
        for prefix, pid in list(self.prefixes.items()):
            if pid == package_id:
                del self.prefixes[prefix]
        release_importer(importer)

    def _store(self, obj: Any) -> Handle:
        ident = self._next
        self._next += 1
        self.objects[ident] = obj
        return Handle(ident)

    def resolve(self, value: Any) -> Any:
        """Replace :class:`Handle` arguments by the objects they name."""
        kind = type(value)
        if kind is Handle:
            return self.objects[value.id]
        # `Handle in map(type, ...)` looks without a Python frame per item.
        if kind is tuple and Handle in map(type, value):
            return tuple(self.resolve(v) for v in value)
        if kind is dict and Handle in map(type, value.values()):
            return {k: self.resolve(v) for k, v in value.items()}
        if kind is list and Handle in map(type, value):
            return [self.resolve(v) for v in value]
        return value

    # -- operations -------------------------------------------------------

    def _ping(self) -> int:
        return self.index

    def _register_module(self, name: str, source: str) -> None:
        self.finder.register(name, source)

    def package_importer_by_id(self, package_id: int):
        importer = self.importers.get(package_id)
        if importer is None:
            raise PackageError(f"package {package_id} was never opened in interpreter {self.index}")
        return importer

    def _importer(self, package_id: int, path: str):
        importer = self.importers.get(package_id)
        if importer is None:
            from .packages import open_package

            importer = (self._importer_factory or open_package)(path)
            self.importers[package_id] = importer
            self.prefixes[importer._mangler.parent_name()] = package_id
        return importer

    def _package_importer(self, package_id: int, path: str) -> Handle:
        return self._store(self._importer(package_id, path))

    def _load_from_package(self, package_id: int, path: str, package: str, resource: str,
                           map_location=None, storages=None):
        from .packages import check_resource, preloaded_storages

        importer = self._importer(package_id, path)
        check_resource(importer, package, resource)
        try:
            with preloaded_storages(importer, storages):
                return importer.load_pickle(package, resource, map_location=map_location)
        except Exception as exc:
            if not _raised_by_the_unpickler(exc):
                raise  # the package's own code raised (or a module is missing): its error
            name = f"{package.replace('.', '/')}/{resource}"
            raise PackageError(
                f"resource {name!r} of package {path!r} could not be unpickled "
                f"({type(exc).__name__}: {exc}). It is damaged or not a pickle: read text "
                "resources with load_text and other bytes with load_binary.") from exc

    def _load_pickle(self, package_id: int, path: str, package: str, resource: str) -> Handle:
        return self._store(self._load_from_package(package_id, path, package, resource))

    def _global(self, module: str, name: str) -> Handle:
        import importlib

        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        return self._store(obj)

    def _call(self, target, args, kwargs, grad_mode, want_handle: bool):
        result = self._invoke(self.resolve(target), args, kwargs, grad_mode)
        return self._store(result) if want_handle else result

    def _invoke(self, fn, args, kwargs, grad_mode):
        """``fn(*args, **kwargs)`` with handles resolved, under the caller's
        autograd mode (see :func:`_run`)."""
        if type(args) is not tuple or Handle in map(type, args):  # resolve, when it has work
            args = self.resolve(args)
        if kwargs:
            kwargs = self.resolve(kwargs)
        return _run(fn, args, kwargs, grad_mode)

    def call_plain(self, rid: int, method: str | None, args: tuple, grad_mode) -> Any:
        """The common call of a replicated object that is loaded here, with
        positional arguments that hold no handles (``codec.FAST_CALL``):
        ``obj(*args)`` or ``obj.method(*args)`` under the caller's autograd mode.

        >>> state = InterpreterState(0)
        >>> state.replicated[1] = abs
        >>> state.call_plain(1, None, (-3,), None)
        3
        """
        obj = self.replicated.get(rid)
        if obj is None:
            obj = self._replicated(rid, None)  # says why it is not here
        return _run(obj if method is None else getattr(obj, method), args, _NO_KWARGS, grad_mode)

    def _attr(self, target, name: str) -> Handle:
        return self._store(getattr(self.resolve(target), name))

    def _hasattr(self, target, name: str) -> bool:
        return hasattr(self.resolve(target), name)

    def _deref(self, target) -> Any:
        return self.resolve(target)

    def _movable_functions(self):
        """``(make, load)`` for movables: the backend's, else the shared-segment
        pickles of :mod:`~multipy.interp.movable` (imported on first use)."""
        if self._movables is None:
            from .movable import load_movable, make_movable

            self._movables = (make_movable, load_movable)
        return self._movables

    def _make_movable(self, target) -> tuple[MovablePayload, tuple]:
        make, _ = self._movable_functions()
        payload, segment, used = make(self.resolve(target), self.prefixes)
        if segment is not None:
            self.open_segments.append(segment)  # closed once the host has adopted it
        return payload, used

    def close_adopted_segments(self) -> None:
        while self.open_segments:
            self.open_segments.pop().close()

    def _materialize(self, rid: int, recipe) -> None:
        if rid in self.replicated:
            return
        kind = recipe[0]
        if kind == Recipe.PICKLE:
            _, package_id, path, package, resource, map_location, storages = recipe
            obj = self._load_from_package(package_id, path, package, resource,
                                          map_location, storages)
        elif kind == Recipe.MOVABLE:
            for package_id, path in recipe[2]:
                self._importer(package_id, path)
            _, load = self._movable_functions()
            obj = load(recipe[1])
        else:
            raise ValueError(f"unknown recipe kind {kind!r}")
        self.replicated[rid] = obj

    def _replicated(self, rid: int, recipe):
        obj = self.replicated.get(rid)
        if obj is None:
            if recipe is None:
                raise LookupError(f"replicated object {rid} is not loaded in interpreter {self.index}")
            self._materialize(rid, recipe)
            obj = self.replicated[rid]
        return obj

    def _ensure_replicated(self, rid: int, recipe) -> None:
        self._replicated(rid, recipe)

    def _replicated_handle(self, rid: int, recipe) -> Handle:
        return self._store(self._replicated(rid, recipe))

    def _unload(self, rid: int) -> None:
        self.replicated.pop(rid, None)

    def _call_replicated(self, rid, method, args, kwargs, grad_mode, recipe):
        obj = self.replicated.get(rid)
        if obj is None:
            obj = self._replicated(rid, recipe)
        return self._invoke(obj if method is None else getattr(obj, method), args, kwargs,
                            grad_mode)

    def _hasattr_replicated(self, rid, name, recipe) -> bool:
        return hasattr(self._replicated(rid, recipe), name)

    def _import(self, module: str) -> None:
        import importlib

        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ExternModuleError(
                f"interpreter {self.index} cannot import {module!r} ({type(exc).__name__}: {exc}); "
                f"searched sys.path = {sys.path}. Install it into the environment given to "
                "InterpreterManager, or drop it from preload=.") from exc

    def _exec(self, source: str) -> Any:
        namespace: dict[str, Any] = {"__name__": "__multipy_exec__"}
        exec(compile(source, "<multipy exec>", "exec"), namespace)
        return namespace.get("result")


_GRAD, _NO_GRAD, _INFERENCE = int(GradMode.GRAD), int(GradMode.NO_GRAD), int(GradMode.INFERENCE)


_TORCH_CUDA: list = [None]  # torch.cuda once torch is imported here
_TORCH: list = [None]       # _TorchCalls once torch is imported here
_NO_KWARGS: dict = {}
_ABSENT = object()


class _TorchCalls:
    """What a call needs of torch, looked up once torch is imported in this
    interpreter: the autograd mode switches (C functions, not the context
    managers of ``torch.autograd.grad_mode``, which cost several µs a call), and
    what ``nn.Module.__call__`` decides on (see :func:`_direct_forward`)."""

    def __init__(self, torch) -> None:
        c = torch._C
        self.is_inference = c.is_inference_mode_enabled
        self.is_grad = c.is_grad_enabled
        self.set_grad = c._set_grad_enabled
        self.inference_mode = c._InferenceMode
        self.tracing = c._get_tracing_state
        from torch.nn.modules import module

        self.hooks = module  # its global hook dicts, read on every call (never cached)
        self.module_call = module.Module.__call__
        self.call_impl = module.Module._call_impl
        #: the extension's run_call (the same decisions in C), unless MULTIPY_NATIVE=0
        self.run = None
        from ..transport.channel import _native_module

        if _native_module is not None and hasattr(_native_module, "run_call"):
            _native_module.call_setup(self.is_inference, self.is_grad, self.set_grad,
                                      self.inference_mode, self.tracing, module,
                                      self.module_call, self.call_impl)
            self.run = _native_module.run_call


def _run(fn, args: tuple, kwargs: dict, grad_mode):
    """``fn(*args, **kwargs)`` under the caller's autograd mode, on this
    interpreter's CUDA stream once CUDA is in use.

    An ``nn.Module`` whose call would only call its ``forward`` has ``forward``
    called directly (:func:`_direct_forward`; ``multipy._native.run_call`` makes
    the same decisions in C where the extension is loaded).  The autograd mode is switched
    only when the thread is not in the caller's mode already, with torch's C
    switches, and put back after the call, as ``torch.no_grad()``,
    ``torch.enable_grad()`` and ``torch.inference_mode()`` would.

    >>> _run(abs, (-2,), {}, None)
    2
    """
    # Whether CUDA may be initialised here: no Python call into torch until it is
    # (_use_own_stream then checks for real).
    tc = _TORCH_CUDA[0] or _torch_cuda()
    cuda = tc is not None and tc._initialized
    if cuda:
        _use_own_stream()
    calls = _TORCH[0]
    if calls is None:
        result = fn(*args, **kwargs)
    elif calls.run is not None:  # the extension's: the same steps, in C
        result = calls.run(fn, args, kwargs, grad_mode)
    else:
        if type(fn).__call__ is calls.module_call:
            fn = _direct_forward(fn, calls)
        if grad_mode is None:
            result = fn(*args, **kwargs)
        elif calls.is_inference():
            if grad_mode == _INFERENCE:
                result = fn(*args, **kwargs)
            else:  # as torch.no_grad() / torch.enable_grad() inside inference mode
                result = _with_grad(calls, grad_mode == _GRAD, fn, args, kwargs)
        elif grad_mode == _INFERENCE:
            with calls.inference_mode(True):  # what torch.inference_mode() enters
                result = fn(*args, **kwargs)
        elif calls.is_grad() != (grad_mode == _GRAD):
            result = _with_grad(calls, grad_mode == _GRAD, fn, args, kwargs)
        else:
            result = fn(*args, **kwargs)
    tc = tc or _torch_cuda()  # the call may have imported torch, or first touched CUDA
    if cuda or (tc is not None and tc._initialized):
        _use_own_stream()
    return result


def _with_grad(calls: _TorchCalls, enabled: bool, fn, args: tuple, kwargs: dict):
    """``fn(*args, **kwargs)`` with gradients ``enabled`` or not, the previous
    setting restored after (``torch.no_grad()`` / ``torch.enable_grad()``)."""
    before = calls.is_grad()
    calls.set_grad(enabled)
    try:
        return fn(*args, **kwargs)
    finally:
        calls.set_grad(before)


def _direct_forward(module, calls: _TorchCalls):
    """``module.forward`` when calling ``module`` would call only that, else ``module``.

    Mirrors ``nn.Module._wrapped_call_impl`` and ``_call_impl`` (torch 2.13)
    exactly: ``module(...)`` is ``forward(...)`` when the module is not compiled
    (``_compiled_call_impl``), ``_call_impl`` is torch's own, no trace is being
    recorded, and none of the module's four hook dicts and none of torch's four
    global hook dicts holds a hook.  Read on every call: a hook added later runs.
    (The caller checked that ``type(module).__call__`` is ``nn.Module.__call__``.)

    >>> import torch
    >>> m = torch.nn.Identity()
    >>> _direct_forward(m, _TorchCalls(torch)) == m.forward
    True
    >>> h = m.register_forward_hook(lambda *a: None)
    >>> _direct_forward(m, _TorchCalls(torch)) is m
    True
    """
    d = module.__dict__
    compiled = d.get("_compiled_call_impl", _ABSENT)
    if compiled is _ABSENT:
        compiled = type(module)._compiled_call_impl
    if compiled is not None or "_call_impl" in d or type(module)._call_impl is not calls.call_impl:
        return module
    hooks = calls.hooks
    try:
        if (d["_forward_pre_hooks"] or d["_forward_hooks"] or d["_backward_pre_hooks"]
                or d["_backward_hooks"] or hooks._global_forward_pre_hooks
                or hooks._global_forward_hooks or hooks._global_backward_pre_hooks
                or hooks._global_backward_hooks or calls.tracing()):
            return module
    except KeyError:  # a module without nn.Module's own attributes: let it say so
        return module
    return module.forward


def _torch_cuda():
    """torch.cuda once torch is imported here (``None`` before); binds :class:`_TorchCalls`."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "nn"):  # imported, not half way
        try:
            _TORCH[0] = _TorchCalls(torch)
        except (AttributeError, ImportError):
            return None  # not the torch this was written for: looked up again next call
        cuda = getattr(torch, "cuda", None)
        # torch.cuda._initialized says whether CUDA may be in use; a torch without
        # it is asked every call (_use_own_stream checks for real).
        _TORCH_CUDA[0] = (cuda if cuda is None or hasattr(cuda, "_initialized")
                          else _ASK_EVERY_CALL)
    return _TORCH_CUDA[0]


class _ASK_EVERY_CALL:  # noqa: N801 -- a stand-in for torch.cuda without _initialized
    _initialized = True


def _use_own_stream() -> None:
    """Once CUDA is in use in this interpreter, run on a stream of its own."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        from ..transport.cuda import ensure_stream

        ensure_stream()


def _raised_by_the_unpickler(exc: BaseException) -> bool:
    """True when the bytes of a pickle are bad (the unpickler or torch.package's
    loader raised), False when code the pickle called raised (a ``__setstate__``
    or a function of the package: its own exception is the one to see)."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError):
        return True
    if isinstance(exc, (ImportError, MultipyError)):
        return False  # already names what is missing
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    filename = tb.tb_frame.f_code.co_filename
    return filename == pickle.__file__ or "/torch/package/" in filename  # its pure-Python unpickler


def capture_exception(exc: BaseException) -> RemoteException:
    """Turn ``exc`` into a record that always crosses to the host."""
    import pickle

    kind = type(exc)
    type_name = f"{kind.__module__}.{kind.__qualname__}"
    tb = "".join(traceback.format_exception(kind, exc, exc.__traceback__))
    try:
        pickled = pickle.dumps(exc, protocol=5)
        pickle.loads(pickled)  # a type that pickles but cannot be rebuilt is useless
    except Exception:
        pickled = None
    return RemoteException(type_name, str(exc), tb, pickled)
