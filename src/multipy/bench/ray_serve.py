"""``multipy bench --ray``: what the Ray Serve path adds, and what two replicas cost in memory.

Latency: one keep-alive client sends the same v2 request (the ``smallops``
example, a 1x16 float tensor) to four servers started in the same run, in
interleaved rounds so that load elsewhere on the machine hits them alike::

    echo on uvicorn            ─┐ Serve's own proxy overhead = echo via Serve - echo on uvicorn
    echo via Serve             ─┘ (its replica set up as multipy.ray's: REPLICA_ENV)
    `multipy serve`            ─┐ added latency of the Ray path = Ray - `multipy serve`
    multipy.ray.app via Serve  ─┘ (one replica, one interpreter, same model, same request)

Memory: two replicas of one interpreter each hold a model of ~256 MB of
float32 weights, then the tiny ``smallops`` model; the PSS (proportional set
size: shared pages split between the processes mapping them) of every
replica and all its children is summed, and the difference over the weight
bytes says how many copies of the weights the machine holds.  The same is
measured for a plain Serve deployment that loads the package itself in each
replica, as a Ray Serve user would without multipy.

Example:
    >>> report = measure_ray_latency(requests=200)              # doctest: +SKIP
    >>> report.added_p50_ms <= report.proxy_p50_ms              # doctest: +SKIP
    True
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..runtime.stats import quantile
from . import _child
from .targets import example_archive

__all__ = ["RayLatencyReport", "RayMemoryReport", "deploy", "local_ray", "mapping_usage",
           "measure_ray_latency", "measure_ray_memory", "ray_lines", "replica_statistics",
           "run_on_every_replica", "tree_pss", "write_wide_package"]

_MB = 1e6
_ROUND = 25  # requests per server per round


# ------------------------------------------------------------------ helpers
def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_ray(num_cpus: int = 4, *, http_port: int | None = None) -> Iterator[int]:
    """A Ray instance on this machine, only on loopback addresses, with Serve's
    HTTP proxy on ``127.0.0.1:<port>`` (yielded); both are shut down on exit.

    >>> with local_ray(4) as port:                              # doctest: +SKIP
    ...     serve.run(multipy.ray.app({"simple": "simple.pt"}), route_prefix="/")
    """
    import ray
    from ray import serve

    port = http_port or free_port()
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no line per deployment step
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def deploy(application, *, name: str, route_prefix: str | None, timeout: float = 300.0):
    """``serve.run`` that gives up after ``timeout`` s, naming the application's status."""
    import threading

    from ray import serve

    done: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            done.set_result(serve.run(application, name=name, route_prefix=route_prefix))
        except BaseException as exc:
            done.set_exception(exc)

    threading.Thread(target=run, name=f"multipy-deploy-{name}", daemon=True).start()
    try:
        return done.result(timeout)
    except concurrent.futures.TimeoutError:
        raise TimeoutError(f"Serve application {name!r} not running after {timeout:.0f} s: "
                           f"{serve.status().applications.get(name)}") from None


def replica_statistics(handle, replicas: int, *, timeout: float = 60.0) -> list:
    """The :class:`~multipy.ray.ReplicaStatistics` of ``replicas`` distinct replicas,
    asking through ``handle`` (which picks a replica per call) until each answered."""
    seen: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < replicas:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(seen)} of {replicas} replicas answered in {timeout} s")
        stats = handle.statistics.remote().result(timeout_s=timeout)
        seen[stats.pid] = stats
    return sorted(seen.values(), key=lambda s: s.pid)


def run_on_every_replica(handle, model: str, args: tuple, replicas: int, *,
                         timeout: float = 120.0) -> list:
    """Call ``model(*args)`` through ``handle`` until each of ``replicas`` replicas ran
    it at least once; their :class:`~multipy.ray.ReplicaStatistics` afterwards."""
    before = {s.pid: s.manager.calls for s in replica_statistics(handle, replicas, timeout=timeout)}
    deadline = time.monotonic() + timeout
    while True:
        handle.infer.remote(model, *args).result(timeout_s=timeout)
        stats = replica_statistics(handle, replicas, timeout=timeout)
        if all(s.manager.calls > before.get(s.pid, 0) for s in stats):
            return stats
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every replica ran {model!r} in {timeout} s")


def tree_pss(pid: int) -> int:
    """PSS (bytes) of process ``pid`` and all its descendants."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_full_info().pss
    return total


def mapping_usage(pid: int, path: str | os.PathLike) -> tuple[int, int]:
    """``(rss, pss)`` in bytes of process ``pid``'s mappings of the file ``path``."""
    import psutil

    target = os.path.realpath(path)
    rss = pss = 0
    for m in psutil.Process(pid).memory_maps(grouped=True):
        if m.path == target:
            rss += m.rss
            pss += m.pss
    return rss, pss


