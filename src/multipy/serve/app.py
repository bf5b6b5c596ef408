"""The Starlette application: the Open Inference Protocol's REST routes over a
:class:`~multipy.serve.registry.ModelRegistry`.

::

    POST /v2/models/{name}/infer
      ├─ body ≤ max_request_bytes, else 413           (read here, streamed, counted)
      ├─ protocol.decode_request(body) ─ 400           (no HTTP in the codec)
      ├─ ServedModel.infer(args, deadline) ─ 429/503/504/422
      │     when it must wait in line, raced against the client's disconnect: a
      │     request whose client left is dropped before it runs
      └─ protocol.encode_response(result) ─ JSON, or JSON + binary tensors

    GET /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}[/ready],
        /v2/openapi.json, /metrics

Every error is ``{"error": "..."}`` with the protocol's status, never a
traceback.  Infer requests skip Starlette's middleware and router (see
:class:`_App`): they are nearly all of the traffic, and each layer costs every
request a few microseconds.  The app holds no thread or task of its own beyond a request's
lifetime; its lifespan's shutdown marks the registry draining and closes it
(which closes the manager only when the registry owns it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .openapi import DOCUMENT
from .protocol import (HEADER_LENGTH, BadRequest, InferenceError, PayloadTooLarge,
                       decode_request, encode_response, error_body)
from .registry import ModelRegistry

__all__ = ["build_app"]

log = logging.getLogger("multipy.serve")

_CLIENT_GONE = 499  # nginx's "client closed request": counted, never sent
_OFFLOAD_BYTES = 1 << 18  # bodies larger than this are decoded off the event loop


def build_app(registry: ModelRegistry) -> Starlette:
    """The v2 REST app serving ``registry``'s models.

    The registry's :class:`~multipy.serve.registry.ServeOptions` govern
    admission, deadlines and body size.  Run it with any ASGI server::

        registry = ModelRegistry(manager, {"simple": "simple.pt"})
        app = build_app(registry)
        uvicorn.run(app, host="127.0.0.1", port=8000)

    ``app.state.registry`` and ``app.state.metrics`` give the registry and its
    :class:`~multipy.serve.metrics.Metrics`.
    """
    metrics = Metrics(registry)
    options = registry.options

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": "multipy", "version": __version__,
                             "extensions": ["binary_tensor_data"]})

    async def live(request: Request) -> Response:
        return Response(status_code=200)

    async def ready(request: Request) -> Response:
        return Response(status_code=200 if registry.ready() else 503)

    async def model_metadata(request: Request) -> Response:
        model = registry.get(request.path_params["model_name"])
        return JSONResponse(model.metadata(backend=registry.manager.backend))

    async def model_ready(request: Request) -> Response:
        registry.get(request.path_params["model_name"])
        return Response(status_code=200 if registry.ready() else 503)

    infer = _Infer(registry, metrics)

    async def openapi(request: Request) -> Response:
        return JSONResponse(DOCUMENT)

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        registry.draining = False
        yield
        registry.draining = True
        await asyncio.to_thread(registry.close)

    routes = [
        Route("/v2", server_metadata),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2/openapi.json", openapi),
        Route("/v2/models/{model_name}", model_metadata),
        Route("/v2/models/{model_name}/ready", model_ready),
        Route("/v2/models/{model_name}/versions/{model_version}", model_metadata),
        Route("/v2/models/{model_name}/versions/{model_version}/ready", model_ready),
        Route("/v2/models/{model_name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model_name}/versions/{model_version}/infer", infer, methods=["POST"]),
        Route("/metrics", prometheus),
    ]
    app = _App(infer, routes=routes, lifespan=lifespan, exception_handlers={
        InferenceError: _inference_error, HTTPException: _http_error, Exception: _internal_error})
    app.state.registry = registry
    app.state.metrics = metrics
    return app


def _draining(retry_after: float) -> InferenceError:
    from .protocol import Unavailable

    return Unavailable("the server is shutting down", retry_after=retry_after)


class _App(Starlette):
    """Starlette, with inference requests answered before its middleware and router.

    ``POST /v2/models/NAME/infer`` (and its versioned twin) is most of a server's
    traffic; it goes straight to :class:`_Infer`, which answers errors itself the
    way the exception handlers do.  Everything else, and an infer request under a
    ``root_path``, takes Starlette's way (its routes name the same handler).
    Middleware added with ``add_middleware`` sees only what takes Starlette's way.
    """

    def __init__(self, infer: "_Infer", **kwargs) -> None:
        super().__init__(**kwargs)
        self._infer = infer
        # The infer paths of the served models, parsed once: path -> model name.
        self._paths: dict[str, str] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            path = scope["path"]
            name = self._paths.get(path)
            if name is None:
                name = _infer_route(path)
                if name is not None and name in self._infer.models:  # (bounded: served models')
                    self._paths[path] = name
            if name is not None:
                return await self._infer.serve(scope, receive, send, name)
        await super().__call__(scope, receive, send)


def _infer_route(path: str) -> str | None:
    """The model name of an infer path, else ``None``."""
    if not path.startswith("/v2/models/") or not path.endswith("/infer"):
        return None
    parts = path[11:-6].split("/")
    if len(parts) == 1 or (len(parts) == 3 and parts[1] == "versions" and parts[2]):
        return parts[0] or None
    return None


class _Infer:
    """``POST /v2/models/{name}/infer`` as a plain ASGI app::

        body (≤ max_request_bytes, else 413) ─▶ decode_request ─ 400
          ─▶ ServedModel.infer(args, deadline) ─ 429/503/504/422
               when it must wait in line, raced against the client's disconnect:
               a request whose client left is dropped before it runs
          ─▶ encode_response ─▶ JSON, or JSON + binary tensors

    Counted in the metrics with its status (499 when the client left).
    """

    def __init__(self, registry: ModelRegistry, metrics: Metrics) -> None:
        self.registry = registry
        self.metrics = metrics
        self.models = registry._models  # name -> ServedModel, read without a method call

    async def __call__(self, scope, receive, send) -> None:  # as a Starlette route
        await self.serve(scope, receive, send, scope["path_params"]["model_name"])

    async def serve(self, scope, receive, send, name: str) -> None:
        # One coroutine from the request to the answer but for the model's call (each
        # coroutine more is created, run and resumed per request); helpers only for
        # what is not the common case.
        started = time.perf_counter()
        model = self.models.get(name)
        status = 500
        # multipy serve's HTTP protocol hands over the body it holds, and writes the
        # answer, in plain calls (see _Direct); any other server gets ASGI messages.
        direct = getattr(send, "__self__", None)
        if not isinstance(direct, _Direct):
            direct = None
        try:
            try:
                registry = self.registry
                if model is None:
                    registry.get(name)  # raises ModelNotFound (404), naming the models
                options = registry.options
                if registry.draining:
                    raise _draining(options.retry_after)
                header_length, declared = _headers(scope["headers"])
                limit = options.max_request_bytes
                if declared is not None and declared > limit:
                    raise _too_large(declared, limit)
                body = None if direct is None else direct.take_body()  # a bytearray
                if body is not None:
                    if len(body) > limit:
                        raise _too_large(None, limit)
                else:
                    message = await receive()
                    if message["type"] == "http.request" and not message.get("more_body", False):
                        body = message.get("body", b"")  # the whole body in one message (common)
                        if len(body) > limit:
                            raise _too_large(None, limit)
                        if header_length is not None:  # binary tensors view it in place
                            body = bytearray(body)
                    else:
                        body = await _read_body(receive, message, limit,
                                                writable=header_length is not None)
                if body is None:
                    status = _CLIENT_GONE
                else:
                    if len(body) > _OFFLOAD_BYTES:
                        decoded = await asyncio.to_thread(decode_request, body, header_length)
                    else:
                        decoded = decode_request(body, header_length)
                    timeout = options.request_timeout
                    if decoded.timeout is not None:
                        timeout = min(timeout, decoded.timeout)
                    inputs = decoded.inputs  # (one input: its args without the property's list)
                    args = (inputs[0].data,) if len(inputs) == 1 else decoded.args
                    infer = model.infer(args, deadline=time.monotonic() + timeout)
                    if model.busy():  # it waits in line: drop it if its client leaves meanwhile
                        result = await _unless_gone(infer, receive, direct)
                    else:  # runs at once: nothing to drop if the client leaves
                        result = await infer
                    if result is _GONE:
                        status = _CLIENT_GONE
                    else:
                        encoded = encode_response(name, result, request=decoded, model_version="1",
                                                  declared=model.output_names)
                        body = encoded.body
                        if encoded.header_length is None:
                            headers = [(b"content-type", b"application/json")]
                        else:
                            headers = [(b"content-type", b"application/octet-stream"),
                                       (_HEADER_LENGTH, b"%d" % encoded.header_length)]
                        status = 200
            except InferenceError as exc:
                status = exc.status
                headers, body = _error_headers(exc.retry_after), error_body(exc.message)
            except asyncio.CancelledError:
                status = _CLIENT_GONE
                raise
            except Exception as exc:
                log.exception("internal error serving %s", scope["path"])
                headers = _error_headers(None)
                body = error_body(f"internal error: {type(exc).__name__}: {exc}")
            if status != _CLIENT_GONE:
                headers.append((b"content-length", b"%d" % len(body)))
                if direct is None or not direct.respond(status, headers, body):
                    await send({"type": "http.response.start", "status": status,
                                "headers": headers})
                    await send({"type": "http.response.body", "body": body})
        finally:  # (after the answer is written: counting it does not delay it)
            if model is not None:
                self.metrics.request(name, status, time.perf_counter() - started)


class _Direct:
    """What an ASGI server's ``send`` may be a method of, to let the infer handler
    read a request's body and write its answer in plain calls instead of ASGI
    messages (two coroutines, three message dicts and their checks per request):
    ``multipy serve``'s HTTP protocol (:class:`multipy.serve.server._Cycle`).
    Any other server's ``receive`` and ``send`` are used as ASGI says."""

    __slots__ = ()

    def take_body(self) -> bytearray | None:
        """The whole body, when ``receive()`` would return it at once; else ``None``
        (then the handler awaits ``receive()``)."""
        return None

    def respond(self, status: int, headers: list, body: bytes) -> bool:
        """Send the whole answer as ``http.response.start`` and one
        ``http.response.body`` would; ``False`` (nothing sent) where ``send`` must."""
        return False

    def watch_disconnect(self, task: asyncio.Task):
        """A watch that cancels ``task`` when ``receive()`` would say
        ``http.disconnect``, with ``gone`` (true once it did) and ``stop()``, as
        :class:`_DisconnectWatch`; ``None``: the handler watches ``receive()``."""
        return None


