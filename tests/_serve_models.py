"""Models the serve tests package into an archive (interned, so the archive is
self-contained).  Each answers something a test can check per request."""

from __future__ import annotations

import os
import tempfile
import time

import torch


class Affine(torch.nn.Module):
    """``2 * x + 1``: a client can check its own answer."""

    def forward(self, x):
        return 2 * x + 1


class Sleepy(torch.nn.Module):
    """Sleeps ``seconds`` (its first input), then returns ``x``."""

    def forward(self, seconds, x):
        time.sleep(float(seconds.reshape(-1)[0]))
        return x


def gate_path(token: int) -> str:
    """The file that opens :class:`Gated`'s gate ``token`` (in the host: create it)."""
    return os.path.join(tempfile.gettempdir(), f"multipy-serve-gate-{token}")


class Gated(torch.nn.Module):
    """Waits until the gate named by its first input (an integer token) is open
    (:func:`gate_path` exists), then returns ``x``."""

    def forward(self, token, x):
        path = gate_path(int(token.reshape(-1)[0]))
        while not os.path.exists(path):
            time.sleep(0.001)
        return x


class Named(torch.nn.Module):
    """Two outputs under names it declares."""

    output_names = ["total", "largest"]

    def forward(self, x):
        return x.sum(), x.max()


class Weights(torch.nn.Module):
    """Adds an ``(n, m)`` weight: a wrong shape makes the model raise."""

    def __init__(self, n: int = 2, m: int = 3) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n, m))

    def forward(self, x):
        return self.weight + x


class Mode(torch.nn.Module):
    """Answers whether it runs in inference mode (a server runs models that way)."""

    def forward(self, x):
        return torch.tensor([torch.is_inference_mode_enabled()])


def write(path) -> None:
    """Write every model above into one archive: ``model/<name>.pkl``."""
    from torch.package import PackageExporter

    with PackageExporter(str(path)) as exporter:
        exporter.intern("_serve_models")
        for name, model in (("affine", Affine()), ("sleepy", Sleepy()), ("named", Named()),
                            ("weights", Weights()), ("mode", Mode()), ("gated", Gated())):
            exporter.save_pickle("model", f"{name}.pkl", model)
