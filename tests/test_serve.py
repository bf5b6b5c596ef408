"""The v2 app in process, through Starlette's TestClient (httpx): routes, JSON and
binary inference, every bad input, deadlines, backpressure, metrics, and
schemathesis against the server's own OpenAPI document.

One manager per module (conftest's ``manager``); each test builds the registry
it needs on it (the registry does not own the manager).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading

import pytest
import torch

pytest.importorskip("starlette", reason="needs the serve extra: pip install 'multipy[serve]'")

import _serve_models  # noqa: E402
import schemathesis  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from multipy.serve import ModelRegistry, ServeOptions, build_app  # noqa: E402
from multipy.serve.protocol import (RequestedOutput, decode_response,  # noqa: E402
                                    encode_request)

INTERPRETERS = 2


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "models.pt"
    _serve_models.write(path)
    return path


def _models(archive) -> dict[str, str]:
    return {name: f"{archive}:model/{name}.pkl" for name in ("affine", "sleepy", "named",
                                                             "weights", "mode")}


@pytest.fixture(scope="module")
def client(manager, archive):
    registry = ModelRegistry(manager, _models(archive), ServeOptions(max_request_bytes=1 << 16))
    with TestClient(build_app(registry)) as client:
        yield client
    assert not manager.closed  # the caller owns the manager: the app left it open


def _infer(client, model: str, *inputs, binary=False, **options):
    body, header = encode_request([(f"INPUT__{i}", x) for i, x in enumerate(inputs)],
                                  binary=binary, binary_output=binary, **options)
    headers = {} if header is None else {"Inference-Header-Content-Length": str(header)}
    return client.post(f"/v2/models/{model}/infer", content=body, headers=headers)


def _outputs(response) -> dict:
    assert response.status_code == 200, response.text
    header = response.headers.get("inference-header-content-length")
    return decode_response(response.content, None if header is None else int(header))


# ---------------------------------------------------------------------------- routes
def test_health_and_metadata_routes_answer_the_protocol(client, manager):
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/affine/ready").status_code == 200
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    meta = client.get("/v2/models/named").json()
    assert meta["name"] == "named" and meta["platform"] == f"multipy_{manager.backend}"
    assert [o["name"] for o in meta["outputs"]] == ["total", "largest"]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_inference_answers_with_the_models_result(client, binary):
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    response = _infer(client, "affine", x, binary=binary)
    assert response.headers["content-type"] == ("application/octet-stream" if binary
                                                else "application/json")
    assert torch.equal(_outputs(response)["OUTPUT__0"], 2 * x + 1)


def test_a_models_declared_output_names_name_its_outputs(client):
    out = _outputs(_infer(client, "named", torch.tensor([1, 5, 2])))
    assert out == {"total": torch.tensor(8), "largest": torch.tensor(5)}


def test_models_run_in_inference_mode(client):
    # The event loop's thread is in grad mode; a served model records no autograd graph.
    assert _outputs(_infer(client, "mode", torch.ones(1)))["OUTPUT__0"].tolist() == [True]


def test_the_versioned_infer_route_is_the_same_model(client):
    body, _ = encode_request([("x", torch.ones(1))])
    response = client.post("/v2/models/affine/versions/1/infer", content=body)
    assert _outputs(response)["OUTPUT__0"].tolist() == [3.0]


def test_a_request_may_ask_for_one_output_as_binary(client):
    response = _infer(client, "named", torch.tensor([1.0, 4.0]),
                      outputs=[RequestedOutput("largest", True)])
    assert response.headers["content-type"] == "application/octet-stream"
    assert _outputs(response) == {"largest": torch.tensor(4.0)}


# ------------------------------------------------------------------------- bad input
def _post(client, model: str, body: bytes, **headers):
    return client.post(f"/v2/models/{model}/infer", content=body, headers=headers)


def _spec(**fields) -> bytes:
    spec = {"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}
    spec.update(fields)
    return json.dumps({"inputs": [spec]}).encode()


@pytest.mark.parametrize("model, body, headers, status, message", [
    ("affine", b"{not json", {}, 400, "not valid JSON"),
    ("affine", _spec(datatype="FP128"), {}, 400, "unknown datatype 'FP128'"),
    ("affine", _spec(shape=[3]), {}, 400, "data has 2 elements but shape [3] needs 3"),
    ("affine", _spec(), {"Inference-Header-Content-Length": "many"}, 400, "whole number"),
    ("weights", _spec(shape=[5], data=[1.0] * 5), {}, 422, "the model raised RuntimeError"),
    ("sleepy", _spec(), {}, 422, "missing 1 required positional argument"),
    ("nope", _spec(), {}, 404, "no model 'nope' is served here"),
    ("affine", b"[" + b"0," * 40_000 + b"0]", {}, 413, "at most 65536"),
])
def test_bad_input_gets_its_status_and_a_json_error(client, model, body, headers, status,
                                                    message):
    response = _post(client, model, body, **headers)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]
    assert "Traceback" not in response.text
    assert torch.equal(_outputs(_infer(client, "affine", torch.ones(1)))["OUTPUT__0"],
                       torch.tensor([3.0]))  # nothing lost for the next request


_BINARY_BODY, _BINARY_HEADER = encode_request([("INPUT__0", torch.tensor([1.0, 2.0]))],
                                              binary=True, binary_output=True)
_CASES = [  # (model, body, headers): every answer of the infer handler
    ("affine", _spec(), {}),
    ("affine", _BINARY_BODY, {"Inference-Header-Content-Length": str(_BINARY_HEADER)}),
    ("affine", _spec(), {"Content-Type": "application/json"}),
    ("affine", b"{not json", {}),
    ("affine", _spec(datatype="FP128"), {}),
    ("affine", _spec(shape=[3]), {}),
    ("affine", _spec(data=[True, False]), {}),
    ("affine", _spec(), {"Inference-Header-Content-Length": "many"}),
    ("affine", _BINARY_BODY, {"Inference-Header-Content-Length": "100000"}),
    ("weights", _spec(shape=[5], data=[1.0] * 5), {}),
    ("sleepy", _spec(), {}),
    ("nope", _spec(), {}),
    ("affine", b"[" + b"0," * 40_000 + b"0]", {}),
]


@pytest.mark.parametrize("model, body, headers", _CASES)
def test_the_direct_infer_route_answers_as_starlettes_route_does(client, model, body, headers):
    """Infer requests skip Starlette's routing (the app's own dispatch, for speed),
    except under a root_path: both ways give the same status, headers and body."""
    routed = TestClient(client.app, root_path="/api")  # (no `with`: the lifespan is client's)
    direct = client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
    through = routed.post(f"/api/v2/models/{model}/infer", content=body, headers=headers)
    assert through.request.url.path.startswith("/api/")
    assert (direct.status_code, direct.content) == (through.status_code, through.content)
    assert direct.headers == through.headers
    if direct.status_code != 200:
        assert "error" in direct.json() and "Traceback" not in direct.text


def test_a_body_streamed_past_the_limit_is_refused_without_a_content_length(client):
    response = client.post("/v2/models/affine/infer", content=iter([b"x" * 50_000] * 2))
    assert response.status_code == 413
    assert "over 65536 bytes" in response.json()["error"]


def test_a_body_in_several_asgi_messages_is_read_whole(client):
    """As an ASGI server hands over a body that arrives in pieces: one
    ``http.request`` message per piece, ``more_body`` on all but the last."""
    body, _ = encode_request([("INPUT__0", torch.tensor([1.0, 2.0]))])
    messages = [{"type": "http.request", "body": body[i:i + 7], "more_body": i + 7 < len(body)}
                for i in range(0, len(body), 7)]
    sent = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v2/models/affine/infer",
             "root_path": "", "headers": [(b"content-type", b"application/json")]}
    asyncio.run(client.app(scope, receive, send))
    assert sent[0]["status"] == 200, sent
    assert torch.equal(decode_response(sent[1]["body"])["OUTPUT__0"], torch.tensor([3.0, 5.0]))


def test_infer_paths_of_unknown_models_are_not_remembered(client):
    """The app remembers the model name of each infer path it parsed, for the
    served models only: paths naming other models cannot grow it."""
    for i in range(50):
        assert _post(client, f"nope{i}", _spec()).status_code == 404
    assert set(client.app._paths.values()) <= set(client.app.state.registry.names())
    assert _infer(client, "affine", torch.ones(1)).status_code == 200


def test_unknown_routes_and_methods_answer_json_errors(client):
    assert client.get("/v3/nothing").json() == {
        "error": "no route '/v3/nothing'; see /v2/openapi.json"}
    response = client.get("/v2/models/affine/infer")
    assert response.status_code == 405 and "GET is not allowed" in response.json()["error"]


# ------------------------------------------------------------ deadlines, backpressure
@pytest.fixture(scope="module")
def narrow(manager, archive):
    """One interpreter per model and a queue of one: easy to fill."""
    registry = ModelRegistry(manager, _models(archive),
                             ServeOptions(workers_per_model=1, max_queue=1, retry_after=3))
    with TestClient(build_app(registry)) as client:
        yield client


def _sleep(client, seconds: float, **options):
    return _infer(client, "sleepy", torch.tensor([seconds]), torch.tensor([seconds]), **options)


def _when(condition, what: str, *, limit: float = 30.0) -> None:
    """Wait (bounded) for ``condition()``."""
    done = threading.Event()
    for _ in range(int(limit / 0.01)):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _model(client, name):
    return client.app.state.registry.get(name)


def test_a_request_past_its_deadline_answers_504(client):
    response = _sleep(client, 2.0, timeout=0.2)
    assert response.status_code == 504
    assert "deadline passed before the model's answer" in response.json()["error"]


def test_a_request_with_an_earlier_deadline_than_one_running_answers_504(client, manager):
    """The running requests' deadlines share one timer, set for the earliest: a
    request whose deadline comes before that of one already running sets it earlier."""
    _idle(manager)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        sleepy = _model(client, "sleepy")
        first = pool.submit(_sleep, client, 2.0)  # the default deadline: 30 s
        _when(lambda: sleepy.running == 1, "the first request to run")
        second = _sleep(client, 2.0, timeout=0.2)  # on the other interpreter: it would answer 200
        assert second.status_code == 504, second.text
        assert first.result().status_code == 200


def test_each_running_request_answers_504_at_its_own_deadline(client, manager):
    """Once the shared timer has cancelled the earliest request, it is set for the
    next deadline: a later one is still watched."""
    _idle(manager)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        sleepy = _model(client, "sleepy")
        first = pool.submit(_sleep, client, 2.0, timeout=0.2)
        _when(lambda: sleepy.running == 1, "the first request to run")
        second = _sleep(client, 2.0, timeout=0.6)  # its call would end (200) after 2 s
        assert first.result().status_code == 504
        assert second.status_code == 504, second.text


def _idle(manager) -> None:
    """Wait for the calls earlier tests left running (a request past its deadline
    answers 504 while its call runs on) to end: they would count as calls here."""
    _when(lambda: sum(i.in_flight for i in manager.statistics().interpreters) == 0,
          "the interpreters to be idle")


def test_one_request_at_a_time_goes_to_the_interpreter_that_answered_the_last(client, manager):
    """Of idle interpreters, the one that went idle last takes the next request (it may
    still be polling for one; the others sleep): one at a time, one interpreter serves
    them all.  Requests that overlap still go to every interpreter."""
    _idle(manager)
    before = [i.calls for i in manager.statistics().interpreters]
    for _ in range(6):
        assert _infer(client, "affine", torch.ones(1)).status_code == 200
    calls = [i.calls - b for i, b in zip(manager.statistics().interpreters, before)]
    assert sorted(calls) == [0] * (INTERPRETERS - 1) + [6], calls
    before = [i.calls for i in manager.statistics().interpreters]
    sleepy = _model(client, "sleepy")
    with concurrent.futures.ThreadPoolExecutor(INTERPRETERS) as pool:
        running = [pool.submit(_sleep, client, 0.5) for _ in range(INTERPRETERS)]
        _when(lambda: sleepy.running == INTERPRETERS, "a request on each interpreter")
        assert [r.result().status_code for r in running] == [200] * INTERPRETERS
    calls = [i.calls - b for i, b in zip(manager.statistics().interpreters, before)]
    assert calls == [1] * INTERPRETERS, calls


def _fill(pool, client, model, seconds: float) -> list:
    """Take every slot of ``model`` with a request sleeping ``seconds``."""
    running = [pool.submit(_sleep, client, seconds) for _ in range(model.slots)]
    _when(lambda: model.running == model.slots, "every slot to be taken")
    return running


def test_a_queued_request_past_its_deadline_is_dropped_without_running(narrow, manager):
    sleepy = _model(narrow, "sleepy")
    _idle(manager)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        first = _fill(pool, narrow, sleepy, 1.5)
        calls = manager.statistics().calls
        second = _sleep(narrow, 0.0, timeout=0.2)
        assert second.status_code == 504
        assert "it was not run" in second.json()["error"]
        assert all(f.result().status_code == 200 for f in first)
    assert manager.statistics().calls == calls + len(first)  # only the first ones ran


def test_a_request_queued_in_an_interpreter_past_its_deadline_is_dropped_there(client, manager):
    """Both interpreters run a request; the next waits in one's own queue (not in
    the server's line) and is skipped there unrun when its deadline passes."""
    sleepy = _model(client, "sleepy")
    if sleepy.slots <= INTERPRETERS:
        pytest.skip("the interpreters queue no calls here (MULTIPY_PIPELINE_DEPTH=1, or pipes)")
    _idle(manager)  # else a call left running would take this test's interpreter
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = [pool.submit(_sleep, client, 1.0) for _ in range(INTERPRETERS)]
        _when(lambda: sleepy.running == INTERPRETERS, "a request on each interpreter")
        queued = _sleep(client, 600.0, timeout=0.2)  # had it run, an interpreter would stay busy
        assert sleepy.waiting == 0  # it never waited in the server's line
        assert queued.status_code == 504
        assert "deadline passed" in queued.json()["error"]
        assert all(f.result().status_code == 200 for f in first)
    _when(lambda: sum(i.in_flight for i in manager.statistics().interpreters) == 0,
          "both interpreters to be free: the queued request was skipped, not run")
    assert not sleepy.busy() and sleepy.running == 0


