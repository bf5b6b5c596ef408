"""Code that runs in the benchmark's own child processes (``limit``, ``process_pool``).

Kept apart from the strategies so that a child imports only torch and this
module.  Children come from a ``forkserver`` (torch imported once, no op run,
so no thread pool to break by forking) or ``spawn``; never a plain ``fork``
of a host that has already run torch.
"""

from __future__ import annotations

import array
import time
import warnings
from typing import Any

import torch

from .harness import WARMUP_ITEMS

def mp_context():
    """The interpreters' context (forkserver with torch preloaded, else spawn), whose
    fork server also preloads this module for the benchmark's own children."""
    from ..backends.process import worker_context

    return worker_context(("multipy.bench._child",))


def load_from_archive(archive: str, resource: str) -> Any:
    """Unpickle ``model/<resource>`` of a torch.package archive (runs its code)."""
    from torch.package import PackageImporter

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
        return PackageImporter(archive).load_pickle("model", resource)


def batch_inputs(obj: Any, batch: int, /) -> Any:
    """``obj`` with every tensor of at least one dimension made ``batch`` rows
    along dim 0 by repeating its rows (row i is row ``i % rows`` of the example).

    Tuples, lists and dicts are walked; anything else (and 0-d tensors) is
    left as it is.  ``batch == 1`` returns ``obj`` unchanged.

    Example:
        >>> import torch
        >>> batch_inputs((torch.ones(1, 3), 7), 4)[0].shape
        torch.Size([4, 3])
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    if batch == 1:
        return obj

    def repeat_rows(t):
        if t.dim() == 0 or t.shape[0] == batch:
            return t
        if t.shape[0] == 0:
            raise ValueError(f"cannot repeat an empty example tensor {tuple(t.shape)} "
                             f"to {batch} rows")
        with torch.no_grad():
            return t.index_select(0, torch.arange(batch, device=t.device) % t.shape[0])

    return _map_tensors(obj, repeat_rows)


def inputs_to(obj: Any, device: str | torch.device, /) -> Any:
    """``obj`` with every tensor moved to ``device`` (tuples, lists, dicts walked)."""
    return _map_tensors(obj, lambda t: t.to(device))


def _map_tensors(obj: Any, fn) -> Any:
    """``obj`` with ``fn(t)`` for every tensor ``t`` in it (tuples, named tuples,
    lists and dicts walked; anything else left as it is)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        items = [_map_tensors(x, fn) for x in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [_map_tensors(x, fn) for x in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def clone_args(args: tuple) -> tuple:
    """A fresh copy of every tensor argument, as deploy's benchmark made per item."""
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def run_item(model, args: tuple) -> Any:
    """One work item as every strategy runs it: fresh input copies, inference mode."""
    fresh = clone_args(args)
    with torch.inference_mode():
        return model(*fresh)


# ------------------------------------------------------------------ limit
def limit_worker(archive: str, seconds: float, barrier, results, batch: int = 1) -> None:
    """One of the N independent processes: run the model directly for the window
    (on the example inputs repeated to ``batch`` rows).

    Puts ``(items, elapsed_seconds, latencies_bytes)`` on ``results``, or
    ``("error", text)`` when anything fails (the barrier is aborted so the
    others do not wait forever).
    """
    try:
        torch.set_num_threads(1)
        model = load_from_archive(archive, "model.pkl")
        args = batch_inputs(load_from_archive(archive, "example.pkl"), batch)
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
