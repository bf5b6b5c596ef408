"""``multipy bench serve``: `multipy serve` under HTTP load, beside its peers.

::

    for each model (identity: no-op; smallops: 40 small layers)
        start every server on a free port of 127.0.0.1, N workers / interpreters each:
            multipy serve, a bare Starlette echo app, LitServe, mosec
        warm each up; PSS of each server and every process under it
        for each of R rounds (the servers' order rotates by one each round)
            for each server, for C in 1, 16, 64:
                wrk -c C: the same v2 JSON body, POSTed for S / R seconds (at least 1)
        a row is the median of its R windows: requests/s, p50 and p99 latency;
        errors (socket errors + non-2xx) are summed
        SIGTERM, then SIGKILL after a grace period; each whole process group goes

Interleaving the rounds gives every server the same share of the machine's
states: on a shared machine whose load drifts, servers measured one after the
other would each see a different machine.  No server batches requests (multipy
serve runs with ``--max-batch-size 1``, its default; LitServe and mosec with
their defaults, which do not batch).  The servers not being measured sit idle
meanwhile; what they use then is measured and reported in the notes.

The load generator is ``wrk`` (Debian's ``wrk`` package), run on the same
machine.  LitServe and mosec are installed into a throwaway virtual
environment (``pip install litserve mosec``) that sees this environment's
torch; they are never dependencies of multipy.  Each peer parses the same
v2 JSON body and answers the same v2 JSON, calling the same packaged model
with ``torch.set_num_threads(cores // N)`` like multipy's interpreters.  A peer
that cannot be installed or started is named in the notes, not silently left out.

Example:
    >>> rows, notes = measure_serve(models=("identity",), connections=(1,), seconds=2,
    ...                             rounds=2)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .errors import BenchError
from .targets import cache_dir, example_archive

__all__ = ["PEERS", "ServeRow", "measure_serve", "schedule", "window_seconds", "serve_lines", "serve_table"]

PEERS = ("litserve", "mosec")
_MB = 1e6


@dataclasses.dataclass(frozen=True)
class ServeRow:
    """One server, model and connection count under load: the medians of its
    rounds' windows (``rounds`` of them), errors summed over them."""

    server: str
    model: str
    connections: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    pss_mb: float
    rounds: int = 1


# ------------------------------------------------------------------------- wrk
_WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[{body}]==]
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %f %f\\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


def _wrk(url: str, body: bytes, connections: int, seconds: float) -> tuple[float, float, float, int]:
    """``(requests/s, p50 ms, p99 ms, errors)`` of ``wrk`` POSTing ``body`` to ``url``."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT.replace("{body}", body.decode()))
    try:
        out = subprocess.run(
            ["wrk", "-t", str(min(2, connections)), "-c", str(connections),
             "-d", f"{window_seconds(seconds)}s", "--timeout", "10s", "-s", script.name, url],
            capture_output=True, text=True, timeout=seconds + 60)
    finally:
        os.unlink(script.name)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise BenchError(f"wrk gave no result: {out.stdout[-500:]} {out.stderr[-500:]}")
    requests, duration_us, socket_errors, status_errors, p50_us, p99_us = line.split()[1:]
    rate = int(requests) / (int(duration_us) / 1e6)
    return rate, float(p50_us) / 1e3, float(p99_us) / 1e3, int(socket_errors) + int(status_errors)


def window_seconds(seconds: float, rounds: int = 1) -> int:
    """How long one of ``rounds`` windows of a ``seconds``-long row runs: wrk takes
    whole seconds, at least one.

    >>> window_seconds(5, 3)
    2
    """
    return max(1, round(seconds / rounds))


# ---------------------------------------------------------------------- servers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Running:
    """A server process (in its own process group) and where to reach it."""

    def __init__(self, argv: list[str], port: int, path: str, body: bytes, *,
                 env: dict | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}{path}"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        self._wait_serving(body)

    def _wait_serving(self, body: bytes, limit: float = 300.0) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the server exited ({self.proc.returncode}): {self.output()}")
            request = urllib.request.Request(self.url, data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise BenchError(f"the server did not answer within {limit:.0f} s: {self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-1500:]

    def _tree(self) -> list:
        import psutil

        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def cpu_seconds(self) -> float:
        """CPU time used so far by the server and every process under it."""
        import psutil

        total = 0.0
        for p in self._tree():
            with contextlib.suppress(psutil.Error):
                times = p.cpu_times()
                total += times.user + times.system
        return total

    def pss_mb(self) -> float:
        import psutil

        total = 0
        for p in self._tree():
            with contextlib.suppress(psutil.Error):
                total += p.memory_full_info().pss
        return total / _MB

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything the server left behind
        self.proc.wait()
        self.log.close()


_ECHO_APP = """
import sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

