"""The exceptions multipy raises, in one small hierarchy.

Every class here subclasses :class:`MultipyError`; where a stdlib type already
means the same thing, the class subclasses that too, so existing ``except``
clauses keep working (``CallTimeoutError`` is a ``TimeoutError``,
``ExternModuleError`` is a ``ModuleNotFoundError``).

How the types differ from their neighbours:

* :class:`InterpreterError` -- *your code* raised inside an interpreter and the
  exception's own type could not be rebuilt in the host.  When the type can be
  rebuilt, multipy raises that type instead, with the interpreter-side traceback
  attached as ``__cause__`` (a :class:`RemoteTraceback`).
* :class:`InterpreterCrashedError` -- the interpreter *itself* died (segfault,
  ``os._exit``, OOM kill) while running or holding your call; nothing in your
  code raised.  The interpreter is restarted.
* :class:`CallTimeoutError` -- the call ran past its timeout; multipy killed and
  restarted the interpreter.  Closed by multipy, not broken by the model.
* :class:`ManagerClosedError` -- closed by *your* code: the manager was closed
  before or during the call.
* :class:`InterpreterStartError` -- the interpreter could not start at all (an
  import error in the environment, a missing executable).
* :class:`TransportError` -- a value could not cross the boundary (a result that
  cannot be pickled, a malformed message); names the type and where it was found.
* :class:`OwnershipError` -- an ``Obj`` was used in a session it does not belong
  to; torch::deploy's "lives in different session" check.
* :class:`BackendUnavailableError` -- asked for a backend this Python cannot run.
"""

from __future__ import annotations

__all__ = [
    "MultipyError",
    "InterpreterError",
    "InterpreterCrashedError",
    "InterpreterStartError",
    "CallTimeoutError",
    "ManagerClosedError",
    "TransportError",
    "OwnershipError",
    "BackendUnavailableError",
    "ExternModuleError",
    "PackageError",
    "RemoteTraceback",
]


class MultipyError(Exception):
    """Base class of every error multipy raises itself."""


class RemoteTraceback(Exception):
    """Carries the interpreter-side traceback text; set as ``__cause__``.

    Printing the host exception shows this text first, so the failing source
    line inside the interpreter is visible in the host's traceback.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class InterpreterError(MultipyError):
    """An exception raised by code inside an interpreter whose type could not be
    rebuilt in the host (for example a class defined only inside a package), or a
    ``SystemExit``/``KeyboardInterrupt``/``GeneratorExit`` raised there (as itself it
    would end the host program or pass for the host's own Ctrl-C).

    ``type_name`` is the qualified name of the original type and ``remote_traceback``
    the interpreter-side traceback text.

    >>> InterpreterError("pkg.Oops", "boom", "Traceback ...").type_name
    'pkg.Oops'
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self):
        return (type(self), (self.type_name, self.message, self.remote_traceback))


class InterpreterCrashedError(MultipyError):
    """The interpreter process died while your call was running or queued on it.

    Unlike :class:`InterpreterError`, nothing in your code raised: the process
    was killed by a signal or exited.  The message names the interpreter, its pid,
    the exit code or signal (``SIGSEGV(-11)``) and the likely cause.  Only the
    calls on that interpreter fail; it is restarted for later calls.
    """

    def __init__(self, message: str, *, index: int = -1, pid: int | None = None,
                 exitcode: int | None = None) -> None:
        super().__init__(message)
        self.index = index
        self.pid = pid
        self.exitcode = exitcode

    def __reduce__(self):
        return (_rebuild_crashed, (str(self), self.index, self.pid, self.exitcode))


def _rebuild_crashed(message, index, pid, exitcode):
    return InterpreterCrashedError(message, index=index, pid=pid, exitcode=exitcode)


class InterpreterStartError(MultipyError):
    """An interpreter failed to start (for example an import error in its
    environment).  Unlike a crash, it never served a call; after repeated
    failures multipy stops restarting it and fails calls with this reason."""


class CallTimeoutError(MultipyError, TimeoutError):
    """A call ran past its ``timeout``; its interpreter was killed and restarted.

    A :class:`TimeoutError`, so ``except TimeoutError`` catches it.
    """


class ManagerClosedError(MultipyError, RuntimeError):
    """The manager was closed (by your code) before or while the call ran."""


class TransportError(MultipyError, TypeError):
    """A value could not cross between the host and an interpreter.

    The message names the offending type and where in the structure it was found
    (``result[1]['mask']``).  Unlike :class:`InterpreterError` this is about
    *moving* a value, not about the code that produced it.
    """


class OwnershipError(MultipyError, ValueError):
    """An ``Obj`` was passed to a session that does not own it.

    An ``Obj`` lives in one interpreter session; move objects between
    interpreters with ``create_movable`` / ``from_movable`` instead.
    """


class BackendUnavailableError(MultipyError, RuntimeError):
    """The requested backend cannot run on this Python; the message says why."""


class PackageError(MultipyError, ValueError):
    """A package archive is not a zip file, is damaged, or lacks a resource.

    A path that does not exist raises the standard ``FileNotFoundError``
    (naming the path) instead, so existing ``except OSError`` clauses work.
    """


class ExternModuleError(MultipyError, ModuleNotFoundError):
    """A package needs an ``extern`` module that the interpreter's environment
    lacks.  The message names the module and the paths that were searched."""
