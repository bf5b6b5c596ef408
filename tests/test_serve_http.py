"""The HTTP protocol `multipy serve` runs its app with (``multipy.serve.server``):
uvicorn's httptools protocol, writing each response's head with its body in one
write, and keeping one keep-alive timer per connection.

Driven in process through a stand-in transport (no sockets, no interpreters): the
bytes it writes must be exactly those of uvicorn's own protocol for every kind
of response, in one write where uvicorn made two; an idle connection must close
after ``timeout_keep_alive`` and a busy one must not.  The infer handler's answers
(on one interpreter) must be uvicorn's bytes too, though it takes a whole body and
writes its answer without ASGI messages under this protocol.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'multipy[serve]'")
httptools_impl = pytest.importorskip("uvicorn.protocols.http.httptools_impl",
                                     reason="needs httptools")

import uvicorn  # noqa: E402
from uvicorn.server import ServerState  # noqa: E402

from multipy.serve import server  # noqa: E402

WAIT = 30.0  # bound on every wait for a condition (seconds)


class _Transport:
    """One connection's socket: each ``write``/``writelines`` call is kept, as one
    system call would send it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = asyncio.get_running_loop().create_future()

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def writelines(self, chunks) -> None:
        self.writes.append(b"".join(chunks))

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name,
                                                                                        default)

    def is_closing(self) -> bool:
        return self.closed.done()

    def close(self) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _connection(app, protocol_class, *, keep_alive: float = 5.0):
    config = uvicorn.Config(app, lifespan="off", access_log=False, proxy_headers=False,
                            server_header=False, log_level="critical", http=protocol_class,
                            timeout_keep_alive=keep_alive)
    config.load()
    state = ServerState()
    protocol = config.http_protocol_class(config=config, server_state=state, app_state={})
    transport = _Transport()
    protocol.connection_made(transport)
    return protocol, transport, state


async def _exchange(app, protocol_class, wire: bytes) -> list[bytes]:
    """The writes one request's bytes make the protocol send."""
    protocol, transport, state = _connection(app, protocol_class)
    protocol.data_received(wire)
    await asyncio.wait_for(asyncio.gather(*state.tasks, return_exceptions=True), WAIT)
    protocol.connection_lost(None)
    return transport.writes


def _responder(*messages):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await receive()
        for message in messages:
            await send(message)
    return app


def _start(status=200, headers=((b"content-type", b"application/json"),), length=None):
    headers = list(headers)
    if length is not None:
        headers.append((b"content-length", b"%d" % length))
    return {"type": "http.response.start", "status": status, "headers": headers}


def _body(data: bytes, more: bool = False):
    return {"type": "http.response.body", "body": data, "more_body": more}


BIG = b"x" * (server._JOIN_BYTES + 1)

RESPONSES = {
    "json": (_start(length=13), _body(b'{"answer": 1}')),
    "error 404": (_start(404, length=9), _body(b'{"e": ""}')),
    "retry-after": (_start(503, [(b"content-type", b"application/json"), (b"retry-after", b"1")],
                           length=2), _body(b"{}")),
    "empty body": (_start(200, [], length=0), _body(b"")),
    "large body": (_start(length=len(BIG)), _body(BIG)),
    "chunked": (_start(), _body(b"abc", more=True), _body(b"def")),
    "streamed with a length": (_start(length=6), _body(b"abc", more=True), _body(b"def")),
    "connection close": (_start(200, [(b"connection", b"close")], length=2), _body(b"ok")),
    "no content (204)": (_start(204), _body(b"")),
}

POST = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}"
HEAD = b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n"
HTTP10 = b"POST /x HTTP/1.0\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}"
EXPECT = b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}"


@pytest.mark.parametrize("request_bytes", [POST, HEAD, HTTP10, EXPECT],
                         ids=["POST", "HEAD", "HTTP/1.0", "Expect: 100-continue"])