async def echo(request):
    return Response(await request.body(), media_type="application/json")

app = Starlette(routes=[Route("/echo", echo, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""

# The peers parse and answer the same v2 JSON as multipy serve.
_PEER_COMMON = """
import json, os, sys
import torch

# From the environment: mosec's workers re-run this file with their own argv.
ARCHIVE = os.environ["BENCH_ARCHIVE"]
PORT, WORKERS = int(os.environ["BENCH_PORT"]), int(os.environ["BENCH_WORKERS"])

def load():
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORKERS))
    return torch.package.PackageImporter(ARCHIVE).load_pickle("model", "model.pkl")

def decode(doc):
    return [torch.tensor(i["data"], dtype=torch.float32).reshape(i["shape"]) for i in doc["inputs"]]

def encode(out):
    outs = out if isinstance(out, tuple) else (out,)
    return {"model_name": "model", "outputs": [
        {"name": f"OUTPUT__{k}", "datatype": "FP32", "shape": list(o.shape),
         "data": o.reshape(-1).tolist()} for k, o in enumerate(outs)]}
"""

_LITSERVE = _PEER_COMMON + """
import litserve as ls

class API(ls.LitAPI):
    def setup(self, device):
        self.model = load()
    def decode_request(self, request):
        return decode(request)
    def predict(self, inputs):
        with torch.inference_mode():
            return self.model(*inputs)
    def encode_response(self, output):
        return encode(output)

if __name__ == "__main__":
    ls.LitServer(API(), accelerator="cpu", workers_per_device=WORKERS, timeout=30).run(
        port=PORT, generate_client_file=False)
"""

_MOSEC = _PEER_COMMON + """
from mosec import Server, Worker

class Infer(Worker):
    def __init__(self):
        super().__init__()
        self.model = load()
    def forward(self, data):
        with torch.inference_mode():
            return encode(self.model(*decode(data)))

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "--port", str(PORT), "--address", "127.0.0.1"]
    server = Server()
    server.append_worker(Infer, num=WORKERS)
    server.run()
"""


def _peer_python(venv: Path, note: Callable[[str], None]) -> Path | None:
    """The throwaway venv's python with LitServe and mosec, seeing this torch; ``None``
    (and a note) when they cannot be installed here."""
    python = venv / "bin" / "python"
    marker = venv / ".multipy-peers"
    if marker.exists():
        return python
    import torch

    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    # torch is big and already here: the venv sees it after its own packages.
    (site / "_multipy_bench_torch.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", *PEERS],
                          capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        note(f"LitServe and mosec could not be installed here ({tail}); their rows are missing")
        return None
    marker.touch()
    return python


def _servers(names: Sequence[str], interpreters: int, peer_venv: Path | None,
             note: Callable[[str], None], workdir: Path):
    """``(name, start(archive, body) -> _Running)`` for each server that can run here."""
    src = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get(
        "PYTHONPATH")) if p))

    def multipy(archive: Path, body: bytes) -> _Running:
        port = _free_port()
        return _Running([sys.executable, "-m", "multipy", "serve", f"model={archive}",
                         "--interpreters", str(interpreters), "--port", str(port)],
                        port, "/v2/models/model/infer", body, env=env)

    echo_script = workdir / "echo_app.py"
    echo_script.write_text(_ECHO_APP)

    def echo(archive: Path, body: bytes) -> _Running:
        port = _free_port()
        return _Running([sys.executable, str(echo_script), str(port)], port, "/echo", body)

    out = [("multipy serve", multipy), ("starlette echo", echo)]
    wanted = [p for p in names if p in PEERS]
    if not wanted:
        return out
    python = _peer_python(peer_venv or workdir / "peers", note)
    if python is None:
        return out
    for name, source, path in (("litserve", _LITSERVE, "/predict"),
                               ("mosec", _MOSEC, "/inference")):
        if name not in wanted:
            continue
        script = workdir / f"{name}_server.py"
        script.write_text(textwrap.dedent(source))

        def start(archive: Path, body: bytes, script=script, path=path) -> _Running:
            port = _free_port()
            return _Running([str(python), str(script)], port, path, body,
                            env=dict(os.environ, BENCH_ARCHIVE=str(archive), BENCH_PORT=str(port),
                                     BENCH_WORKERS=str(interpreters)))

        out.append((name, start))
    return out