def test_a_request_that_left_the_line_gives_its_turn_to_the_next(narrow):
    sleepy = _model(narrow, "sleepy")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        first = _fill(pool, narrow, sleepy, 1.0)
        assert _sleep(narrow, 0.0, timeout=0.2).status_code == 504  # left the line unrun
        queued = pool.submit(_sleep, narrow, 0.0)
        _when(lambda: sleepy.waiting == 1, "the next request to wait")
        assert all(f.result().status_code == 200 for f in first)
        assert queued.result().status_code == 200  # the slot went to it, not to the one that left
    assert not sleepy.busy() and sleepy.running == 0  # every slot came back


def test_a_full_queue_answers_429_with_retry_after(narrow):
    sleepy = _model(narrow, "sleepy")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = _fill(pool, narrow, sleepy, 1.5)
        queued = pool.submit(_sleep, narrow, 0.0)
        _when(lambda: sleepy.waiting == 1, "a request to wait")
        refused = _sleep(narrow, 0.0)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "3"
        assert "--max-queue" in refused.json()["error"]
        assert all(f.result().status_code == 200 for f in running)
        assert queued.result().status_code == 200


# ------------------------------------------------------------------------------ metrics
def test_metrics_are_named_the_prometheus_way_and_count_requests(client):
    _infer(client, "affine", torch.ones(1))
    _post(client, "affine", b"{")
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    requests = {(s.labels["model"], s.labels["status"]): s.value
                for s in families["multipy_requests"].samples if s.name.endswith("_total")}
    assert requests[("affine", "200")] >= 1 and requests[("affine", "400")] >= 1
    assert families["multipy_request_duration_seconds"].type == "histogram"
    assert families["multipy_batch_size"].type == "histogram"
    for name in ("multipy_queue_depth", "multipy_requests_running", "multipy_interpreters_up",
                 "multipy_interpreters_busy", "multipy_model_weights_bytes"):
        assert families[name].type == "gauge", name
    assert families["multipy_interpreter_restarts"].type == "counter"
    assert {s.value for s in families["multipy_interpreters_up"].samples} == {INTERPRETERS}


