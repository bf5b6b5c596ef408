"""Sessions and object handles: exclusive work on one interpreter.

An :class:`InterpreterSession` pins one interpreter for a block of work; every
:class:`Obj` it hands out names an object living in that interpreter and is
valid until the session closes.  Passing an ``Obj`` to another session raises
:class:`~multipy.errors.OwnershipError` (torch::deploy's "lives in different
session" check); move objects between interpreters with ``create_movable``.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Any

from ..errors import InterpreterCrashedError, OwnershipError
from ..transport.messages import Drop, GradMode, Handle, Op

_OBJECT = int(Drop.OBJECT)

if TYPE_CHECKING:
    import concurrent.futures

    from .manager import InterpreterManager
    from .replicated import ReplicatedObj


def caller_grad_mode():
    """The calling thread's autograd mode, to be re-established in the interpreter
    (``None`` while torch is not imported in the host).

    >>> import torch
    >>> with torch.no_grad():
    ...     caller_grad_mode() == int(GradMode.NO_GRAD)
    True
    """
    modes = _MODES[0]
    if modes is None:
        torch = sys.modules.get("torch")
        if torch is None or not hasattr(torch, "is_grad_enabled"):  # not (yet) imported
            return None
        modes = _MODES[0] = (torch.is_inference_mode_enabled, torch.is_grad_enabled)
    is_inference, is_grad = modes
    # Plain ints on the wire: an enum member costs a global lookup to unpickle.
    if is_inference():
        return _INFERENCE
    if not is_grad():
        return _NO_GRAD
    return _GRAD


#: torch's two C functions that tell the mode, once torch is imported
_MODES: list = [None]
_GRAD, _NO_GRAD, _INFERENCE = int(GradMode.GRAD), int(GradMode.NO_GRAD), int(GradMode.INFERENCE)


class Obj:
    """A handle to an object inside one interpreter session.

    Call it with host values or other ``Obj`` of the same session; the result is
    another ``Obj``.  ``deref()`` brings the value to the host.

    >>> with manager.acquire_one() as s:                      # doctest: +SKIP
    ...     conv = s.global_("torch.nn", "Conv2d")(6, 2, 2, 1)
    ...     out = conv(torch.ones(1, 6, 6, 6)).deref()       # a host tensor
    """

    __slots__ = ("_session", "_id", "__weakref__")

    def __init__(self, session: "InterpreterSession", ident: int) -> None:
        self._session = session
        self._id = ident

    @property
    def session(self) -> "InterpreterSession":
        return self._session

    def __call__(self, *args: Any, **kwargs: Any) -> "Obj":
        return self._session._request_obj(Op.CALL, (self, args, kwargs, caller_grad_mode(), True))

    def submit(self, *args: Any, **kwargs: Any) -> "concurrent.futures.Future[Obj]":
        """Call without waiting: a :class:`concurrent.futures.Future` of the
        result ``Obj``.  Sent when the session's interpreter is free; cancelling
        the future before that means it is never sent, after that the call runs
        and its result is dropped.

        >>> with manager.acquire_one() as s:                      # doctest: +SKIP
        ...     f = s.global_("math", "sqrt").submit(4.0)
        ...     assert f.result().deref() == 2.0
        """
        return self._session._submit(Op.CALL, (self, args, kwargs, caller_grad_mode(), True))

    async def acall(self, *args: Any, **kwargs: Any) -> "Obj":
        """``await`` a call from asyncio; the result is an ``Obj`` as for a call.
        Cancellation as for :meth:`submit`.

        >>> root = await s.global_("math", "sqrt").acall(4.0)    # doctest: +SKIP
        """
        return await asyncio.wrap_future(self.submit(*args, **kwargs))

    def call_value(self, *args: Any, **kwargs: Any) -> Any:
        """Call and bring the result straight to the host (one round trip)."""
        return self._session._request(Op.CALL, (self, args, kwargs, caller_grad_mode(), False))

    def attr(self, name: str, /) -> "Obj":
        """``getattr`` inside the interpreter, as an ``Obj``."""
        return self._session._request_obj(Op.ATTR, (self, name))

    def hasattr(self, name: str, /) -> bool:
        """``hasattr`` inside the interpreter."""
        return self._session._request(Op.HASATTR, (self, name))

    def deref(self) -> Any:
        """The object's value in the host (tensors arrive through shared memory)."""
        return self._session._request(Op.DEREF, (self,))

    def __repr__(self) -> str:
        return f"<Obj {self._id} in interpreter {self._session.interpreter_index}>"


