"""multipy.ray: the v2 server as a Ray Serve application, on a local Ray.

One Ray instance (4 CPUs, loopback only) and one application of two replicas
of one interpreter each serve the whole module: requests from httpx and
tritonclient through Serve's HTTP proxy and from Python through a
DeploymentHandle, the weights of a large model shared by both replicas, and
an interpreter killed under load.  Everything is shut down at the end.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'multipy[ray]' "
                    "(make test installs it)")
httpx = pytest.importorskip("httpx", reason="the Ray tests talk HTTP with httpx (test extra)")
tritonhttp = pytest.importorskip("tritonclient.http", reason="tritonclient[http] (test extra)")
pytest.importorskip("starlette", reason="multipy.ray serves the app of the serve extra")

import multipy.ray  # noqa: E402
from multipy.bench.ray_serve import (deploy, local_ray, mapping_usage,  # noqa: E402
                                     replica_statistics, run_on_every_replica,
                                     write_wide_package)
from multipy.examples import generate  # noqa: E402
from multipy.serve.protocol import ModelNotFound  # noqa: E402

import _serve_models  # noqa: E402  (tests/ is on sys.path: conftest)
from _wait import wait_for  # noqa: E402

REPLICAS = 2
WIDE_MB = 128
DEADLINE = 120.0  # s: the longest any wait in this module may take


class Served:
    """The module's application: its URL, handle and the archives it serves."""

    def __init__(self, url: str, handle, smallops: Path, models: Path, wide: Path,
                 wide_bytes: int) -> None:
        self.url, self.handle = url, handle
        self.smallops, self.models, self.wide, self.wide_bytes = smallops, models, wide, wide_bytes

    def infer_url(self, model: str) -> str:
        return f"{self.url}/v2/models/{model}/infer"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("ray")
    smallops = generate(tmp, ["smallops"])["smallops"]
    models = tmp / "serve_models.pt"
    _serve_models.write(models)
    wide = tmp / "wide.pt"
    wide_bytes = write_wide_package(wide, WIDE_MB)
    with local_ray(4) as port:
        application = multipy.ray.app(
            {"smallops": smallops, "sleepy": f"{models}:model/sleepy.pkl", "wide": wide},
            interpreters=1, num_replicas=REPLICAS, retry_after=2.0)
        handle = deploy(application, name="multipy-test", route_prefix="/", timeout=DEADLINE * 2)
        url = f"http://127.0.0.1:{port}"
        # serve.run returns once the replicas run; the proxy learns the route a moment
        # later (it answers 404 or 503 until then): no client starts before it routes.
        wait_for(lambda: _ready(url), "Serve's proxy to answer /v2/health/ready with 200",
                 DEADLINE)
        yield Served(url, handle, smallops, models, wide, wide_bytes)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v2/health/ready", timeout=5.0).status_code == 200
    except httpx.HTTPError:
        return False


def _eager(archive: Path, *args):
    model = torch.package.PackageImporter(str(archive)).load_pickle("model", "model.pkl")
    with torch.no_grad():
        return model(*args)


def _v2(tensor: torch.Tensor) -> dict:
    return {"inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": list(tensor.shape),
                        "data": tensor.flatten().tolist()}]}


# ---------------------------------------------------------------- without a cluster
def test_importing_multipy_does_not_import_ray():
    code = "import sys, multipy, multipy.serve; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=DEADLINE)


def test_unknown_option_is_named_with_the_known_ones(tmp_path):
    archive = tmp_path / "m.pt"
    archive.write_bytes(b"")
    with pytest.raises(TypeError, match=r"unknown option\(s\) max_batch\b.*max_batch_size"):
        multipy.ray.app({"m": archive}, max_batch=4)


def test_a_missing_package_fails_before_any_replica_starts(tmp_path):
    with pytest.raises(FileNotFoundError, match="model 'm'.*nothing.pt"):
        multipy.ray.app({"m": tmp_path / "nothing.pt"})