def test_request_durations_fall_in_their_prometheus_buckets():
    from multipy.serve.metrics import Metrics

    class Closed:  # a registry with no models and a closed manager: request metrics only
        manager = type("Manager", (), {"closed": True})

        def __iter__(self):
            return iter(())

    metrics = Metrics(Closed())
    for seconds in (0.0007, 0.001, 0.003, 50.0):
        metrics.request("m", 200, seconds)
    metrics.request("m", 429, 0.0001)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert {(s.labels["status"], s.value) for s in families["multipy_requests"].samples} == {
        ("200", 4.0), ("429", 1.0)}
    samples = {(s.name, s.labels.get("le")): s.value
               for s in families["multipy_request_duration_seconds"].samples}
    assert samples["multipy_request_duration_seconds_bucket", "0.0005"] == 1  # le: at most
    assert samples["multipy_request_duration_seconds_bucket", "0.001"] == 3
    assert samples["multipy_request_duration_seconds_bucket", "0.005"] == 4
    assert samples["multipy_request_duration_seconds_bucket", "30.0"] == 4
    assert samples["multipy_request_duration_seconds_bucket", "+Inf"] == 5
    assert samples["multipy_request_duration_seconds_count", None] == 5
    assert samples["multipy_request_duration_seconds_sum", None] == pytest.approx(50.0048)