@pytest.mark.parametrize("kind", sorted(RESPONSES))
def test_the_bytes_written_are_uvicorns_in_one_write_per_body_message(kind, request_bytes):
    async def main():
        app = _responder(*RESPONSES[kind])
        ours = await _exchange(app, server._HttpProtocol, request_bytes)
        theirs = await _exchange(app, httptools_impl.HttpToolsProtocol, request_bytes)
        return ours, theirs

    ours, theirs = asyncio.run(main())
    assert b"".join(ours) == b"".join(theirs)
    assert theirs[0].startswith(b"HTTP/1.1 ")
    body_messages = sum(m["type"] == "http.response.body" for m in RESPONSES[kind])
    # uvicorn: one write for the head, one per body message (none for HEAD's body).
    interim = request_bytes == EXPECT  # (+1: "100 Continue", written when the body is read)
    assert len(ours) == len(theirs) - 1 or request_bytes == HEAD
    assert len(ours) <= body_messages + interim


def test_pipelined_requests_are_answered_in_order_as_uvicorn_answers_them():
    async def main():
        async def app(scope, receive, send):
            await receive()
            body = scope["path"].encode()
            await send(_start(length=len(body)))
            await send(_body(body))

        wire = b"".join(b"POST /%d HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}" % i
                        for i in range(3))
        out = []
        for protocol_class in (server._HttpProtocol, httptools_impl.HttpToolsProtocol):
            protocol, transport, state = _connection(app, protocol_class)
            protocol.data_received(wire)
            await asyncio.wait_for(_until(lambda: state.total_requests == 3), WAIT)
            protocol.connection_lost(None)
            out.append(transport.writes)
        return out

    ours, theirs = asyncio.run(main())
    assert b"".join(ours) == b"".join(theirs)
    assert [w.rsplit(b"\r\n", 1)[1] for w in ours] == [b"/0", b"/1", b"/2"]


@pytest.mark.parametrize("messages, error", [
    ((_start(length=1), _body(b"toolong")), "longer than Content-Length"),
    ((_start(length=10), _body(b"short")), "shorter than Content-Length"),
    ((_start(headers=[(b"bad name", b"x")]), _body(b"")), "Invalid HTTP header name"),
    ((_start(headers=[(b"x-a", b"bad\nvalue")]), _body(b"")), "Invalid HTTP header value"),
    ((_body(b"x"),), "Expected ASGI message 'http.response.start'"),
    ((_start(length=0), _start(length=0)), "Expected ASGI message 'http.response.body'"),
], ids=["too long", "too short", "header name", "header value", "body first", "two starts"])
def test_a_response_uvicorn_refuses_is_refused_with_its_error(messages, error):
    async def main():
        raised = []

        async def app(scope, receive, send):
            await receive()
            try:
                for message in messages:
                    await send(message)
            except RuntimeError as exc:
                raised.append(str(exc))
                raise

        for protocol_class in (server._HttpProtocol, httptools_impl.HttpToolsProtocol):
            await _exchange(app, protocol_class, POST)
        return raised

    ours, theirs = asyncio.run(main())
    assert error in ours and ours == theirs


def test_a_header_checked_once_is_still_refused_when_bad_elsewhere():
    # A value that passed the value check ("a b") is not a valid name.
    async def main():
        raised = []

        async def app(scope, receive, send):
            await receive()
            try:
                await send(_start(headers=[(b"x-a", b"a b"), (b"a b", b"1")]))
            except RuntimeError as exc:
                raised.append(str(exc))
                raise

        await _exchange(app, server._HttpProtocol, POST)
        return raised

    assert asyncio.run(main()) == ["Invalid HTTP header name."]


def test_an_idle_connection_closes_after_the_keep_alive_timeout_and_a_busy_one_does_not():
    async def main():
        release = asyncio.Event()

        async def app(scope, receive, send):
            await receive()
            if scope["path"] == "/slow":
                await release.wait()
            await send(_start(length=2))
            await send(_body(b"ok"))

        protocol, transport, state = _connection(app, server._HttpProtocol, keep_alive=0.05)
        wire = b"POST %s HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}"
        for _ in range(3):  # keep-alive requests one after another: one timer, left armed
            protocol.data_received(wire % b"/fast")
            await asyncio.wait_for(asyncio.gather(*state.tasks), WAIT)
        timer = protocol.timeout_keep_alive_task
        assert timer is not None and not transport.is_closing()
        # A request in progress when the timer fires keeps the connection open.
        protocol.data_received(wire % b"/slow")
        slow, = state.tasks
        await asyncio.wait_for(_until(lambda: protocol.timeout_keep_alive_task is None), WAIT)
        assert not transport.is_closing()
        release.set()
        await asyncio.wait_for(slow, WAIT)
        assert protocol.timeout_keep_alive_task is not None  # armed again at its end
        await asyncio.wait_for(transport.closed, WAIT)  # then idle: closed
        protocol.connection_lost(None)
        assert len(transport.writes) == 4

    asyncio.run(main())


