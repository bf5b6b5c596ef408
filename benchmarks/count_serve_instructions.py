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
``ServedModel.infer`` alone (no body decoded or answer encoded).

Instruction counts do not depend on machine load; wall time under callgrind means
nothing.  They leave out the kernel, and the wait for the interpreter.
"""
import argparse
import asyncio
import os
import re
import subprocess

import torch

from multipy.bench.targets import example_archive
from multipy.serve import ModelRegistry, build_app
from multipy.serve.protocol import decode_request, encode_request


def _callgrind(on: bool) -> None:
    subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _instructions() -> int:
    """Instructions counted so far, all threads of this process together."""
    out = subprocess.run(["callgrind_control", "-e", str(os.getpid())], capture_output=True,
                         text=True, check=True).stdout
    return sum(int(m.replace(",", "")) for m in re.findall(r"^\s*Th\s+\d+\s+([\d,]+)", out, re.M))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("n", type=int, nargs="?", default=200)
    parser.add_argument("--layer", choices=("app", "infer"), default="app")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="requests in flight at once (64: most wait in line for an interpreter)")
    args = parser.parse_args()
    archive = example_archive("identity")
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

        one = request if args.layer == "app" else infer

        async def many(n: int) -> None:
            """``n`` requests, ``args.concurrency`` of them in flight at any time."""
            left = [n]

            async def client() -> None:
                while left[0] > 0:
                    left[0] -= 1
                    await one()

            await asyncio.gather(*(client() for _ in range(args.concurrency)))

        async def run() -> None:
            await many(100)  # warm up: the model loaded, every path taken once
            _callgrind(True)
            await many(args.n)
            counts.append(_instructions())
            _callgrind(False)

        counts: list[int] = []
        try:
            import uvloop  # what multipy serve runs on, when installed
        except ImportError:
            asyncio.run(run())
        else:
            uvloop.run(run())
    print(f"{counts[0] / args.n:,.0f} instructions per request (host)")


if __name__ == "__main__":
    main()
