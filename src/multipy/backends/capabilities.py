"""What this Python can run, detected in one place.

Each backend has one function that says whether it is available and, when it
is not, why.  ``resolve_backend("auto")`` picks the best available one and
records why the others were not taken (``manager.backend_choice``).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys

from ..errors import BackendUnavailableError
from .base import Backend, BackendKind


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """Facts about this Python that decide which backends work."""

    python: str
    free_threaded: bool          # a build without the GIL, running without it
    own_gil_subinterpreters: bool
    torch: bool
    numpy: bool
    cuda: bool
    fork_server: bool

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def detect() -> Capabilities:
    """Look at this Python once (cheap; CUDA is only asked of a torch already imported)."""
    import multiprocessing

    gil_check = getattr(sys, "_is_gil_enabled", None)
    free_threaded = gil_check is not None and not gil_check()
    subinterpreters = sys.version_info >= (3, 13) and (
        importlib.util.find_spec("_interpreters") is not None)
    torch_spec = importlib.util.find_spec("torch") is not None
    torch = sys.modules.get("torch")
    cuda = bool(torch is not None and torch.cuda.is_available())
    return Capabilities(
        python=sys.version.split()[0], free_threaded=free_threaded,
        own_gil_subinterpreters=subinterpreters, torch=torch_spec,
        numpy=importlib.util.find_spec("numpy") is not None, cuda=cuda,
        fork_server="forkserver" in multiprocessing.get_all_start_methods())


def why_unavailable(kind: BackendKind, caps: Capabilities) -> str | None:
    """``None`` when ``kind`` can run here, else the reason it cannot."""
    if kind is BackendKind.PROCESS:
        if not caps.numpy:
            return ("the process backend needs numpy (its shared-memory blocks are numpy "
                    "arrays, which carry the weak references that free them); pip install numpy")
        return None  # torch-free work runs in processes too
    if kind is BackendKind.THREAD:
        return _missing_backend_module(kind)
    if kind is BackendKind.SUBINTERPRETER:
        if not caps.own_gil_subinterpreters:
            return (f"own-GIL subinterpreters need CPython 3.13+ (`_interpreters`; 3.14 also "
                    f"offers `concurrent.interpreters`); this is Python {caps.python}, and 3.12 "
                    "and older are unsupported (3.12's private `_xxsubinterpreters` cannot share "
                    "buffers or report errors the way the backend needs). Run the "
                    "subinterpreter backend under python3.13+, or use backend='process'")
        return _missing_backend_module(kind)
    return f"unknown backend {kind!r}"


def _missing_backend_module(kind: BackendKind) -> str | None:
    name = f"multipy.backends.{kind.value}"
    if importlib.util.find_spec(name) is None:
        return f"the {kind.value} backend is not part of this multipy build"
    return None


def _create(kind: BackendKind) -> Backend:
    if kind is BackendKind.PROCESS:
        from .process import ProcessBackend

        return ProcessBackend()
    module = importlib.import_module(f"multipy.backends.{kind.value}")
    return module.create_backend()





def resolve_backend(name: str) -> tuple[Backend, str]:
    """The backend called ``name`` (or the best one for ``"auto"``) and a sentence
    saying why it was chosen.  Raises :class:`BackendUnavailableError` with the
    reason when the named backend cannot run here."""
    caps = detect()
    if name == "auto":
        order = [BackendKind.THREAD] if caps.free_threaded else []
        order.append(BackendKind.PROCESS)
        reasons = []
        for kind in order:
            why = why_unavailable(kind, caps)
            if why is None:
                not_taken = "; ".join(reasons + _not_auto_reasons(kind, caps))
                return _create(kind), f"{kind.value}: chosen by auto" + (f" ({not_taken})" if not_taken else "")
            reasons.append(f"{kind.value}: {why}")
        raise BackendUnavailableError("no backend can run here: " + "; ".join(reasons))
    try:
        kind = BackendKind(name)
    except ValueError:
        raise BackendUnavailableError(
            f"unknown backend {name!r}; choose one of "
            f"{', '.join(k.value for k in BackendKind)} or 'auto'") from None
    why = why_unavailable(kind, caps)
    if why is not None:
        raise BackendUnavailableError(f"the {kind.value} backend is unavailable: {why}")
    return _create(kind), f"{kind.value}: asked for"


def _not_auto_reasons(chosen: BackendKind, caps: Capabilities) -> list[str]:
    out = []
    if chosen is not BackendKind.THREAD:
        out.append("thread: not taken, this build has a GIL so threads would not run in parallel"
                   if not caps.free_threaded else "thread: unavailable")
    out.append("subinterpreter: never chosen by auto, torch cannot load in subinterpreters")
    return out
