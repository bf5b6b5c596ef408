"""A row-independent model for the futures and batching tests, importable by the
same name in the host and in every interpreter (the tests directory is on both
paths), so ``create_movable`` works on every backend; and the host-side helpers
that hold interpreters busy with gated calls of it."""

from __future__ import annotations

import os
import time


def rows(x, y=None, *, scale=2.0, offset=1.0, gate=None, log=None, tag="", exit_code=None,
         shape="tensor"):
    """``x * scale + offset`` row by row; raises ValueError if any element is negative.

    ``log``: append ``"<tag> <pid> <rows>"`` when the call starts.  ``gate``: wait
    until that file exists before answering.  ``exit_code``: end the interpreter.
    ``shape``: "tensor", "tuple" or "dict" result (with ``y`` added in).
    """
    if log is not None:
        with open(log, "a") as f:
            f.write(f"{tag} {os.getpid()} {x.shape[0] if x.dim() else 0}\n")
    if gate is not None:
        while not os.path.exists(gate):
            time.sleep(0.001)
    if exit_code is not None:
        os._exit(exit_code)
    if (x < 0).any():
        raise ValueError(f"negative input: {x.min().item()}")  # the model's own error
    out = x * scale + offset
    if shape == "tuple":
        return out, (x + y if y is not None else x.sum(-1, keepdim=True))
    if shape == "dict":
        return {"out": out, "sum": x.sum(-1, keepdim=True)}
    return out


def logged(log) -> list[list[str]]:
    """The lines ``rows`` appended to ``log``, split."""
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [line.split() for line in f.read().splitlines()]


def movable_rows(manager):
    """``rows`` as a ReplicatedObj of ``manager``: ``x * 2 + 1``, gates, logs, crashes."""
    with manager.acquire_one() as s:
        return s.create_movable(s.global_("_rows", "rows"))


def open_gate(path: str) -> None:
    """In the host: open the gate ``rows(gate=path)`` waits for."""
    with open(path, "w"):
        pass


def hold_every_interpreter(model, manager, gate_path: str, log: str, tag: str = "hold") -> list:
    """Futures of one gated call per interpreter, once each is running there, and of
    the calls that fill each interpreter's queue behind it (``Worker.posted_depth``
    in all): every later posted call waits in the dispatcher."""
    import torch

    from _wait import wait_for

    held = [model.submit(torch.zeros(1), gate=gate_path, log=log, tag=f"{tag}{i}")
            for i in range(len(manager))]
    wait_for(lambda: len(logged(log)) == len(held), "the gated calls to start")
    workers = manager._workers
    fill = sum(w.posted_depth - 1 for w in workers)
    held += [model.submit(torch.zeros(1)) for _ in range(fill)]
    wait_for(lambda: all(w.posted_in_flight >= w.posted_depth for w in workers),
             "the calls queued behind them to be sent")
    assert all(f.running() for f in held)
    return held


def mix(x):
    """``x @ w + b`` with fixed weights (the same in every interpreter): rows are
    independent, but a batch's matrix product may round differently from one
    row's.  Integer inputs get integer weights (exact arithmetic)."""
    import torch

    g = torch.Generator().manual_seed(0)
    w = torch.randn(x.shape[-1], 8, generator=g, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    if x.is_floating_point():
        return x @ w.to(x.dtype) + b.to(x.dtype)
    return x @ (w * 100).to(x.dtype) + (b * 100).to(x.dtype)
