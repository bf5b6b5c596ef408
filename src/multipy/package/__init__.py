"""Helpers for ``torch.package`` archives: list their contents, write them.

Importing this package does not import ``torch``: :func:`inspect_package`
reads archives with the stdlib only, and :func:`save_package` (which needs
torch) is loaded on first use.

Example:
    >>> from multipy.package import inspect_package
    >>> inspect_package("out/simple.pt").pickles          # doctest: +SKIP
    ('model/example.pkl', 'model/model.pkl')
"""

from typing import TYPE_CHECKING, Any

from .inspect import PackageContents, format_contents, inspect_package

if TYPE_CHECKING:
    from .export import save_package
    from .plan import PackagePlan, format_plan, plan_package

__all__ = ["PackageContents", "PackagePlan", "format_contents", "format_plan", "inspect_package",
           "plan_package", "save_package"]


def __getattr__(name: str) -> Any:
    if name == "save_package":
        from .export import save_package

        return save_package
    if name in ("PackagePlan", "format_plan", "plan_package"):
        from . import plan

        return getattr(plan, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