def write_wide_package(path: str | os.PathLike, weight_mb: float) -> int:
    """Write a model of ``weight_mb`` MB of float32 weights (4 x Linear(w, w)) in a
    child process, so the caller never holds the weights; returns its weight bytes."""
    layers = 4
    width = int((weight_mb * _MB / 4 / layers) ** 0.5)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=_child.mp_context()) as pool:
        params = pool.submit(_child.write_wide_package, os.fspath(path), width, layers).result()
    return params * 4


def v2_body(tensor) -> dict:
    """The JSON v2 request carrying ``tensor`` (FP32) as its one input."""
    return {"inputs": [{"name": "INPUT__0", "datatype": "FP32", "shape": list(tensor.shape),
                        "data": tensor.flatten().tolist()}]}


# ------------------------------------------------------------------ latency
def _echo_app():
    """A bare Starlette app answering ``POST /echo`` with its body."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def echo(request):
        return Response(await request.body(), media_type="application/json")

    return Starlette(routes=[Route("/echo", echo, methods=["POST"])])


def _echo_deployment():
    from ray import serve

    from multipy.ray import REPLICA_ENV

    # the replica setting multipy.ray uses, so that the two differ only by their app
    @serve.deployment(name="echo", ray_actor_options={"runtime_env": {"env_vars": REPLICA_ENV}})
    @serve.ingress(_echo_app)
    class Echo:
        pass

    return Echo.bind()


@dataclasses.dataclass(frozen=True)
class RayLatencyReport:
    """p50 / p99 (ms) of one client's requests to each server, same run."""

    requests: int
    p50_ms: dict[str, float]
    p99_ms: dict[str, float]

    @property
    def proxy_p50_ms(self) -> float:
        """Serve's own overhead: an echo through Serve over the same echo on uvicorn."""
        return self.p50_ms["echo via Serve"] - self.p50_ms["echo on uvicorn"]

    @property
    def added_p50_ms(self) -> float:
        """What the Ray path adds over `multipy serve` for the same model and request."""
        return self.p50_ms["multipy.ray via Serve"] - self.p50_ms["multipy serve"]



@contextlib.contextmanager
def _process(argv: list[str], port: int, *, timeout: float = 180.0) -> Iterator[None]:
    """Run ``argv`` until it answers on ``port``; terminate it on exit."""
    import httpx

    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: "
                                   f"{proc.stderr.read().decode(errors='replace')[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=2.0)
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{' '.join(argv)} did not listen on {port} in {timeout} s")
            time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure_ray_latency(*, requests: int = 500,
                        on_status: Callable[[str], None] | None = None) -> RayLatencyReport:
    """Time the four servers of the module docstring; see there."""
    import httpx
    import torch

    import multipy.ray

    status = on_status or (lambda text: None)
    archive = str(example_archive("smallops"))
    body = v2_body(torch.randn(1, 16))
    direct_port, echo_port = free_port(), free_port()
    serve_cmd = [sys.executable, "-m", "multipy", "serve", f"smallops={archive}",
                 "--interpreters", "1", "--port", str(direct_port)]
    echo_cmd = [sys.executable, "-m", "uvicorn", "--factory", "multipy.bench.ray_serve:_echo_app",
                "--host", "127.0.0.1", "--port", str(echo_port), "--log-level", "warning",
                "--no-access-log"]
    status("starting Ray, Serve, `multipy serve` and an echo app on uvicorn")
    with local_ray(4) as ray_port, _process(serve_cmd, direct_port), \
            _process(echo_cmd, echo_port), httpx.Client(timeout=60.0) as client:
        deploy(_echo_deployment(), name="echo", route_prefix="/e")
        deploy(multipy.ray.app({"smallops": archive}, interpreters=1, num_replicas=1),
               name="multipy", route_prefix="/m")
        infer = "/v2/models/smallops/infer"
        urls = {"echo on uvicorn": f"http://127.0.0.1:{echo_port}/echo",
                "echo via Serve": f"http://127.0.0.1:{ray_port}/e/echo",
                "multipy serve": f"http://127.0.0.1:{direct_port}{infer}",
                "multipy.ray via Serve": f"http://127.0.0.1:{ray_port}/m{infer}"}
        samples: dict[str, list[float]] = {label: [] for label in urls}
        for url in urls.values():  # warm up connections, routes and interpreters
            for _ in range(20):
                client.post(url, json=body).raise_for_status()
        rounds = max(1, requests // _ROUND)
        for r in range(rounds):
            status(f"round {r + 1} of {rounds}")
            for label, url in urls.items():
                for _ in range(_ROUND):
                    start = time.perf_counter()
                    client.post(url, json=body).raise_for_status()
                    samples[label].append(time.perf_counter() - start)
    p50, p99 = {}, {}
    for label, times in samples.items():
        times.sort()
        p50[label], p99[label] = quantile(times, 0.5) * 1e3, quantile(times, 0.99) * 1e3
    return RayLatencyReport(rounds * _ROUND, p50, p99)


# ------------------------------------------------------------------ memory
def _plain_deployment(path: str, replicas: int):
    """Serve without multipy: each replica loads the package itself."""
    from ray import serve

    @serve.deployment(name="plain", num_replicas=replicas)
    class Plain:
        def __init__(self, path: str) -> None:
            import torch

            importer = torch.package.PackageImporter(path)
            self.model = importer.load_pickle("model", "model.pkl")
            self.args = importer.load_pickle("model", "example.pkl")
            with torch.no_grad():
                self.model(*self.args)  # touch every weight

        def pid(self) -> int:
            return os.getpid()

    return Plain.bind(path)


@dataclasses.dataclass(frozen=True)
class RayMemoryReport:
    """Summed PSS (bytes) of two replicas and their children, per model."""

    replicas: int
    weight_bytes: int
    multipy_tiny: int
    multipy_big: int
    plain_tiny: int
    plain_big: int

    @property
    def copies(self) -> float:
        """Copies of the weights the multipy replicas hold together."""
        return (self.multipy_big - self.multipy_tiny) / self.weight_bytes

    @property
    def plain_copies(self) -> float:
        """The same for replicas that load the package themselves."""
        return (self.plain_big - self.plain_tiny) / self.weight_bytes


def _multipy_pss(path: str, replicas: int) -> int:
    from ray import serve

    import multipy.ray

    handle = deploy(multipy.ray.app({"m": path}, interpreters=1, num_replicas=replicas),
                    name="memory", route_prefix=None)
    try:
        args = _child.load_from_archive(path, "example.pkl")
        stats = run_on_every_replica(handle, "m", args, replicas)
        return sum(tree_pss(s.pid) for s in stats)
    finally:
        serve.delete("memory")


def _plain_pss(path: str, replicas: int) -> int:
    from ray import serve

    handle = deploy(_plain_deployment(path, replicas), name="plain", route_prefix=None)
    try:
        pids: set[int] = set()
        deadline = time.monotonic() + 60
        while len(pids) < replicas:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(pids)} of {replicas} replicas answered in 60 s")
            pids.add(handle.pid.remote().result(timeout_s=60))
        return sum(tree_pss(pid) for pid in pids)
    finally:
        serve.delete("plain")