def test_a_closed_connection_leaves_no_timer():
    async def main():
        protocol, transport, state = _connection(_responder(*RESPONSES["json"]),
                                                 server._HttpProtocol)
        protocol.data_received(POST)
        await asyncio.wait_for(asyncio.gather(*state.tasks), WAIT)
        timer = protocol.timeout_keep_alive_task
        assert timer is not None
        protocol.connection_lost(None)
        assert protocol.timeout_keep_alive_task is None and timer.cancelled()

    asyncio.run(main())


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.005)


# ------------------------------------------------------------ the infer handler over HTTP
INTERPRETERS = 1  # (the infer tests below: one interpreter is enough)


@pytest.fixture(scope="module")
def infer_app(manager, tmp_path_factory):
    import _serve_models

    from multipy.serve import ModelRegistry, ServeOptions, build_app

    path = tmp_path_factory.mktemp("serve") / "models.pt"
    _serve_models.write(path)
    models = {name: f"{path}:model/{name}.pkl" for name in ("affine", "weights", "gated")}
    registry = ModelRegistry(manager, models, ServeOptions(max_request_bytes=1 << 12))
    yield build_app(registry)
    registry.close()


def _post(path: str, body: bytes, *headers: bytes, version: bytes = b"1.1") -> bytes:
    return b"POST %s HTTP/%s\r\nHost: a\r\n%sContent-Length: %d\r\n\r\n%s" % (
        path.encode(), version, b"".join(h + b"\r\n" for h in headers), len(body), body)


def _infer_body(*, binary: bool = False, shape=(2, 3)) -> tuple[bytes, bytes | None]:
    import torch

    from multipy.serve.protocol import encode_request

    x = torch.arange(6, dtype=torch.float32).reshape(shape)
    body, length = encode_request([("INPUT__0", x)], binary=binary, binary_output=binary)
    return body, None if length is None else b"Inference-Header-Content-Length: %d" % length


JSON_BODY, _ = _infer_body()
BINARY_BODY, BINARY_HEADER = _infer_body(binary=True)
INFER = "/v2/models/affine/infer"
INFER_REQUESTS = {
    "json": _post(INFER, JSON_BODY),
    "binary": _post(INFER, BINARY_BODY, BINARY_HEADER),
    "HTTP/1.0": _post(INFER, JSON_BODY, version=b"1.0"),
    "Expect: 100-continue": _post(INFER, JSON_BODY, b"Expect: 100-continue"),
    "bad JSON (400)": _post(INFER, b"{nope"),
    "no such model (404)": _post("/v2/models/nope/infer", JSON_BODY),
    "too large (413)": _post(INFER, b"x" * 5000),
    "the model raises (422)": _post("/v2/models/weights/infer", _infer_body(shape=(3, 2))[0]),
}


async def _infer_exchange(app, protocol_class, wire: bytes, *, split: bool) -> list[bytes]:
    """The writes of one infer request; ``split``: the body arrives after the app
    started (so it is read through ``receive()``)."""
    protocol, transport, state = _connection(app, protocol_class)
    if split:
        head, body = wire.split(b"\r\n\r\n", 1)
        protocol.data_received(head + b"\r\n\r\n")
        await asyncio.sleep(0)  # the request's task starts, finds no body, waits for it
        protocol.data_received(body)
    else:
        protocol.data_received(wire)
    await asyncio.wait_for(asyncio.gather(*state.tasks, return_exceptions=True), WAIT)
    protocol.connection_lost(None)
    return transport.writes