_GONE = object()


async def _unless_gone(infer, receive, direct: _Direct | None = None):
    """``await infer``, or ``_GONE`` if the client disconnects first: then ``infer``
    is cancelled wherever it is (in line: it never runs; sent: its result is dropped).

    ``infer`` runs in this task; :class:`_DisconnectWatch` runs the ASGI server's
    ``receive()`` beside it and cancels this task if that says the client left
    (``direct``'s own watch instead, when it has one)."""
    task = asyncio.current_task()
    watch = None if direct is None else direct.watch_disconnect(task)
    if watch is None:
        watch = _DisconnectWatch(receive, task)
    try:
        return await infer
    except asyncio.CancelledError:
        if not watch.gone:
            raise  # cancelled from elsewhere (the server shutting down)
        uncancel = getattr(task, "uncancel", None)  # Python 3.11+: the cancel was ours
        if uncancel is not None:
            uncancel()
        return _GONE
    finally:
        watch.stop()  # (had it cancelled this task already, infer would have raised)


class _DisconnectWatch:
    """Cancels ``task`` when ``receive()`` says ``http.disconnect``, until :meth:`stop`.

    ``receive()`` is stepped here, from the callbacks of the futures it waits on,
    the way a task would step it, rather than by a task of its own: most requests
    of a busy server wait in line, and a task per waiting request (made, run,
    cancelled, and its cancellation run) was about 44,000 of the ~444,000 host
    instructions per request with 64 in flight (count_serve_instructions.py
    --concurrency 64).  Like a task, it takes the futures ``receive()`` waits on and
    its bare ``yield``s (``asyncio.sleep(0)``); if ``receive()`` fails, the request
    is no longer watched (and still answered)."""

    __slots__ = ("receive", "task", "gone", "coro", "waited")

    def __init__(self, receive, task: asyncio.Task) -> None:
        self.receive, self.task = receive, task
        self.gone = False
        self.waited = None
        self.coro = receive()
        self._step()

    def _step(self, _=None) -> None:
        self.waited = None
        coro = self.coro
        if coro is None:
            return  # stopped
        try:
            yielded = coro.send(None)
        except StopIteration as done:
            if done.value.get("type") == "http.disconnect":
                self.coro = None
                self.gone = True
                self.task.cancel()
            else:  # a message before the disconnect (none is expected): wait for the next
                self.coro = self.receive()
                self._step()
            return
        except BaseException:  # noqa: BLE001 - the server's receive failed: stop watching
            self.coro = None
            log.debug("watching for a disconnect failed", exc_info=True)
            return
        if yielded is None:  # a bare yield, as asyncio.sleep(0): step again soon
            asyncio.get_running_loop().call_soon(self._step)
        elif asyncio.isfuture(yielded):
            yielded._asyncio_future_blocking = False  # taken, as a task takes it
            self.waited = yielded
            yielded.add_done_callback(self._step)
        else:  # a task would fail it too ("bad yield")
            self.stop()
            log.debug("watching for a disconnect stopped: receive() yielded %r", yielded)

    def stop(self) -> None:
        """Stop watching (the request is answered, or gave up)."""
        coro, self.coro = self.coro, None
        if self.waited is not None:
            self.waited.remove_done_callback(self._step)
            self.waited = None
        if coro is not None:
            with contextlib.suppress(RuntimeError):  # (a receive() that will not stop)
                coro.close()