def measure_ray_memory(*, weight_mb: float = 256.0, replicas: int = 2,
                       on_status: Callable[[str], None] | None = None) -> RayMemoryReport:
    """Measure both deployments with the big and the tiny model; see the module docstring."""
    status = on_status or (lambda text: None)
    tiny = str(example_archive("smallops"))
    with tempfile.TemporaryDirectory(prefix="multipy-bench-ray-") as tmp:
        big = str(Path(tmp) / "wide.pt")
        status(f"writing a {weight_mb:.0f} MB model")
        weight_bytes = write_wide_package(big, weight_mb)
        with local_ray(max(4, replicas)):
            figures = {}
            for label, path in (("tiny", tiny), ("big", big)):
                status(f"{replicas} multipy replicas, {label} model")
                figures[f"multipy_{label}"] = _multipy_pss(path, replicas)
                status(f"{replicas} plain Serve replicas, {label} model")
                figures[f"plain_{label}"] = _plain_pss(path, replicas)
    return RayMemoryReport(replicas, weight_bytes, **figures)


def ray_lines(latency: RayLatencyReport | None, memory: RayMemoryReport | None) -> list[str]:
    """The reports as plain lines."""
    lines = []
    if latency is not None:
        lines.append(f"one client, {latency.requests} requests each (v2 JSON, smallops 1x16):")
        for label in latency.p50_ms:
            lines.append(f"  {label:<24} p50 {latency.p50_ms[label]:6.2f} ms   "
                         f"p99 {latency.p99_ms[label]:6.2f} ms")
        lines.append(f"Serve's own proxy overhead (echo): p50 {latency.proxy_p50_ms:.2f} ms")
        ratio = (f" ({latency.added_p50_ms / latency.proxy_p50_ms:.2f}x Serve's proxy overhead)"
                 if latency.proxy_p50_ms > 0 else "")
        lines.append(f"added by the Ray path over `multipy serve`: p50 {latency.added_p50_ms:.2f} ms"
                     + ratio)
    if memory is not None:
        n, mb = memory.replicas, memory.weight_bytes / _MB
        lines.append(f"{n} replicas x 1 interpreter, {mb:.0f} MB of weights, PSS of replicas + "
                     "children:")
        lines.append(f"  multipy.ray: tiny {memory.multipy_tiny / _MB:.0f} MB, big "
                     f"{memory.multipy_big / _MB:.0f} MB -> {memory.copies:.2f} copies of the "
                     "weights")
        lines.append(f"  plain Serve: tiny {memory.plain_tiny / _MB:.0f} MB, big "
                     f"{memory.plain_big / _MB:.0f} MB -> {memory.plain_copies:.2f} copies")
    return lines
