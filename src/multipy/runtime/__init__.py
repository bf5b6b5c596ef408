"""The torch::deploy host API: managers, packages, sessions and object handles."""

from .environment import Environment, NoopEnvironment, PathEnvironment
from .manager import Interpreter, InterpreterManager
from .package import Package
from .replicated import ReplicatedObj
from .session import InterpreterSession, Obj
from .stats import InterpreterStatistics, ManagerStatistics

__all__ = [
    "Environment",
    "Interpreter",
    "InterpreterManager",
    "InterpreterSession",
    "InterpreterStatistics",
    "ManagerStatistics",
    "NoopEnvironment",
    "Obj",
    "Package",
    "PathEnvironment",
    "ReplicatedObj",
]