# ------------------------------------------------------------------------ schemathesis
def _operations():
    from multipy.serve.openapi import DOCUMENT

    return [(path, method) for path, item in DOCUMENT["paths"].items() for method in item]


@pytest.mark.parametrize("path, method", _operations())
def test_every_operation_keeps_the_openapi_document(client, path, method):
    """schemathesis generates valid and invalid requests from the document the
    server publishes; each answer must match it and none may be a 5xx."""
    schema = schemathesis.openapi.from_asgi("/v2/openapi.json", client.app)
    operation = schema[path][method.upper()]
    # Readiness answers 503 by design when not ready; that is not a server error.
    excluded = [schemathesis.checks.not_a_server_error] if path.endswith("ready") else []

    @given(case=operation.as_strategy())
    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case):
        case.call_and_validate(excluded_checks=excluded)

    check()


# ------------------------------------------------------------- the disconnect watch
class _Connection:
    """An ASGI ``receive`` like uvicorn's: after the body, it waits on an event until
    the client disconnects.  ``sleeps`` bare yields first (asyncio.sleep(0)), as
    some servers' receive does."""

    def __init__(self, sleeps: int = 0) -> None:
        self.left = asyncio.Event()
        self.sleeps = sleeps
        self.closed = 0  # receive() coroutines that were closed unfinished

    async def receive(self):
        try:
            for _ in range(self.sleeps):
                await asyncio.sleep(0)
            await self.left.wait()
        except GeneratorExit:
            self.closed += 1
            raise
        return {"type": "http.disconnect"}


