"""Helper types that must be importable by one module name in the host and in
every interpreter (interpreters inherit the host's ``sys.path``, which holds
this directory): namedtuple and dataclass values cross by reference to their
class, so both sides must find the same class."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

Point = collections.namedtuple("Point", ["x", "y"])


@dataclasses.dataclass
class Pair:
    first: Any
    second: Any


def raise_value_error(message):
    raise ValueError(message)  # the line a remote traceback must show
