"""Helpers that must be importable by one module name in the host and in every
interpreter (interpreters inherit the host's ``sys.path``, which holds this
directory).

namedtuple and dataclass values cross by reference to their class, so both
sides must find the same class; functions here can be made movable
(``create_movable``) on every backend, since they pickle by module name.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

Point = collections.namedtuple("Point", ["x", "y"])


@dataclasses.dataclass
class Pair:
    first: Any
    second: Any


def ident(*args, **kwargs):
    """Return the arguments as received: ``(args, kwargs)``."""
    return args, kwargs


def grad_mode():
    """The autograd mode the call runs under: ``(grad enabled, inference mode)``."""
    import torch

    return torch.is_grad_enabled(), torch.is_inference_mode_enabled()


def make_lambda():
    """A result that cannot cross back to the host."""
    return lambda: 0


def raise_value_error(message):
    raise ValueError(message)  # the line a remote traceback must show
