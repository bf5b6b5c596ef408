"""`multipy serve` as a real process on a free port of 127.0.0.1, through real
clients: tritonclient (JSON and binary), 32 concurrent httpx clients, a client
that gives up, kill -9 of an interpreter under load, and SIGTERM with a request
in flight (the last test: it stops the module's server).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'multipy[serve]'")

import _serve_models  # noqa: E402
import httpx  # noqa: E402
import psutil  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import multipy  # noqa: E402
from multipy.serve.protocol import decode_response, encode_request  # noqa: E402

SRC = str(Path(multipy.__file__).resolve().parents[1])


def _wait(condition, what: str, *, limit: float = 60.0):
    """Wait (bounded) until ``condition()`` is truthy; return its value."""
    event = threading.Event()
    for _ in range(int(limit / 0.02)):
        value = condition()
        if value:
            return value
        event.wait(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Server:
    """A `multipy serve` process; ``url`` once it listens."""

    def __init__(self, archive: Path, *extra: str) -> None:
        models = [f"{n}={archive}:model/{n}.pkl" for n in ("affine", "sleepy", "named")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "multipy", "serve", *models, "--interpreters", "2",
             "--port", "0", *extra], stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stderr.readline()  # the first line says where it listens
        if "http://" not in line:
            self.proc.kill()
            raise AssertionError(f"the server did not start: {line}{self.proc.stderr.read()}")
        self.url = line.split()[2]
        self.port = int(self.url.rsplit(":", 1)[1])
        self.lines: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def interpreter_pids(self) -> list[int]:
        """The interpreters: grandchildren of the server (children of its forkserver)."""
        me = psutil.Process(self.proc.pid)
        return [p.pid for p in me.children(recursive=True) if p.ppid() != me.pid]

    def metrics(self) -> dict:
        text = httpx.get(f"{self.url}/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    archive = tmp_path_factory.mktemp("serve") / "models.pt"
    _serve_models.write(archive)
    server = Server(archive, "--max-queue", "64")
    try:
        yield server
    finally:
        server.stop()


def _sleep_request(seconds: float) -> bytes:
    body, _ = encode_request([("s", torch.tensor([seconds])), ("x", torch.tensor([seconds]))])
    return body


# ------------------------------------------------------------------------- clients
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_infers_unchanged(server, binary):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("affine")
    assert client.get_model_metadata("named")["outputs"][0]["name"] == "total"
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    given = triton.InferInput("INPUT__0", list(x.shape), "FP32")
    given.set_data_from_numpy(x, binary_data=binary)
    wanted = triton.InferRequestedOutput("OUTPUT__0", binary_data=binary)
    result = client.infer("affine", [given], outputs=[wanted])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT__0"), 2 * x + 1)
    client.close()


def test_32_concurrent_clients_each_get_their_own_answer(server):
    def client(k: int) -> int:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for j in range(5):
                x = torch.full((2, 3), float(k * 100 + j))
                body, _ = encode_request([("x", x)])
                response = http.post("/v2/models/affine/infer", content=body)
                assert response.status_code == 200, response.text
                assert torch.equal(decode_response(response.content)["OUTPUT__0"], 2 * x + 1)
        return k

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        assert sorted(pool.map(client, range(32))) == list(range(32))


def test_a_client_that_gives_up_has_its_queued_request_dropped(server):
    def started() -> float:
        return server.metrics().get(("multipy_batch_size_count", (("model", "sleepy"),)), 0.0)

    def gone() -> float:
        return server.metrics().get(
            ("multipy_requests_total", (("model", "sleepy"), ("status", "499"))), 0.0)

    before, gone_before = started(), gone()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        busy = [pool.submit(httpx.post, f"{server.url}/v2/models/sleepy/infer",
                            content=_sleep_request(3.0), timeout=60) for _ in range(2)]
        _wait(lambda: server.metrics().get(("multipy_requests_running", (("model", "sleepy"),)))
              == 2, "both interpreters to be busy")
        # It waits (in the server's line, or in an interpreter's queue behind a
        # running call), then its client leaves.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v2/models/sleepy/infer", content=_sleep_request(0.0),
                       timeout=0.5)
        _wait(lambda: gone() == gone_before + 1, "the server to see the client leave")
        assert all(f.result().status_code == 200 for f in busy)
    assert started() == before + 2  # the abandoned request never ran


# ------------------------------------------------------------------------- failures
def test_kill_9_of_an_interpreter_fails_only_its_requests_at_once(server):
    pids = server.interpreter_pids()
    assert len(pids) == 2
    restarts_before = sum(v for (name, _), v in server.metrics().items()
                          if name == "multipy_interpreter_restarts_total")

    def call(_: int) -> tuple[int, str, str | None]:
        r = httpx.post(f"{server.url}/v2/models/sleepy/infer", content=_sleep_request(2.0),
                       timeout=60)
        return r.status_code, r.text, r.headers.get("retry-after")

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        running = [pool.submit(call, i) for i in range(6)]
        # The first two start one on each interpreter; more may wait in their queues.
        _wait(lambda: server.metrics().get(("multipy_requests_running", (("model", "sleepy"),)),
                                           0) >= 2, "a request on each interpreter")
        os.kill(pids[0], signal.SIGKILL)
        results = [f.result() for f in running]
    failed = [r for r in results if r[0] != 200]
    assert len(failed) == 1, results  # only the request running on the killed one
    status, text, retry_after = failed[0]
    assert status == 503 and retry_after == "1"
    assert "SIGKILL" in text and "retry" in text
    _wait(lambda: sum(v for (name, _), v in server.metrics().items()
                      if name == "multipy_interpreter_restarts_total") == restarts_before + 1,
          "the interpreter to restart")
    _wait(lambda: server.metrics()[("multipy_interpreters_up", ())] == 2, "both up again")
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_sigterm_finishes_the_request_in_flight_and_exits_0_leaving_nothing(server):
    pids = server.interpreter_pids()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(httpx.post, f"{server.url}/v2/models/sleepy/infer",
                                content=_sleep_request(1.5), timeout=60)
        _wait(lambda: server.metrics().get(("multipy_requests_running", (("model", "sleepy"),)))
              == 1, "the request to run")
        server.proc.send_signal(signal.SIGTERM)
        response = in_flight.result()
    assert response.status_code == 200
    assert torch.equal(decode_response(response.content)["OUTPUT__0"], torch.tensor([1.5]))
    assert server.proc.wait(timeout=60) == 0, "".join(server.lines)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/v2/health/live")
    _wait(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                          for p in pids), "the interpreters to exit")
    assert "Traceback" not in "".join(server.lines)
