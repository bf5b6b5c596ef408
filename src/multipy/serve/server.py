"""Run a registry's app on uvicorn until SIGTERM or SIGINT, then drain and exit.

::

    serve(registry, host, port)
      uvicorn.Server ── SIGTERM ──▶ registry.draining = True    (/v2/health/ready says 503)
                                    stop accepting; requests in flight finish
                                    (at most drain_timeout s), then lifespan shutdown
                                    closes the registry and, when it owns it, the manager

After a signal, ``serve`` returns normally (the command exits 0) instead of
re-raising the signal the way uvicorn does by default.
"""

from __future__ import annotations

import signal

import uvicorn

from .app import build_app
from .registry import ModelRegistry

__all__ = ["serve"]


class _Server(uvicorn.Server):
    """uvicorn's server, telling the registry it drains as soon as a signal arrives."""

    def __init__(self, config: uvicorn.Config, registry: ModelRegistry) -> None:
        super().__init__(config)
        self._registry = registry

    def handle_exit(self, sig, frame) -> None:
        self._registry.draining = True
        super().handle_exit(sig, frame)


def serve(registry: ModelRegistry, *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "warning", on_listening=None) -> None:
    """Serve ``registry`` on ``host:port`` until SIGTERM/SIGINT; closes the registry.

    ``on_listening(port)`` is called once the socket accepts connections (the
    port is the bound one, useful with ``port=0``).

    >>> serve(ModelRegistry.open({"simple": "simple.pt"}), port=8000)  # doctest: +SKIP
    """
    app = build_app(registry)
    # proxy_headers off: uvicorn's X-Forwarded-* middleware would run for every request
    # to rewrite the client address and scheme, which this app never reads.  No
    # "server: uvicorn" header: uvicorn checks every header of every response with two
    # regular expressions, and this one tells clients nothing they need.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=registry.options.drain_timeout,
                            access_log=False, proxy_headers=False, server_header=False)
    server = _Server(config, registry)
    # uvicorn re-raises the signal it caught once it has shut down; a no-op handler
    # turns that into a normal return, so a drained server exits 0.
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if on_listening is None:
            server.run()
        else:
            _run(_run_and_report(server, on_listening), config)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        registry.close()


def _run(main, config: uvicorn.Config) -> None:
    """``asyncio.run(main)`` on the loop uvicorn's ``server.run()`` would use (uvloop
    when installed: it costs each request less than asyncio's own loop)."""
    import asyncio

    factory = getattr(config, "get_loop_factory", lambda: None)()  # uvicorn >= 0.36
    if factory is None or not hasattr(asyncio, "Runner"):  # Python 3.10
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


async def _run_and_report(server: uvicorn.Server, on_listening) -> None:
    import asyncio

    task = asyncio.ensure_future(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        sockets = [s for srv in server.servers for s in srv.sockets]
        on_listening(sockets[0].getsockname()[1])
    await task


def _ignore(sig, frame) -> None:
    pass