# ------------------------------------------------------------------------ measure
WIDE = "wide"        # a model of ~256 MB of weights, for the memory rows
_WIDE_MB = 256


def _archive(name: str, out: str | None, status: Callable[[str], None]) -> Path:
    """An example archive, or for ``wide`` a 4 x Linear model of 256 MB (written once)."""
    if name != WIDE:
        return example_archive(name, out)
    import concurrent.futures

    from . import _child

    path = (Path(out) if out else cache_dir()) / f"wide-{_WIDE_MB}MB.pt"
    if not path.exists():
        status(f"writing a {_WIDE_MB} MB model")
        width = int((_WIDE_MB * _MB / 4 / 4) ** 0.5)
        partial = path.with_suffix(".partial")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=_child.mp_context()) as pool:
            pool.submit(_child.write_wide_package, str(partial), width, 4).result()
        partial.rename(path)
    return path


def measure_serve(*, models: Sequence[str] = ("identity", "smallops"),
                  connections: Sequence[int] = (1, 16, 64), seconds: float = 5.0,
                  rounds: int = 3, interpreters: int = 2, peers: Sequence[str] = PEERS,
                  peer_venv: str | os.PathLike | None = None, out: str | None = None,
                  on_status: Callable[[str], None] | None = None
                  ) -> tuple[list[ServeRow], list[str]]:
    """Load every server with every model at every connection count; see the module
    docstring.  ``seconds`` per row are split over ``rounds`` interleaved windows.
    Returns the rows and notes (peers that could not run, and why; what the idle
    servers used while another was measured)."""
    if shutil.which("wrk") is None:
        raise BenchError("`multipy bench serve` needs wrk (a load generator): "
                         "apt-get install wrk")
    if rounds < 1:
        raise BenchError(f"rounds must be at least 1, got {rounds}")
    import torch

    from ..serve.protocol import encode_request

    status = on_status or (lambda text: None)
    notes: list[str] = []
    rows: list[ServeRow] = []
    archives = {m: _archive(m, out, status) for m in models}
    bodies = {}
    for m, archive in archives.items():
        example = torch.package.PackageImporter(str(archive)).load_pickle("model", "example.pkl")
        bodies[m] = encode_request([(f"INPUT__{i}", x) for i, x in enumerate(example)])[0]
    window = seconds / rounds
    with tempfile.TemporaryDirectory(prefix="multipy-bench-serve-") as tmp:
        status("preparing peers (a throwaway venv)" if peers else "preparing")
        venv = Path(peer_venv) if peer_venv else cache_dir() / "bench-serve-peers"
        servers = _servers(peers, interpreters, venv, notes.append, Path(tmp))
        for m in models:
            with contextlib.ExitStack() as stack:
                running = _start_all(servers, m, archives[m], bodies[m], notes, status, stack)
                pss = {}
                for name, server in running.items():
                    _wrk(server.url, bodies[m], max(connections), 1.0)  # warm up
                    pss[name] = server.pss_mb()
                samples = {(name, c): [] for name in running for c in connections}
                idle = []  # CPU share the servers not measured used meanwhile
                for k, name, c in schedule(list(running), connections, rounds):
                    status(f"{m}, round {k + 1}/{rounds}: {name}, {c} connection(s)")
                    others = [s for n, s in running.items() if n != name]
                    before = sum(s.cpu_seconds() for s in others)
                    started = time.monotonic()
                    samples[name, c].append(_wrk(running[name].url, bodies[m], c, window))
                    elapsed = time.monotonic() - started
                    idle.append((sum(s.cpu_seconds() for s in others) - before) / elapsed)
                rows.extend(_median_row(name, m, c, got, pss[name])
                            for (name, c), got in samples.items())
                if idle:
                    notes.append(f"{m}: the servers not being measured used {max(idle):.0%} of a "
                                 f"core at most (median {statistics.median(idle):.0%}) meanwhile")
    order = {name: i for i, (name, _) in enumerate(servers)}
    rows.sort(key=lambda r: (order[r.server], models.index(r.model)))  # stable: connections kept
    if WIDE in archives:
        from ..package import inspect_package

        weights_mb = inspect_package(archives[WIDE]).storage_bytes / _MB
        notes.extend(_copies_lines(rows, weights_mb))
    return rows, notes


