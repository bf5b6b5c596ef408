"""Host instructions per `multipy serve` inference request, under callgrind.

The server's app (``multipy.serve.build_app``) answers N v2 JSON requests for the
``identity`` example (1x16 tensor) on 2 process interpreters, called in process as
the ASGI server would call it, without sockets or HTTP parsing.  Callgrind counts
only this process, and only while the N requests run::

    valgrind --tool=callgrind --trace-children=no --instr-atstart=no \\
        --callgrind-out-file=/tmp/cg.%p python benchmarks/count_serve_instructions.py 200

prints "N instructions per request (host)".  ``--concurrency 64`` keeps 64
requests in flight, as 64 HTTP connections would: most wait in line for an
interpreter.  ``--layer infer`` counts
``ServedModel.infer`` alone (no body decoded or answer encoded); ``--layer handler``
the app with the model's call left out (``ServedModel._call`` answers with its first
input at once: the handler, the body decoded, the answer encoded, the metrics).
``--layer http`` the app under the HTTP protocol ``multipy serve`` runs it with
(uvicorn's, as ``multipy.serve.server`` configures it): each request's bytes fed to
one connection's protocol (one connection per request in flight), its answer
written to a stand-in transport, so HTTP parsing and writing are counted, but not
the socket's system calls.

Instruction counts do not depend on machine load; wall time under callgrind means
nothing.  They leave out the kernel, and the wait for the interpreter.

``--waits SECONDS`` runs without callgrind instead, for that long, and prints how
often an interpreter found its request queue empty after a call (and waited for
the server: spin, then sleep) and how often that wait went to sleep, per request;
those counts depend little on machine load (the channel's counters,
``MULTIPY_CHANNEL_COUNTS=1``), CPU per request and requests/s do::

    MULTIPY_CHANNEL_COUNTS=1 python benchmarks/count_serve_instructions.py \
        --model smallops --concurrency 64 --waits 3
"""
import argparse
import asyncio
import os
import sys
import time

import torch

from _callgrind import collect, instructions
from multipy.bench.targets import example_archive
from multipy.serve import ModelRegistry, build_app
from multipy.serve.protocol import decode_request, encode_request


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("n", type=int, nargs="?", default=200)
    parser.add_argument("--layer", choices=("app", "infer", "handler", "http"), default="app")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="requests in flight at once (64: most wait in line for an interpreter)")
    parser.add_argument("--model", default="identity", help="an example model (identity, smallops)")
    parser.add_argument("--waits", type=float, default=None, metavar="SECONDS",
                        help="count interpreter waits per request for SECONDS (no callgrind)")
    args = parser.parse_args()
    archive = example_archive(args.model)
    example = torch.package.PackageImporter(str(archive)).load_pickle("model", "example.pkl")
    body = encode_request([(f"INPUT__{i}", x) for i, x in enumerate(example)])[0]
    decoded = decode_request(body)
    scope = {"type": "http", "method": "POST", "path": "/v2/models/model/infer",
             "root_path": "", "headers": [(b"content-type", b"application/json"),
                                          (b"content-length", b"%d" % len(body))]}
    with ModelRegistry.open({"model": str(archive)}, interpreters=2) as registry:
        app, model = build_app(registry), registry.get("model")

        async def request() -> None:
            sent = []
            read = []

            async def receive():
                if not read:  # the body, then nothing until the request ends (no disconnect)
                    read.append(True)
                    return {"type": "http.request", "body": body, "more_body": False}
                await asyncio.Event().wait()

            async def send(message):
                sent.append(message)

            await app(scope, receive, send)
            assert sent[0]["status"] == 200, sent

        async def infer() -> None:
            await model.infer(decoded.args)

        if args.layer == "handler":  # no call through the library: the first input back
            async def first_input(call_args):
                return call_args[0]

            model._call = first_input
        one = {"infer": infer, "http": _http_request(app, body) if args.layer == "http" else None
               }.get(args.layer, request)

        async def many(n: int) -> None:
            """``n`` requests, ``args.concurrency`` of them in flight at any time."""
            left = [n]

            async def client() -> None:
                while left[0] > 0:
                    left[0] -= 1
                    await one()

            await asyncio.gather(*(client() for _ in range(args.concurrency)))

        if args.waits is not None:
            _waits(registry, model, one, args)
            return

        async def run() -> None:
            await many(100)  # warm up: the model loaded, every path taken once
            collect(True)
            await many(args.n)
            counts.append(instructions())
            collect(False)

        counts: list[int] = []
        try:
            import uvloop  # what multipy serve runs on, when installed
        except ImportError:
            asyncio.run(run())
        else:
            uvloop.run(run())
    print(f"{counts[0] / args.n:,.0f} instructions per request (host)")


