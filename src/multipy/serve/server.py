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

import asyncio
import signal
import urllib.parse

import uvicorn

from .app import _Direct, build_app
from .registry import ModelRegistry

__all__ = ["serve"]

_JOIN_BYTES = 1 << 16  # a body up to this is joined to its head; a longer one is not copied
# Response header names and values uvicorn's checks passed, at most _CHECKED_MAX of
# each: the names and values a server sends again and again are checked once.
_NAMES: set[bytes] = set()
_VALUES: set[bytes] = set()
_CHECKED_MAX = 256

try:  # uvicorn's httptools protocol (uvicorn[standard]); without httptools, uvicorn's own choice
    import httptools
    from uvicorn.protocols.http.flow_control import service_unavailable
    from uvicorn.protocols.http.httptools_impl import (HEADER_RE, HEADER_VALUE_RE, STATUS_LINE,
                                                       HttpToolsProtocol, RequestResponseCycle)
    from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string
except ImportError:  # pragma: no cover
    HttpToolsProtocol = None


if HttpToolsProtocol is not None:
    class _Cycle(RequestResponseCycle, _Direct):
        """uvicorn's request-response cycle, writing a response's status line and
        headers together with its first body message: one system call and one TCP
        segment for an answer that fits one.

        uvicorn writes the head as soon as the app sends ``http.response.start``,
        then the body: two system calls and two segments per response, and a client
        waiting on one connection may wake for each.  :meth:`send` is uvicorn's own
        (0.54) with the head held until the body, the same checks and the same
        bytes: a subclass calling uvicorn's, with the transport swapped around it,
        cost about 10,000 instructions more per request (two more coroutines and the
        stand-in transports) than the system call it saved.  A response the app
        leaves unfinished (it ends, or fails, after ``http.response.start``) is closed
        without its head; uvicorn wrote the head, then closed it."""

        _head = None  # the status line and headers, until the first body message

        async def send(self, message) -> None:
            if self.flow.write_paused and not self.disconnected:
                await self.flow.drain()  # pragma: full coverage
            if self.disconnected:
                return  # pragma: full coverage
            if not self.response_started:
                if message["type"] != "http.response.start":
                    raise RuntimeError("Expected ASGI message 'http.response.start', but got "
                                       f"'{message['type']}'.")
                self._start(message["status"], message.get("headers", []))
            elif not self.response_complete:
                if message["type"] != "http.response.body":
                    raise RuntimeError("Expected ASGI message 'http.response.body', but got "
                                       f"'{message['type']}'.")
                self._body(message.get("body", b""), message.get("more_body", False))
            else:
                raise RuntimeError(f"Unexpected ASGI message '{message['type']}' sent, after "
                                   "response already completed.")

        def take_body(self) -> bytearray | None:
            """The request's whole body, as :meth:`receive` would give it, when it has
            all arrived and nothing else is owed first (no ``100 Continue`` to write,
            the connection open): then no coroutine and no message.  Else ``None``,
            and the caller awaits :meth:`receive` instead.

            The bytearray is the one the body was read into, handed over (not copied)."""
            if (self.more_body or self.waiting_for_100_continue or self.disconnected
                    or self.response_complete or not self.message_event.is_set()):
                return None
            self.flow.resume_reading()
            self.message_event.clear()
            body, self.body = self.body, bytearray()
            return body

        def respond(self, status: int, headers: list, body: bytes) -> bool:
            """:meth:`send` of ``http.response.start`` with ``status`` and ``headers``,
            then of ``http.response.body`` with the whole ``body``, in one call: the
            same checks and bytes, without the two messages and coroutines.  ``False``
            (nothing done) where :meth:`send` must wait or do otherwise: a response
            already started, a closed connection, or writing paused."""
            if self.response_started or self.disconnected or self.flow.write_paused:
                return False
            self._start(status, headers)
            self._body(body, False)
            return True

        _watch: "_Watch | None" = None  # watch_disconnect's, while it watches

        def watch_disconnect(self, task: asyncio.Task) -> "_Watch":
            """A watch that cancels ``task`` when the client disconnects before the
            response completes (when :meth:`receive` would say ``http.disconnect``),
            until its ``stop()``: told by the protocol's ``connection_lost``, with no
            ``receive()`` stepped, no future made and none cancelled per request."""
            self._watch = watch = _Watch(task)
            if self.disconnected:  # receive() would say so at once
                watch.disconnected()
            return watch

        def _start(self, status_code: int, headers) -> None:
            """``http.response.start``: the head, kept for the first body message."""
            self.response_started = True
            self.waiting_for_100_continue = False
            headers = self.default_headers + list(headers)
            if self.access_log:
                self.access_logger.info(
                    '%s - "%s %s HTTP/%s" %d', get_client_addr(self.scope),
                    self.scope["method"], get_path_with_query_string(self.scope),
                    self.scope["http_version"], status_code)
            content = [STATUS_LINE[status_code]]
            has_connection_close = False
            names, values = _NAMES, _VALUES
            for name, value in headers:
                if name not in names:  # (checked once: a search costs ~1,800 instructions)
                    if HEADER_RE.search(name):
                        raise RuntimeError("Invalid HTTP header name.")  # pragma: full coverage
                    if len(names) < _CHECKED_MAX:
                        names.add(name)
                if value not in values and not value.isdigit():
                    if HEADER_VALUE_RE.search(value):
                        raise RuntimeError("Invalid HTTP header value.")
                    if len(values) < _CHECKED_MAX:
                        values.add(value)
                name = name.lower()
                if name == b"content-length" and self.chunked_encoding is None:
                    self.expected_content_length = int(value.decode())
                    self.chunked_encoding = False
                elif name == b"transfer-encoding" and value.lower() == b"chunked":
                    self.expected_content_length = 0
                    self.chunked_encoding = True
                elif name == b"connection":
                    connection = [token.lower().strip() for token in value.split(b",")]
                    if b"close" in connection:
                        self.keep_alive = False
                        has_connection_close = True
                content.extend([name, b": ", value, b"\r\n"])
            if not self.keep_alive and not has_connection_close:
                content.append(b"connection: close\r\n")
            if (self.chunked_encoding is None and self.scope["method"] != "HEAD"
                    and status_code not in (204, 304)):
                self.chunked_encoding = True
                content.append(b"transfer-encoding: chunked\r\n")
            content.append(b"\r\n")
            self._head = b"".join(content)  # written with the body (uvicorn: here)

        def _body(self, body: bytes, more_body: bool) -> None:
            """``http.response.body``: written, after the head if it is still held."""
            head, self._head = self._head, None
            if self.scope["method"] == "HEAD":
                self.expected_content_length = 0
                if head is not None:
                    self.transport.write(head)
            elif self.chunked_encoding:
                content = [] if head is None else [head]
                if body:
                    content += [b"%x\r\n" % len(body), body, b"\r\n"]
                if not more_body:
                    content.append(b"0\r\n\r\n")
                self.transport.write(b"".join(content))
            else:
                num_bytes = len(body)
                if num_bytes > self.expected_content_length:
                    if head is not None:
                        self.transport.write(head)
                    raise RuntimeError("Response content longer than Content-Length")
                self.expected_content_length -= num_bytes
                if head is None:
                    self.transport.write(body)
                elif num_bytes <= _JOIN_BYTES:  # (one copy: cheaper than writelines)
                    self.transport.write(head + body)
                else:
                    self.transport.writelines((head, body))
            if not more_body:
                if self.expected_content_length != 0:
                    raise RuntimeError("Response content shorter than Content-Length")
                self.response_complete = True
                self.message_event.set()
                if not self.keep_alive:
                    self.transport.close()
                self.on_response()

    class _Watch:
        """:meth:`_Cycle.watch_disconnect`'s watch: ``gone`` once it cancelled its task."""

        __slots__ = ("task", "gone")

        def __init__(self, task: asyncio.Task) -> None:
            self.task, self.gone = task, False

        def disconnected(self) -> None:
            task, self.task = self.task, None
            if task is not None:
                self.gone = True
                task.cancel()

        def stop(self) -> None:
            self.task = None

    class _HttpProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol whose requests run in :class:`_Cycle`, with
        one keep-alive timer per connection instead of one per request.

        uvicorn arms the keep-alive timer when a response ends and cancels it when
        the next request's bytes arrive: a timer made, started, stopped and freed per
        request (~4,000 instructions).  Here the timer stays armed while requests
        come; when it fires, it closes the connection only if it has been idle (no
        request since the last response) for ``timeout_keep_alive`` seconds, and
        otherwise waits for the rest of that time, or, while a request is being
        read or answered, for the next response's end: a connection closes when
        uvicorn's own timer would close it."""

        _idle_since: float | None = None  # the loop's time when the last response ended

        def _unset_keepalive_if_required(self) -> None:
            # uvicorn calls this when bytes arrive (and when the connection closes):
            # no longer idle.  The timer is left armed; it looks when it fires.
            self._idle_since = None

        def on_response_complete(self) -> None:
            # uvicorn's own (0.54), but for the keep-alive timer.
            self.server_state.total_requests += 1
            if self.transport.is_closing():
                return
            self.flow.resume_reading()
            if self.pipeline:
                self._idle_since = None
                cycle, app = self.pipeline.pop()
                self._start_asgi_task(cycle, app)
            else:
                self._idle_since = self.loop.time()
                if self.timeout_keep_alive_task is None:
                    self.timeout_keep_alive_task = self.loop.call_later(
                        self.timeout_keep_alive, self.timeout_keep_alive_handler)

        def timeout_keep_alive_handler(self) -> None:
            self.timeout_keep_alive_task = None
            if self.transport.is_closing():
                return
            idle = self._idle_since
            if idle is None:
                return  # a request is on its way: its response's end arms the timer again
            left = idle + self.timeout_keep_alive - self.loop.time()
            if left > 0:
                self.timeout_keep_alive_task = self.loop.call_later(
                    left, self.timeout_keep_alive_handler)
            else:
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            cycle = self.cycle  # (the one uvicorn marks disconnected, as it does)
            if cycle is not None and cycle.disconnected and cycle._watch is not None:
                cycle._watch.disconnected()
            if self.timeout_keep_alive_task is not None:
                self.timeout_keep_alive_task.cancel()
                self.timeout_keep_alive_task = None

        def on_headers_complete(self) -> None:
            # uvicorn's own (0.54), but for the cycle's class, which it names inline.
            # (Made a _Cycle after the fact instead, by setting its __class__, each of
            # uvicorn's attribute reads missed the interpreter's caches: ~10,000
            # instructions more per request.)
            http_version = self.parser.get_http_version()
            method = self.parser.get_method()
            self.scope["method"] = method.decode("ascii")
            if http_version != "1.1":
                self.scope["http_version"] = http_version
            if self.parser.should_upgrade() and self._should_upgrade():
                return
            parsed_url = httptools.parse_url(self.url)
            raw_path = parsed_url.path
            path = raw_path.decode("ascii")
            if "%" in path:
                path = urllib.parse.unquote(path)
            self.scope["path"] = self.root_path + path
            self.scope["raw_path"] = self.root_path.encode("ascii") + raw_path
            self.scope["query_string"] = parsed_url.query or b""
            if self.limit_concurrency is not None and (
                    len(self.connections) >= self.limit_concurrency
                    or len(self.tasks) >= self.limit_concurrency):
                app = service_unavailable
                self.logger.warning("Exceeded concurrency limit.")
            else:
                app = self.app
            existing_cycle = self.cycle
            self.cycle = _Cycle(
                scope=self.scope, transport=self.transport, flow=self.flow, logger=self.logger,
                access_logger=self.access_logger, access_log=self.access_log,
                default_headers=self.server_state.default_headers,
                message_event=asyncio.Event(), expect_100_continue=self.expect_100_continue,
                keep_alive=http_version != "1.0" and self.parser.should_keep_alive(),
                on_response=self.on_response_complete)
            if existing_cycle is None or existing_cycle.response_complete:
                self._start_asgi_task(self.cycle, app)
            else:  # pipelined requests wait for the one before
                self.flow.pause_reading()
                self.pipeline.appendleft((self.cycle, app))


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
    config = _config(app, host=host, port=port, log_level=log_level,
                     drain_timeout=registry.options.drain_timeout)
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


def _config(app, *, host: str, port: int, log_level: str,
            drain_timeout: float | None = None) -> uvicorn.Config:
    """uvicorn's settings for ``app``."""
    # proxy_headers off: uvicorn's X-Forwarded-* middleware would run for every request
    # to rewrite the client address and scheme, which this app never reads.  No
    # "server: uvicorn" header: uvicorn checks every header of every response with two
    # regular expressions, and this one tells clients nothing they need.
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                          timeout_graceful_shutdown=drain_timeout, access_log=False,
                          proxy_headers=False, server_header=False,
                          http=_HttpProtocol if HttpToolsProtocol is not None else "auto")


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
