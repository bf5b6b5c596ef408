"""The benchmark's errors (torch-free, so the CLI can catch them before importing torch)."""

from __future__ import annotations

__all__ = ["BenchError", "TargetError"]


class TargetError(ValueError):
    """A benchmark target that names no archive and no example, or lacks example inputs.

    Raised before anything is measured; the message says how to make a usable archive.
    """


class BenchError(RuntimeError):
    """A row that could not be measured: the model raised, a backend cannot run...

    Unlike :class:`~multipy.bench.strategies.Skipped` (a strategy that does not
    apply to a target, noted and passed over), this stops the sweep; the
    original exception is its ``__cause__``.
    """
