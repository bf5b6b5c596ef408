"""``multipy serve``: the Open Inference Protocol (KServe v2 REST) over an interpreter pool.

* :mod:`~multipy.serve.protocol` -- the v2 request/response codec (no HTTP);
* :mod:`~multipy.serve.registry` -- the served models, their options, admission
  and deadlines (no HTTP);
* :mod:`~multipy.serve.app` -- the Starlette app (``build_app``);
* :mod:`~multipy.serve.metrics` -- Prometheus metrics;
* :mod:`~multipy.serve.server` -- uvicorn, signals and draining (``serve``).

Needs the ``serve`` extra (``pip install 'multipy[serve]'``); importing
:mod:`multipy` alone imports none of it.

>>> from multipy import InterpreterManager                       # doctest: +SKIP
>>> from multipy.serve import ModelRegistry, build_app           # doctest: +SKIP
>>> manager = InterpreterManager(2)                             # doctest: +SKIP
>>> app = build_app(ModelRegistry(manager, {"simple": "simple.pt"}))  # doctest: +SKIP
"""

from .registry import ModelRegistry, ModelSpec, ServedModel, ServeOptions

__all__ = ["ModelRegistry", "ModelSpec", "ServeOptions", "ServedModel", "build_app", "serve"]


def __getattr__(name: str):
    # The app and the server import Starlette and uvicorn: only when asked for.
    if name == "build_app":
        from .app import build_app

        return build_app
    if name == "serve":
        from .server import serve

        return serve
    raise AttributeError(f"module 'multipy.serve' has no attribute {name!r}")
