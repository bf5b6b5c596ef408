"""multipy: eager PyTorch models on a pool of independent Python interpreters.

The Python successor of torch::deploy: package a model with torch.package,
load it into an :class:`InterpreterManager`, and call it from many host
threads; each call runs on a free interpreter with its own GIL.

>>> from multipy import InterpreterManager                  # doctest: +SKIP
>>> with InterpreterManager(4) as manager:  # doctest: +SKIP
...     model = manager.load_package("resnet.pt").load_pickle("model", "model.pkl")
...     out = model(torch.randn(1, 3, 224, 224))
"""

from ._current import interpreter_id
from .errors import (BackendUnavailableError, CallTimeoutError, ExternModuleError,
                     InterpreterCrashedError, InterpreterError, InterpreterStartError,
                     ManagerClosedError, MultipyError, OwnershipError, PackageError,
                     TransportError)
from .runtime import (Environment, Interpreter, InterpreterManager, InterpreterSession,
                      InterpreterStatistics, ManagerStatistics, NoopEnvironment, Obj, Package,
                      PathEnvironment, ReplicatedObj)
from .shared import shared_location
from .transport.cuda import interpreter_device

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CallTimeoutError",
    "Environment",
    "ExternModuleError",
    "Interpreter",
    "InterpreterCrashedError",
    "InterpreterError",
    "InterpreterManager",
    "InterpreterSession",
    "InterpreterStartError",
    "InterpreterStatistics",
    "ManagerClosedError",
    "ManagerStatistics",
    "MultipyError",
    "NoopEnvironment",
    "Obj",
    "OwnershipError",
    "Package",
    "PackageError",
    "PathEnvironment",
    "ReplicatedObj",
    "TransportError",
    "interpreter_device",
    "interpreter_id",
    "shared_location",
]
