"""``multipy bench ray``: what the Ray Serve path adds, and what two replicas cost in memory.

Latency: one keep-alive client sends the same v2 request (the ``smallops``
example, a 1x16 float tensor) to four servers started in the same run, in
interleaved rounds so that load elsewhere on the machine hits them alike::

    echo on uvicorn            ─┐ Serve's own proxy overhead = echo via Serve - echo on uvicorn
    echo via Serve             ─┘ (its replica set up as multipy.ray's: REPLICA_ENV, REPLICA_LOGGING)
    `multipy serve`            ─┐ added latency of the Ray path = Ray - `multipy serve`
    multipy.ray.app via Serve  ─┘ (one replica, one interpreter, same model, same request)

Each server first gets warm-up requests (connections, routes, interpreters);
a server's p50 is the median of its rounds' medians, so one round disturbed
by other work moves it little.  Beside each latency, the CPU time per request
of the server's process and its children (a replica: the Ray worker and its
interpreters) is a figure that load elsewhere barely changes.  Ray starts its
workers at nice 15, below the other servers; on a machine busy with other
work that alone delays a replica, so the bench runs them at nice 0 by default.

Memory: two replicas of one interpreter each hold a model of ~256 MB of
float32 weights, then the tiny ``smallops`` model; the PSS (proportional set
size: shared pages split between the processes mapping them) of every
replica and all its children is summed, and the difference over the weight
bytes says how many copies of the weights the machine holds.  The same is
measured for a plain Serve deployment that loads the package itself in each
replica, as a Ray Serve user would without multipy.

Example:
    >>> report = measure_ray_latency(requests=200)              # doctest: +SKIP
    >>> round(report.added_over_proxy, 2)                       # doctest: +SKIP
    1.02
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
           "run_on_every_replica", "stop_applications", "tree_cpu", "tree_pss",
           "write_wide_package"]

_MB = 1e6


# ------------------------------------------------------------------ helpers
def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_ray(num_cpus: int = 4, *, http_port: int | None = None,
              worker_niceness: int | None = None) -> Iterator[int]:
    """A Ray instance on this machine, only on loopback addresses, with Serve's
    HTTP proxy on ``127.0.0.1:<port>`` (yielded); both are shut down on exit.
    ``worker_niceness`` replaces Ray's nice value for its workers (15).

    >>> with local_ray(4) as port:                              # doctest: +SKIP
    ...     serve.run(multipy.ray.app({"simple": "simple.pt"}), route_prefix="/")
    """
    import ray
    from ray import serve

    port = http_port or free_port()
    system = {} if worker_niceness is None else {"worker_niceness": worker_niceness}
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False, _system_config=system)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no line per deployment step
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        try:
            stop_applications()
        finally:
            ray.shutdown()  # stops Serve's controller and proxy with the local Ray


def stop_applications() -> None:
    """Delete every Serve application, waiting until their replicas (and the
    interpreters they own) have stopped.

    Before stopping a Ray started here, this stops what runs on it gracefully
    without ``serve.shutdown()``: that call waits on the Serve controller
    until the controller kills itself, which Ray reports on the driver's
    stderr as failed task retries ("Task ServeController.graceful_shutdown
    failed ... killed by ray.kill").
    """
    from ray import serve

    for name in list(serve.status().applications):
        serve.delete(name)


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

    from multipy.ray import REPLICA_ENV, REPLICA_LOGGING

    # the replica settings multipy.ray uses, so that the two differ only by their app
    @serve.deployment(name="echo", logging_config=REPLICA_LOGGING,
                      ray_actor_options={"runtime_env": {"env_vars": REPLICA_ENV}})
    @serve.ingress(_echo_app)
    class Echo:
        def pid(self) -> int:
            return os.getpid()

    return Echo.bind()


@dataclasses.dataclass(frozen=True)
class RayLatencyReport:
    """One client's requests to each server, same run, in interleaved rounds.

    ``p50_ms`` is the median over the rounds of each round's median, ``p99_ms``
    over all requests; ``cpu_ms`` is the CPU time per request of the server's
    process and its children (for a replica: the Ray worker and its
    interpreters), a figure the machine's other load barely moves.
    """

    rounds: int
    per_round: int
    p50_ms: dict[str, float]
    p99_ms: dict[str, float]
    cpu_ms: dict[str, float]
    #: the nice value of Ray's workers in this run (Ray's own default is 15).
    worker_niceness: int | None = None

    @property
    def requests(self) -> int:
        return self.rounds * self.per_round

    @property
    def proxy_p50_ms(self) -> float:
        """Serve's own overhead: an echo through Serve over the same echo on uvicorn."""
        return self.p50_ms["echo via Serve"] - self.p50_ms["echo on uvicorn"]

    @property
    def added_p50_ms(self) -> float:
        """What the Ray path adds over `multipy serve` for the same model and request."""
        return self.p50_ms["multipy.ray via Serve"] - self.p50_ms["multipy serve"]

    @property
    def added_over_proxy(self) -> float:
        """The Ray path's added latency in units of Serve's own proxy overhead."""
        return self.added_p50_ms / self.proxy_p50_ms if self.proxy_p50_ms > 0 else float("nan")


@contextlib.contextmanager
def _process(argv: list[str], port: int, *, timeout: float = 180.0) -> Iterator[int]:
    """Run ``argv`` until it answers on ``port``; yield its pid; terminate it on exit."""
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
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and its descendants."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def measure_ray_latency(*, requests: int = 500, per_round: int = 50, warmup: int = 50,
                        worker_niceness: int | None = 0,
                        on_status: Callable[[str], None] | None = None) -> RayLatencyReport:
    """Time the four servers of the module docstring: ``requests`` to each, in
    rounds of ``per_round`` requests to each server in turn, after ``warmup``
    requests to each.

    ``worker_niceness`` is the nice value of Ray's worker processes (Serve's
    proxy and replicas, and the interpreters a replica starts); Ray's default
    is 15, below the other servers (0), so on a machine busy with other work a
    Serve replica would wait for the CPU longer than `multipy serve` does for
    reasons of priority alone.  ``None`` keeps Ray's default.
    """
    import httpx
    import torch

    import multipy.ray

    status = on_status or (lambda text: None)
    rounds = max(1, requests // per_round)
    archive = str(example_archive("smallops"))
    body = v2_body(torch.randn(1, 16))
    direct_port, echo_port = free_port(), free_port()
    serve_cmd = [sys.executable, "-m", "multipy", "serve", f"smallops={archive}",
                 "--interpreters", "1", "--port", str(direct_port)]
    echo_cmd = [sys.executable, "-m", "uvicorn", "--factory", "multipy.bench.ray_serve:_echo_app",
                "--host", "127.0.0.1", "--port", str(echo_port), "--log-level", "warning",
                "--no-access-log"]
    status("starting Ray, Serve, `multipy serve` and an echo app on uvicorn")
    with local_ray(4, worker_niceness=worker_niceness) as ray_port, \
            _process(serve_cmd, direct_port) as direct_pid, \
            _process(echo_cmd, echo_port) as echo_pid, httpx.Client(timeout=60.0) as client:
        echo = deploy(_echo_deployment(), name="echo", route_prefix="/e")
        handle = deploy(multipy.ray.app({"smallops": archive}, interpreters=1, num_replicas=1),
                        name="multipy", route_prefix="/m")
        infer = "/v2/models/smallops/infer"
        urls = {"echo on uvicorn": f"http://127.0.0.1:{echo_port}/echo",
                "echo via Serve": f"http://127.0.0.1:{ray_port}/e/echo",
                "multipy serve": f"http://127.0.0.1:{direct_port}{infer}",
                "multipy.ray via Serve": f"http://127.0.0.1:{ray_port}/m{infer}"}
        pids = {"echo on uvicorn": echo_pid,
                "echo via Serve": echo.pid.remote().result(timeout_s=60),
                "multipy serve": direct_pid,
                "multipy.ray via Serve": replica_statistics(handle, 1)[0].pid}
        status("warming up")
        for url in urls.values():  # connections, routes, interpreters, caches
            for _ in range(warmup):
                client.post(url, json=body).raise_for_status()
        medians: dict[str, list[float]] = {label: [] for label in urls}
        samples: dict[str, list[float]] = {label: [] for label in urls}
        cpu = dict.fromkeys(urls, 0.0)
        for r in range(rounds):
            status(f"round {r + 1} of {rounds}")
            for label, url in urls.items():
                times = []
                used = tree_cpu(pids[label])
                for _ in range(per_round):
                    start = time.perf_counter()
                    client.post(url, json=body).raise_for_status()
                    times.append(time.perf_counter() - start)
                cpu[label] += tree_cpu(pids[label]) - used
                times.sort()
                medians[label].append(quantile(times, 0.5))
                samples[label].extend(times)
    p50, p99 = {}, {}
    for label in urls:
        p50[label] = quantile(sorted(medians[label]), 0.5) * 1e3
        p99[label] = quantile(sorted(samples[label]), 0.99) * 1e3
    n = rounds * per_round
    return RayLatencyReport(rounds, per_round, p50, p99,
                            {label: cpu[label] / n * 1e3 for label in urls}, worker_niceness)


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
        nice = ("their default nice value" if latency.worker_niceness is None
                else f"nice {latency.worker_niceness}")
        lines.append(f"one client, v2 JSON (smallops 1x16), {latency.rounds} rounds of "
                     f"{latency.per_round} requests to each server in turn; Ray's workers at "
                     f"{nice}:")
        for label in latency.p50_ms:
            lines.append(f"  {label:<24} p50 {latency.p50_ms[label]:6.2f} ms   "
                         f"p99 {latency.p99_ms[label]:6.2f} ms   "
                         f"CPU {latency.cpu_ms[label]:5.2f} ms/request")
        lines.append("  (p50: median of the rounds' medians; CPU: the server's process and "
                     "its children)")
        lines.append(f"Serve's own proxy overhead (echo via Serve - echo on uvicorn): "
                     f"p50 {latency.proxy_p50_ms:.2f} ms")
        lines.append(f"added by the Ray path (multipy.ray via Serve - multipy serve): "
                     f"p50 {latency.added_p50_ms:.2f} ms = {latency.added_over_proxy:.2f}x "
                     "Serve's own proxy overhead")
    if memory is not None:
        n, mb = memory.replicas, memory.weight_bytes / _MB
        lines.append(f"{n} replicas x 1 interpreter, {mb:.0f} MB of weights, PSS of replicas + "
                     "children:")
        lines.append(f"  multipy.ray: tiny {memory.multipy_tiny / _MB:.0f} MB, big "
                     f"{memory.multipy_big / _MB:.0f} MB -> {memory.copies:.2f} copies of the "
                     "weights")
        lines.append(f"  plain Serve: tiny {memory.plain_tiny / _MB:.0f} MB, big "
                     f"{memory.plain_big / _MB:.0f} MB -> {memory.plain_copies:.2f} copies of "
                     "the weights")
    return lines
