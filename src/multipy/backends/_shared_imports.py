"""Imported by a fork server just before its shared imports (see :mod:`._forkserver`).

It records which threads the server has before the shared imports run;
:func:`fork_problem`, called first thing in every interpreter forked from it,
says whether those imports made the server unsafe to fork from.
"""

from __future__ import annotations

import json
import os
import sys

# The environment's path, where the shared imports that follow are found.
_path = os.environ.pop("MULTIPY_SHARED_IMPORTS_PATH", None)
if _path is not None:
    sys.path[:] = json.loads(_path)

# Thread ids, not a count: OpenBLAS stops its threads in the server before every fork.
_threads_before = set(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None


UNSAFE_THREADS = 87  # exit codes of an interpreter forked from an unsafe server
UNSAFE_CUDA = 88


def fork_problem() -> int | None:
    """Why the server this process was forked from was unsafe to fork from
    (:data:`UNSAFE_THREADS` or :data:`UNSAFE_CUDA`), or ``None``.

    Call it first thing in the forked child: it counts the parent's threads now.
    """
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    if cuda is not None and getattr(cuda, "is_initialized", lambda: False)():
        return UNSAFE_CUDA
    if _threads_before is None:
        return None
    try:
        threads = set(os.listdir(f"/proc/{os.getppid()}/task"))
    except OSError:
        return None
    return UNSAFE_THREADS if threads - _threads_before else None