def schedule(servers: Sequence[str], connections: Sequence[int], rounds: int
             ) -> Iterator[tuple[int, str, int]]:
    """``(round, server, connections)`` in the order they are measured: every round
    measures every server at every connection count, and each round starts one
    server later than the one before, so no server is always first (or last).

    >>> [(k, s) for k, s, c in schedule(["a", "b"], [1], 2)]
    [(0, 'a'), (0, 'b'), (1, 'b'), (1, 'a')]
    """
    for k in range(rounds):
        shift = k % len(servers) if servers else 0
        for name in [*servers[shift:], *servers[:shift]]:
            for c in connections:
                yield k, name, c


def _median_row(server: str, model: str, connections: int,
                windows: Sequence[tuple[float, float, float, int]], pss_mb: float) -> ServeRow:
    """A row from its windows' ``(requests/s, p50 ms, p99 ms, errors)``: the median of
    each figure, errors summed."""
    return ServeRow(server, model, connections,
                    statistics.median(w[0] for w in windows),
                    statistics.median(w[1] for w in windows),
                    statistics.median(w[2] for w in windows),
                    sum(w[3] for w in windows), pss_mb, rounds=len(windows))


def _start_all(servers, model: str, archive: Path, body: bytes, notes: list[str],
               status: Callable[[str], None], stack: contextlib.ExitStack) -> dict:
    """Start every server with ``model`` (each stopped when ``stack`` closes); the
    ones that did not start are named in ``notes``."""
    running = {}
    for name, start in servers:
        status(f"{name}: starting with {model}")
        try:
            server = start(archive, body)
        except BenchError as exc:
            notes.append(f"{name} did not start with {model}: {exc}")
            continue
        stack.callback(server.stop)
        running[name] = server
    return running


def serve_table(rows: Sequence[ServeRow], *, title: str):
    """A rich table of the rows."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("server", "model", "connections", "requests/s", "p50 ms", "p99 ms",
                   "errors", "PSS MB"):
        table.add_column(column, justify="left" if column in ("server", "model") else "right")
    for r in rows:
        table.add_row(r.server, r.model, str(r.connections), f"{r.requests_per_s:,.0f}",
                      f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", str(r.errors), f"{r.pss_mb:.0f}")
    return table


def _copies_lines(rows: Sequence[ServeRow], weights_mb: float) -> Iterator[str]:
    """How many copies of the wide model's weights each server holds:
    (its PSS with the wide model - its PSS with identity) / weights."""
    for server in dict.fromkeys(r.server for r in rows):
        wide = next((r for r in rows if r.server == server and r.model == WIDE), None)
        tiny = next((r for r in rows if r.server == server and r.model == "identity"), None)
        if wide and tiny and server != "starlette echo":
            yield (f"{server}: PSS {wide.pss_mb:.0f} MB with the {weights_mb:.0f} MB model, "
                       f"{tiny.pss_mb:.0f} MB with identity: "
                       f"{(wide.pss_mb - tiny.pss_mb) / weights_mb:.2f} copies of the weights")


def serve_lines(rows: Sequence[ServeRow]) -> Iterator[str]:
    """Ratios of multipy serve to each other server, same model and connections."""
    by = {(r.server, r.model, r.connections): r for r in rows}
    for r in rows:
        if r.server == "multipy serve":
            continue
        ours = by.get(("multipy serve", r.model, r.connections))
        if ours is None:
            continue
        yield (f"{r.model}, {r.connections} connection(s): multipy serve / {r.server}: "
               f"throughput {ours.requests_per_s / r.requests_per_s:.2f} x, "
               f"p50 {ours.p50_ms / r.p50_ms:.2f} x")