@pytest.mark.parametrize("sleeps", [0, 2])
def test_a_request_whose_client_leaves_is_cancelled_where_it_waits(sleeps):
    from multipy.serve.app import _GONE, _unless_gone

    async def main():
        connection, started = _Connection(sleeps), asyncio.Event()
        waiting = asyncio.get_running_loop().create_future()

        async def infer():
            started.set()
            return await waiting  # in line: never answered

        task = asyncio.ensure_future(_unless_gone(infer(), connection.receive))
        await started.wait()
        connection.left.set()
        assert await task is _GONE
        assert waiting.cancelled()  # what it waited on was cancelled, not left behind
        assert not task.cancelled()

    asyncio.run(main())


def test_an_answered_request_stops_watching_its_client():
    from multipy.serve.app import _unless_gone

    async def main():
        connection = _Connection()
        assert await _unless_gone(asyncio.sleep(0, result=42), connection.receive) == 42
        assert connection.closed == 1 and not connection.left._waiters  # nothing left waiting
        connection.left.set()  # the client leaves later: nothing to cancel any more
        await asyncio.sleep(0)

    asyncio.run(main())


def test_a_receive_that_fails_leaves_the_request_unwatched_and_answered():
    from multipy.serve.app import _unless_gone

    async def main():
        async def receive():
            await asyncio.sleep(0)
            raise RuntimeError("the server's receive broke")

        waiting = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(_unless_gone(waiting, receive))
        for _ in range(3):
            await asyncio.sleep(0)
        waiting.set_result(7)
        assert await task == 7

    asyncio.run(main())