def test_options_reach_the_deployment(tmp_path):
    archive = tmp_path / "m.pt"
    archive.write_bytes(b"")
    config = {"min_replicas": 1, "max_replicas": 3}
    deployment = multipy.ray.app({"m": archive}, interpreters=3, max_ongoing_requests=17,
                                 max_queued_requests=40, autoscaling_config=config
                                 )._bound_deployment
    assert deployment.max_ongoing_requests == 17
    assert deployment.max_queued_requests == 40
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3
    assert deployment.ray_actor_options["num_cpus"] == 3
    assert deployment.ray_actor_options["runtime_env"]["env_vars"] == multipy.ray.REPLICA_ENV
    assert deployment._deployment_config.logging_config["enable_access_log"] is False


def test_logging_config_overrides_the_replica_default(tmp_path):
    archive = tmp_path / "m.pt"
    archive.write_bytes(b"")
    deployment = multipy.ray.app({"m": archive}, logging_config={"enable_access_log": True,
                                                                "log_level": "WARNING"}
                                 )._bound_deployment
    logging = deployment._deployment_config.logging_config
    assert logging["enable_access_log"] is True and logging["log_level"] == "WARNING"


def test_ray_actor_options_keep_the_replica_environment_unless_overridden(tmp_path):
    archive = tmp_path / "m.pt"
    archive.write_bytes(b"")
    mine = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1", "MY_FLAG": "x"}
    options = {"num_cpus": 2, "runtime_env": {"env_vars": mine, "pip": ["x"]}}
    actor = multipy.ray.app({"m": archive}, interpreters=4,
                            ray_actor_options=options)._bound_deployment.ray_actor_options
    assert actor["num_cpus"] == 2
    assert actor["runtime_env"] == {"env_vars": mine, "pip": ["x"]}


def test_the_serve_config_example_is_valid_and_builds(tmp_path):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    text = (Path(__file__).resolve().parents[1] / "deploy" / "ray" / "serve-config.yaml").read_text()
    config = yaml.safe_load(text)
    ServeDeploySchema.model_validate(config)
    (spec,) = config["applications"]
    assert spec["import_path"] == "multipy.ray:from_config"
    archive = tmp_path / "resnet.pt"
    archive.write_bytes(b"")
    args = dict(spec["args"], models={"resnet": str(archive)})
    deployment = multipy.ray.from_config(args)._bound_deployment
    assert deployment.name == spec["deployments"][0]["name"]
    assert deployment.ray_actor_options["num_cpus"] == args["interpreters"]


def test_serve_cli_ray_flags_without_ray_exit_2(tmp_path, capsys):
    from multipy.cli import main

    archive = tmp_path / "m.pt"
    archive.write_bytes(b"")
    assert main(["serve", f"m={archive}", "--replicas", "2"]) == 2
    assert "--replicas and --address go with --ray" in capsys.readouterr().err


def test_serve_cli_ray_refuses_more_cpus_than_the_machine_has(tmp_path, capsys):
    from multipy.cli import main

    archive = tmp_path / "m.pt"
    archive.write_bytes(b"")
    assert main(["serve", f"m={archive}", "--ray", "--replicas", "1000", "--interpreters", "1"]) == 2
    assert "1000 replicas x 1 interpreters reserve 1000 CPUs" in capsys.readouterr().err


# ---------------------------------------------------------------- on the cluster
def test_two_replicas_answer_httpx_with_the_eager_result(served):
    inputs = [torch.randn(1, 16) for _ in range(8)]
    with httpx.Client(timeout=DEADLINE) as client:
        for x in inputs:
            response = client.post(served.infer_url("smallops"), json=_v2(x))
            assert response.status_code == 200, response.text
            output = response.json()["outputs"][0]
            got = torch.tensor(output["data"]).reshape(output["shape"])
            torch.testing.assert_close(got, _eager(served.smallops, x))
        assert client.get(f"{served.url}/v2/health/ready").status_code == 200
    stats = replica_statistics(served.handle, REPLICAS, timeout=DEADLINE)
    assert len({s.pid for s in stats}) == REPLICAS
    assert all(len(s.manager.interpreters) == 1 for s in stats)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_gets_the_eager_result(served, binary):
    client = tritonhttp.InferenceServerClient(served.url.removeprefix("http://"))
    try:
        assert client.is_model_ready("smallops")
        x = torch.randn(3, 16)
        given = tritonhttp.InferInput("INPUT__0", list(x.shape), "FP32")
        given.set_data_from_numpy(x.numpy(), binary_data=binary)
        wanted = tritonhttp.InferRequestedOutput("OUTPUT__0", binary_data=binary)
        result = client.infer("smallops", [given], outputs=[wanted])
        torch.testing.assert_close(torch.tensor(result.as_numpy("OUTPUT__0")),
                                   _eager(served.smallops, x))
    finally:
        client.close()