_HEADER_LENGTH = HEADER_LENGTH.lower().encode()


def _headers(headers) -> tuple[int | None, int | None]:
    """``(Inference-Header-Content-Length, Content-Length)`` of ASGI headers."""
    header_length = declared = None
    for key, value in headers:
        if key == b"content-length":
            declared = int(value) if value.isdigit() else None
        elif key == _HEADER_LENGTH:
            try:
                header_length = int(value)
            except ValueError:
                raise BadRequest(f"{HEADER_LENGTH} must be a whole number, got "
                                 f"{value.decode('latin-1')!r}") from None
    return header_length, declared


def _too_large(declared: int | None, limit: int) -> PayloadTooLarge:
    if declared is not None:
        return PayloadTooLarge(f"the body has {declared} bytes; this server accepts at most "
                               f"{limit} (--max-request-bytes)")
    return PayloadTooLarge(f"the body is over {limit} bytes, the most this server accepts "
                           "(--max-request-bytes)")


async def _read_body(receive, message: dict, limit: int, *,
                     writable: bool) -> bytes | bytearray | None:
    """The request body from ``message`` (the first ``receive()``d) on, or ``None``
    when the client disconnected first.  Binary tensors view a ``writable`` body
    in place, so it comes as a bytearray."""
    chunks, size = [], 0
    while True:
        if message["type"] != "http.request":
            return None  # http.disconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(None, limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
        message = await receive()
    if writable:
        return bytearray().join(chunks)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _error_headers(retry_after: float | None) -> list:
    headers = [(b"content-type", b"application/json")]
    if retry_after is not None:
        headers.append((b"retry-after", b"%d" % max(1, math.ceil(retry_after))))
    return headers


def _error_response(status: int, message: str, retry_after: float | None = None) -> Response:
    headers = {} if retry_after is None else {"Retry-After": str(max(1, math.ceil(retry_after)))}
    return Response(error_body(message), status_code=status, media_type="application/json",
                    headers=headers)


async def _inference_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InferenceError)
    return _error_response(exc.status, exc.message, exc.retry_after)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no route {request.url.path!r}; see /v2/openapi.json"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path!r}"
    else:
        message = str(exc.detail)
    return _error_response(exc.status_code, message)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("internal error serving %s", request.url.path)
    return _error_response(500, f"internal error: {type(exc).__name__}: {exc}")
