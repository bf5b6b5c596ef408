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
traceback.  The app holds no thread or task of its own beyond a request's
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

    async def infer(request: Request) -> Response:
        started = time.perf_counter()
        name = request.path_params["model_name"]
        status = 500
        try:
            response = await _infer(request, name)
            status = response.status_code
            return response
        except InferenceError as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = _CLIENT_GONE
            raise
        finally:
            if name in registry.names():
                metrics.request(name, status, time.perf_counter() - started)

    async def _infer(request: Request, name: str) -> Response:
        model = registry.get(name)
        if registry.draining:
            raise _draining(options.retry_after)
        body = await _read_body(request, options.max_request_bytes)
        header_length = _header_length(request)
        if len(body) > _OFFLOAD_BYTES:
            decoded = await asyncio.to_thread(decode_request, body, header_length)
        else:
            decoded = decode_request(body, header_length)
        timeout = options.request_timeout
        if decoded.timeout is not None:
            timeout = min(timeout, decoded.timeout)
        infer = model.infer(decoded.args, deadline=time.monotonic() + timeout)
        if not model.busy():  # runs at once: nothing to drop if the client leaves
            return _response(name, await infer, decoded, model.output_names)
        work = asyncio.ensure_future(infer)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():  # the client left: drop its request wherever it is
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
            return Response(status_code=_CLIENT_GONE)
        return _response(name, work.result(), decoded, model.output_names)

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
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        InferenceError: _inference_error, HTTPException: _http_error, Exception: _internal_error})
    app.state.registry = registry
    app.state.metrics = metrics
    return app


def _draining(retry_after: float) -> InferenceError:
    from .protocol import Unavailable

    return Unavailable("the server is shutting down", retry_after=retry_after)


def _response(name: str, result, request, declared) -> Response:
    encoded = encode_response(name, result, request=request, model_version="1",
                              declared=declared)
    if encoded.header_length is None:
        return Response(encoded.body, media_type="application/json")
    return Response(encoded.body, media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(encoded.header_length)})


def _header_length(request: Request) -> int | None:
    text = request.headers.get(HEADER_LENGTH)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise BadRequest(f"{HEADER_LENGTH} must be a whole number, got {text!r}") from None


async def _read_body(request: Request, limit: int) -> bytearray:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body has {declared} bytes; this server accepts at most "
                              f"{limit} (--max-request-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is over {limit} bytes, the most this server "
                                  "accepts (--max-request-bytes)")
        chunks.append(chunk)
    return bytearray().join(chunks)  # writable: binary tensors view it in place


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the ASGI server's next message)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


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
