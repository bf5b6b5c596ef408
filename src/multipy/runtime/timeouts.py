"""Checking the timeouts a user gives (``call_timeout=``, ``with_timeout(t)``).

A timeout is a positive number of seconds; ``None`` and ``float("inf")`` mean
no timeout, and so does one past :data:`LONGEST` (about 146 years: a deadline,
now plus the timeout, must fit the clocks' 64-bit nanosecond counts).  Anything else is refused where it is given, with the parameter's
name, before any request is written: a bad value found after the write would
leave a reply behind (see ``docs/failure-model.md``).
"""

from __future__ import annotations

import math
import numbers
import threading


#: The longest timeout kept (seconds); a longer one is no timeout.  Half of what a
#: wait takes at most (``threading.TIMEOUT_MAX``, 2**63 ns), so that a deadline
#: (``time.monotonic()`` plus the timeout) fits it too.
LONGEST = threading.TIMEOUT_MAX / 2


def check_timeout(value, name: str, /) -> float | None:
    """``value`` as seconds, or ``None`` for no timeout.

    >>> check_timeout(0.5, "call_timeout"), check_timeout(float("inf"), "call_timeout")
    (0.5, None)
    >>> check_timeout(1e10, "call_timeout")   # past LONGEST: none
    >>> check_timeout(0, "call_timeout")
    Traceback (most recent call last):
    ...
    ValueError: call_timeout must be a positive number of seconds (or None for no timeout), got 0
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds (int or float) or None for no "
                        f"timeout, got {value!r} ({type(value).__name__})")
    seconds = float(value)
    if math.isnan(seconds) or seconds <= 0:
        raise ValueError(f"{name} must be a positive number of seconds (or None for no "
                         f"timeout), got {value!r}")
    return None if seconds > LONGEST else seconds


#: What ``with_timeout(None)`` / ``with_timeout(inf)`` pass on: no timeout, even
#: when the manager has a ``call_timeout``.
NO_TIMEOUT = math.inf


def effective(timeout: float | None, default: float | None, /) -> float | None:
    """The timeout a call runs under: its own (``NO_TIMEOUT``: none) or ``default``."""
    if timeout is None:
        return default
    return None if timeout == NO_TIMEOUT else timeout