def test_a_deployment_handle_serves_python_callers(served):
    x = torch.randn(2, 16)
    got = served.handle.infer.remote("smallops", x).result(timeout_s=DEADLINE)
    torch.testing.assert_close(got, _eager(served.smallops, x))
    with pytest.raises(ModelNotFound, match="'nope'.*smallops"):
        served.handle.infer.remote("nope", x).result(timeout_s=DEADLINE)


def test_two_replicas_on_one_machine_hold_one_copy_of_the_weights(served):
    """Each replica's interpreter maps every page of the package file; the page
    cache holds them once, so their PSS adds up to one copy, not two."""
    args = torch.package.PackageImporter(str(served.wide)).load_pickle("model", "example.pkl")
    stats = run_on_every_replica(served.handle, "wide", args, REPLICAS, timeout=DEADLINE)
    interpreters = [i.pid for s in stats for i in s.manager.interpreters]
    usage = [mapping_usage(pid, served.wide) for pid in interpreters]
    assert sum(rss for rss, _ in usage) >= 1.8 * served.wide_bytes  # both map all of it...
    assert sum(pss for _, pss in usage) <= 1.1 * served.wide_bytes  # ...and share one copy
    import psutil

    for pid in interpreters:  # and no interpreter made a private copy elsewhere
        assert psutil.Process(pid).memory_full_info().uss < 0.5 * served.wide_bytes


def test_a_killed_interpreter_fails_only_its_request_and_comes_back(served):
    """Six clients keep both replicas' interpreters busy with 0.5 s requests; one
    interpreter is killed: its request in flight fails with 503 at once, the
    requests queued on that replica wait for the restart, the other replica
    never notices."""
    clients, per_client = 6, 4
    seconds = torch.tensor([0.5])
    results: list[tuple[int, str]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        with httpx.Client(timeout=DEADLINE) as http:
            for i in range(per_client):
                x = torch.full((1, 4), float(k * 100 + i))
                body = {"inputs": [_v2(seconds)["inputs"][0] | {"name": "seconds"},
                                   _v2(x)["inputs"][0] | {"name": "x"}]}
                response = http.post(served.infer_url("sleepy"), json=body)
                if response.status_code == 200:
                    data = response.json()["outputs"][0]["data"]
                    assert data == x.flatten().tolist(), (k, i, data)
                with lock:
                    results.append((response.status_code, response.text))

    before = {s.pid: s for s in replica_statistics(served.handle, REPLICAS, timeout=DEADLINE)}
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        running = [pool.submit(client, k) for k in range(clients)]
        deadline = time.monotonic() + DEADLINE
        while True:  # kill an interpreter while it runs a request
            busy = [s for s in replica_statistics(served.handle, REPLICAS, timeout=DEADLINE)
                    if s.manager.interpreters[0].in_flight > 0]
            if busy:
                victim = busy[0]
                break
            assert time.monotonic() < deadline, "no interpreter got busy"
        killed = victim.manager.interpreters[0].pid
        os.kill(killed, signal.SIGKILL)
        for future in running:
            future.result(timeout=DEADLINE)
    failed = [(status, text) for status, text in results if status != 200]
    assert len(results) == clients * per_client
    assert len(failed) == 1, failed
    status, text = failed[0]
    assert status == 503 and "SIGKILL" in text, failed
    after = {s.pid: s for s in replica_statistics(served.handle, REPLICAS, timeout=DEADLINE)}
    assert set(after) == set(before)  # no replica was replaced: the pool restarted its own
    restarted = after[victim.pid].manager.interpreters[0]
    assert restarted.restarts == 1 and restarted.pid != killed
    others = [s for pid, s in after.items() if pid != victim.pid]
    assert all(s.manager.restarts == 0 for s in others)