class _Transport:
    """A stand-in for one connection's socket: what is written is dropped."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data) -> None:
        self.written += len(data)

    def writelines(self, chunks) -> None:
        for data in chunks:
            self.written += len(data)

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name,
                                                                                        default)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        raise AssertionError("the connection was closed")

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _http_request(app, body: bytes):
    """``request()`` through the HTTP protocol ``multipy serve`` gives uvicorn: one
    keep-alive connection per request in flight, one request after another on each."""
    import uvicorn
    from uvicorn.server import ServerState

    from multipy.serve import server

    make = getattr(server, "_config", None)
    if make is not None:
        config = make(app, host="127.0.0.1", port=8000, log_level="warning")
    else:  # a tree before _config: uvicorn's settings there
        config = uvicorn.Config(app, lifespan="off", access_log=False, proxy_headers=False,
                                server_header=False, log_level="warning")
    config.load()
    idle = []  # (protocol, its server state) of connections between requests
    wire = (b"POST /v2/models/model/infer HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    async def request() -> None:
        # One keep-alive connection per request in flight (--concurrency), each
        # made once: a request takes an idle one, or makes one.
        if idle:
            protocol, state = idle.pop()
        else:
            state = ServerState()
            protocol = config.http_protocol_class(config=config, server_state=state,
                                                  app_state={})
            protocol.connection_made(_Transport())
        protocol.data_received(wire)
        task, = state.tasks
        await task
        assert protocol.cycle.response_complete and protocol.transport.written > 200
        idle.append((protocol, state))

    return request


def _waits(registry, model, one, args) -> None:
    """Interpreter waits and sleeps per request, CPU per request, requests/s."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from count_switches import interpreter_counters

    from multipy.bench.dispatch import _cpu_seconds

    workers = registry.manager._workers
    if os.environ.get("MULTIPY_CHANNEL_COUNTS") != "1":
        raise SystemExit("--waits reads the channel's counters: set MULTIPY_CHANNEL_COUNTS=1")

    async def run(until: float) -> int:
        done = 0

        async def client() -> None:
            nonlocal done
            while time.perf_counter() < until:
                await one()
                done += 1

        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        return done

    def counters() -> dict:
        out = [interpreter_counters(w) for w in workers]
        return {k: sum(c[k] for c in out) for k in out[0]}

    def loop(coro):
        try:
            import uvloop
        except ImportError:
            return asyncio.run(coro)
        return uvloop.run(coro)

    from multipy import _native

    loop(run(time.perf_counter() + 0.5))  # warm up
    k0, p0 = counters(), _native.counters()
    h0, i0, t0 = time.process_time(), sum(_cpu_seconds(w.pid) for w in workers), time.perf_counter()
    n = max(1, loop(run(t0 + args.waits)))
    elapsed = time.perf_counter() - t0
    h1, i1 = time.process_time(), sum(_cpu_seconds(w.pid) for w in workers)
    k1, p1 = counters(), _native.counters()
    polls = {k: (p1[k] - p0[k]) / n for k in ("polls", "poll_hits") if k in p1}
    print(f"{args.model}, {args.concurrency} in flight, {model.slots} slots: interpreter waits "
          f"{(k1['waits'] - k0['waits']) / n:.2f}, sleeps {(k1['sleeps'] - k0['sleeps']) / n:.2f}"
          + (f", sleeps a poke ended {(k1['pokes'] - k0['pokes']) / n:.2f}" if "pokes" in k1 else "")
          + (f", bells not rung {(k1['bells_skipped'] - k0['bells_skipped']) / n:.2f}"
             if "bells_skipped" in k1 else "")
          + (f"; the server polled for {polls['polls']:.2f} replies, found "
             f"{polls['poll_hits']:.2f}" if polls else "")
          + f" per request | host {(h1 - h0) / n * 1e6:.0f} µs CPU, interpreters "
          f"{(i1 - i0) / n * 1e6:.0f} µs CPU per request | {n / elapsed:,.0f} requests/s "
          f"(load {open('/proc/loadavg').read().split()[0]})")


if __name__ == "__main__":
    main()