@pytest.mark.parametrize("split", [False, True], ids=["whole", "body later"])
@pytest.mark.parametrize("kind", sorted(INFER_REQUESTS))
def test_infer_answers_are_uvicorns_bytes_without_asgi_messages(infer_app, kind, split,
                                                                monkeypatch):
    calls = []
    uvicorns_send, uvicorns_receive = server._Cycle.send, server._Cycle.receive

    async def send(self, message):
        calls.append(message["type"])
        await uvicorns_send(self, message)

    async def receive(self):
        calls.append("receive")
        return await uvicorns_receive(self)

    monkeypatch.setattr(server._Cycle, "send", send)
    monkeypatch.setattr(server._Cycle, "receive", receive)
    wire = INFER_REQUESTS[kind]

    async def main():
        ours = await _infer_exchange(infer_app, server._HttpProtocol, wire, split=split)
        theirs = await _infer_exchange(infer_app, httptools_impl.HttpToolsProtocol, wire,
                                       split=split)
        return ours, theirs

    ours, theirs = asyncio.run(main())
    assert b"".join(ours) == b"".join(theirs)
    expect = kind.startswith("Expect")
    status = theirs[1 if expect else 0].split(b" ")[1]
    assert status == {"bad": b"400", "no": b"404", "too": b"413", "the": b"422"}.get(
        kind.split()[0], b"200")
    if expect:  # the interim answer first, when the body is read
        assert ours[0] == b"HTTP/1.1 100 Continue\r\n\r\n"
        ours = ours[1:]
    assert len(ours) == 1  # head and body in one write
    # The answer is written without ASGI messages; the body is taken without
    # receive() when it is all there and nothing is owed first (100 Continue).
    unread = kind.split()[0] in ("too", "no")  # (refused before the body is read)
    assert calls == ([] if unread or not (split or expect) else ["receive"])


def test_a_waiting_request_whose_client_leaves_is_dropped_without_receive(infer_app,
                                                                          monkeypatch):
    import contextlib
    import os

    import _serve_models
    import torch

    from multipy.serve.protocol import encode_request

    token = os.getpid()  # the gate the requests holding the model's slots wait on
    gate = _serve_models.gate_path(token)

    def gated() -> bytes:
        body, _ = encode_request([("t", torch.tensor([token])), ("x", torch.tensor([1.0]))])
        return _post("/v2/models/gated/infer", body)

    received = []
    uvicorns_receive = server._Cycle.receive

    async def receive(self):
        received.append(self)
        return await uvicorns_receive(self)

    monkeypatch.setattr(server._Cycle, "receive", receive)
    model = infer_app.state.registry.get("gated")
    metrics = infer_app.state.metrics

    async def main():
        busy = []  # connections whose requests hold every slot of the model
        try:
            for _ in range(model.slots):
                protocol, transport, state = _connection(infer_app, server._HttpProtocol)
                protocol.data_received(gated())
                busy.append(state)
                await asyncio.wait_for(_until(lambda: model.running == len(busy)), WAIT)
            protocol, transport, state = _connection(infer_app, server._HttpProtocol)
            protocol.data_received(gated())
            await asyncio.wait_for(_until(lambda: model.waiting == 1), WAIT)
            protocol.connection_lost(None)  # the client leaves while its request waits
            await asyncio.wait_for(asyncio.gather(*state.tasks), WAIT)
            assert transport.writes == []  # nothing answered
            assert model.waiting == 0
        finally:
            open(gate, "w").close()  # the held requests end
        for other in busy:
            await asyncio.wait_for(asyncio.gather(*other.tasks), WAIT)
        return len(busy)

    ran = model.batch_sizes().get(1, 0)
    with contextlib.suppress(FileNotFoundError):
        os.remove(gate)  # (left by an earlier run of this process id)
    try:
        busy = asyncio.run(main())
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(gate)
    assert metrics._requests[("gated", 499)] == 1
    assert model.batch_sizes().get(1, 0) == ran + busy  # the abandoned request never ran
    assert received == []  # watched by the protocol, not by stepping receive()