class InterpreterSession:
    """Exclusive use of one interpreter for a block of work (a context manager).

    >>> with manager.acquire_one() as s:                        # doctest: +SKIP
    ...     add1 = s.global_("foomodule", "add1")
    ...     assert add1(2).deref() == 3
    """

    def __init__(self, manager: "InterpreterManager", index: int, *, balanced: bool) -> None:
        self._manager = manager
        self._worker = manager._workers[index]
        self._index = index
        self._balanced = balanced
        self._generation: int | None = None  # the interpreter's generation its handles live in
        self._owned: list[int] = []
        self._closed = False
        self.self: Obj | None = None
        self._keep: list = []  # packages and replicated objects its handles come from

    @property
    def interpreter_index(self) -> int:
        return self._index

    # -- requests ---------------------------------------------------------
    def _handle_of(self, obj: Obj) -> int:
        if obj._session is not self:
            raise OwnershipError(
                f"{obj!r} lives in a different session (interpreter {obj._session._index}) "
                f"than the one it was used in (interpreter {self._index}); use "
                "create_movable()/from_movable() to move objects between interpreters")
        self._check_live()
        return obj._id

    def _check_live(self) -> None:
        if self._closed:
            raise OwnershipError("this session is closed; its Obj handles are no longer valid")
        generation = self._generation
        if generation is not None and (self._worker.generation != generation
                                       or self._worker.dead_reason is not None):
            reason = self._worker.dead_reason or "it crashed or timed out and was restarted"
            raise InterpreterCrashedError(
                f"interpreter {self._index} went down after this session began ({reason}); "
                "the session's Obj handles died with it. Start a new session.",
                index=self._index, pid=self._worker.pid)

    def _request(self, op: Op, args: tuple, *, timeout: float | None = None,
                 materializes: int | None = None, recipe: tuple | None = None) -> Any:
        self._check_live()
        worker = self._worker
        value = worker.request(op, args, timeout=timeout or self._manager._call_timeout,
                               handles=(Obj, self._handle_of), materializes=materializes,
                               recipe=recipe, resend=self._generation is None)
        if self._generation is None:
            self._generation = worker.generation
        return value

    def _submit(self, op: Op, args: tuple) -> "concurrent.futures.Future[Obj]":
        """Post a request returning an ``Obj`` to this session's interpreter."""
        from .dispatch import Request

        self._check_live()
        first = self._generation is None
        worker = self._worker

        def adopt(handle: Handle) -> Obj:  # on the completion thread
            if self._generation is None:
                self._generation = worker.generation
            self._owned.append(handle.id)
            return Obj(self, handle.id)

        request = Request(op, args, timeout=self._manager._call_timeout,
                          handles=(Obj, self._handle_of), index=self._index, resend=first,
                          convert=adopt)
        return self._manager._dispatcher.submit(request)

    def _request_obj(self, op: Op, args: tuple, materializes: int | None = None,
                     recipe: tuple | None = None) -> Obj:
        handle: Handle = self._request(op, args, materializes=materializes, recipe=recipe)
        self._owned.append(handle.id)
        return Obj(self, handle.id)

    # -- the deploy API ---------------------------------------------------
    def global_(self, module: str, name: str, /) -> Obj:
        """``from module import name`` inside the interpreter.

        >>> s.global_("torch", "ones")(2).deref()               # doctest: +SKIP
        tensor([1., 1.])
        """
        if not isinstance(module, str) or not isinstance(name, str):
            raise TypeError(f"global_(module, name) takes two str, a module and a name in it "
                            f"(e.g. global_('torch.nn', 'Linear')), got {module!r}, {name!r}")
        return self._request_obj(Op.GLOBAL, (module, name))

    def from_movable(self, replicated: "ReplicatedObj", /) -> Obj:
        """This interpreter's copy of a replicated object (loaded on first use).

        >>> model_here = s.from_movable(model)                  # doctest: +SKIP
        """
        from .replicated import ReplicatedObj

        if not isinstance(replicated, ReplicatedObj):
            hint = (" (an Obj is already a handle in its own session: pass it directly there, "
                    "or make it a ReplicatedObj with create_movable)" if isinstance(replicated, Obj)
                    else "")
            raise TypeError(f"from_movable takes a ReplicatedObj (from Package.load_pickle or "
                            f"create_movable), got {type(replicated).__name__}{hint}")
        if replicated._manager is not self._manager:
            raise ValueError(f"{replicated!r} belongs to another InterpreterManager; load it "
                             "in this one (load_package(...).load_pickle) to use it here")
        self._keep.append(replicated)  # its package stays open while the handle is valid
        return self._request_obj(Op.REPLICATED_HANDLE, (replicated._id,),
                                 materializes=replicated._id, recipe=replicated._recipe)

    def create_movable(self, obj: Obj, /) -> "ReplicatedObj":
        """Pickle ``obj`` out of this session as a :class:`ReplicatedObj`
        (tensors shared, not copied, by every interpreter that loads it)."""
        return self._manager.create_movable(obj, self)

    def is_owner(self, obj: Obj, /) -> bool:
        """True when ``obj`` belongs to this session."""
        return isinstance(obj, Obj) and obj._session is self

    def exec_(self, source: str, /) -> Any:
        """Run ``source`` in the interpreter; returns its global ``result`` (for tools and tests)."""
        return self._request(Op.EXEC, (source,))

    # -- lifetime -------------------------------------------------------------
    def close(self) -> None:
        """Release the session's objects and the interpreter.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._worker.generation == self._generation and self._worker.dead_reason is None:
            for ident in self._owned:
                self._worker.drop((_OBJECT, ident))
        self._owned = []
        self._keep = []
        if self._balanced:
            self._manager._balancer.release(self._index)

    def __enter__(self) -> "InterpreterSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
