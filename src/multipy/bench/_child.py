"""Code that runs in the benchmark's own child processes (``limit``, ``process_pool``).

Kept apart from the strategies so that a child imports only torch and this
module.  Children come from a ``forkserver`` (torch imported once, no op run,
so no thread pool to break by forking) or ``spawn``; never a plain ``fork``
of a host that has already run torch.
"""

from __future__ import annotations

import array
import multiprocessing
import time
import warnings
from typing import Any

import torch

from .harness import WARMUP_ITEMS

# Preloaded by the fork server so every child starts with torch imported.
PRELOAD = ["torch", "numpy", "multipy.bench._child", "multipy.backends._process_main"]


def mp_context():
    """A forkserver context with torch preloaded where available, else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def load_from_archive(archive: str, resource: str) -> Any:
    """Unpickle ``model/<resource>`` of a torch.package archive (runs its code)."""
    from torch.package import PackageImporter

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
        return PackageImporter(archive).load_pickle("model", resource)


def clone_args(args: tuple) -> tuple:
    """A fresh copy of every tensor argument, as deploy's benchmark made per item."""
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def run_item(model, args: tuple) -> Any:
    """One work item as every strategy runs it: fresh input copies, inference mode."""
    fresh = clone_args(args)
    with torch.inference_mode():
        return model(*fresh)


# ------------------------------------------------------------------ limit
def limit_worker(archive: str, seconds: float, barrier, results) -> None:
    """One of the N independent processes: run the model directly for the window.

    Puts ``(items, elapsed_seconds, latencies_bytes)`` on ``results``, or
    ``("error", text)`` when anything fails (the barrier is aborted so the
    others do not wait forever).
    """
    try:
        torch.set_num_threads(1)
        model = load_from_archive(archive, "model.pkl")
        args = load_from_archive(archive, "example.pkl")
        for _ in range(WARMUP_ITEMS):
            run_item(model, args)
        barrier.wait()
        start = now = time.perf_counter()
        deadline = start + seconds
        latencies = array.array("d")
        while now < deadline:
            run_item(model, args)
            after = time.perf_counter()
            latencies.append(after - now)
            now = after
        results.put((len(latencies), now - start, latencies.tobytes()))
    except BaseException as exc:  # noqa: BLE001 - reported to the host
        try:
            barrier.abort()
        finally:
            results.put(("error", f"{type(exc).__name__}: {exc}"))


# ------------------------------------------------------------ process_pool
_pool_model = None


def pool_init(archive: str) -> None:
    """ProcessPoolExecutor initializer: load the model once per worker."""
    global _pool_model
    torch.set_num_threads(1)
    _pool_model = load_from_archive(archive, "model.pkl")


def pool_call(args: tuple) -> Any:
    """Run the pool worker's model on ``args`` (tensors arrive pickled)."""
    with torch.inference_mode():
        return _pool_model(*args)


# ------------------------------------------------------------------ memory
def write_wide_package(path: str, width: int, layers: int) -> int:
    """Write a ``layers`` x ``Linear(width, width)`` model as a torch.package; return its
    parameter count.  Run in a child so the host never holds the weights itself."""
    from ..examples.models import SmallOps
    from ..package.export import save_package

    torch.manual_seed(0)
    with torch.no_grad():
        model = SmallOps(n_layers=layers, width=width).eval()
    save_package(path, model, intern=["multipy.examples.**"],
                 example_inputs=(torch.randn(1, width),))
    return sum(p.numel() for p in model.parameters())
