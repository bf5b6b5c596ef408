"""What packaging an object would do: every module it needs, and why.

torch.package follows the pickled object's classes to their modules, and each
interned module's imports to theirs, building a dependency graph.  Every module
in it gets an action: **intern** (its source is copied into the archive),
**extern** (imported from the interpreter's environment), **mock** (a stub), or
none, which is an error.  :func:`plan_package` runs that exporter into memory
and reports the graph: the action of each module, the pattern (or rule) that
chose it, and which module or pickle needed it.  Nothing is written.

Example:
    >>> import torch
    >>> plan = plan_package(torch.nn.Linear(2, 2))
    >>> plan.ok, [m.name for m in plan.modules if m.action == "extern"][:2]
    (True, ['builtins', 'collections'])
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections.abc import Iterable
from typing import Any

__all__ = ["ModulePlan", "PackagePlan", "format_plan", "plan_package"]

_ALWAYS = "torch and the standard library are always externed"


@dataclasses.dataclass(frozen=True)
class ModulePlan:
    """One module of the dependency graph: ``action`` is ``"intern"``,
    ``"extern"``, ``"mock"`` or ``"unmatched"`` (no pattern took it: an error)."""

    name: str
    action: str
    why: str
    needed_by: str | None


@dataclasses.dataclass(frozen=True)
class PackagePlan:
    """Every module an archive of the object needs, sorted by action and name."""

    modules: tuple[ModulePlan, ...]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Whether the archive can be written as planned."""
        return not self.problems


def _patterns(value: str | Iterable[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def plan_package(obj: Any, *, intern: str | Iterable[str] = (), extern: str | Iterable[str] = (),
                 mock: str | Iterable[str] = (), package: str = "model",
                 resource: str = "model.pkl") -> PackagePlan:
    """Export ``obj`` into memory with these patterns and report what each module
    would become (see the module docstring)."""
    from torch.package import PackageExporter, PackagingError

    given = {"intern": _patterns(intern), "extern": _patterns(extern), "mock": _patterns(mock)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
        exporter = PackageExporter(io.BytesIO())
        for action, patterns in given.items():
            for pattern in patterns:  # one group each, to say which pattern took a module
                getattr(exporter, action)(pattern, allow_empty=True)
        exporter.save_pickle(package, resource, obj)
        graph = exporter.dependency_graph
        try:
            exporter.close()
        except PackagingError:
            pass  # reported below, module by module
    chosen = [(group, info.action.name.lower(), pattern)
              for (group, info), pattern in zip(exporter.patterns.items(),
                                                 [p for ps in given.values() for p in ps])]
    modules, problems = [], []
    for name in graph.nodes:
        attrs = graph.nodes[name]
        if attrs.get("is_pickle"):
            continue
        needed_by = next(iter(graph.predecessors(name)), None)
        if needed_by is not None and needed_by.startswith("<") and needed_by.endswith(">"):
            needed_by = "the pickle " + needed_by[1:-1].replace(".", "/", package.count(".") + 1)
        action = attrs.get("action")
        error = attrs.get("error")
        if action is None or error is not None:
            reason = ("no intern, extern or mock pattern matched it"
                      if error is None or error.name == "NO_ACTION" else error.value)
            modules.append(ModulePlan(name, "unmatched", str(reason), needed_by))
            problems.append(f"{name}: {reason}" + (f" (needed by {needed_by})" if needed_by else ""))
            continue
        kind = action.name.lower()
        pattern = next((f"--{k} {p}" for group, k, p in chosen if k == kind and group.matches(name)),
                       None)
        modules.append(ModulePlan(name, kind, f"matched {pattern}" if pattern else _ALWAYS,
                                  needed_by))
    order = {"unmatched": 0, "intern": 1, "extern": 2, "mock": 3}
    modules.sort(key=lambda m: (order.get(m.action, 4), m.name))
    return PackagePlan(tuple(modules), tuple(problems))


_HEADINGS = {
    "intern": "interned (source copied into the archive; each interpreter has its own copy)",
    "extern": "externed (imported from the interpreter's environment)",
    "mock": "mocked (a stub: importing works, using it raises)",
    "unmatched": "not covered (intern, extern or mock each of these)",
}


def format_plan(plan: PackagePlan) -> str:
    """The plan as text: one section per action, one line per module."""
    lines = []
    for action in ("unmatched", "intern", "extern", "mock"):
        mine = [m for m in plan.modules if m.action == action]
        if not mine and action == "unmatched":
            continue
        lines.append(f"{_HEADINGS[action]}: {len(mine)}")
        width = max((len(m.name) for m in mine), default=0)
        for m in mine:
            by = f"; needed by {m.needed_by}" if m.needed_by else ""
            lines.append(f"  {m.name:<{width}}  {m.why}{by}")
    if not plan.ok:
        roots = sorted({m.name.split(".")[0] for m in plan.modules if m.action == "unmatched"})
        lines.append("to fix: extern a library installed where the interpreters run ("
                     + ", ".join(f"--extern '{r}.**'" for r in roots)
                     + "), intern your own code (--intern), or mock what is not needed to run "
                       "the model (--mock)")
    return "\n".join(lines)
