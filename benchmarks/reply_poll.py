"""One request at a time through `multipy serve`'s app, with the loop's poll for a
lone call's reply on and off in alternate blocks of the same process.

The app (``multipy.serve.build_app``, the ``identity`` example on 2 process
interpreters) runs in process on uvloop under the HTTP protocol ``multipy serve``
gives uvicorn (each request's bytes fed to one connection's protocol, its answer
written to a stand-in transport: no sockets).  Blocks of requests alternate
between ``LoopCompletions.reply_poll`` at ``MULTIPY_REPLY_POLL_US`` (100 µs when
that is unset or 0) and 0 (every reply waits for the interpreter's bell in epoll),
so both see the same interpreters and the same load on the machine.  Prints, per
mode, the wall time of a request (p50, p90), the host's CPU per request and how
many requests the poll settled::

    python benchmarks/reply_poll.py [--blocks 20] [--per-block 300] [--layer http|app|infer]
"""
import argparse
import asyncio
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from count_serve_instructions import _http_request  # noqa: E402

from multipy.backends.completions import LoopCompletions  # noqa: E402
from multipy.bench.targets import example_archive  # noqa: E402
from multipy.runtime import dispatch  # noqa: E402
from multipy.serve import ModelRegistry, build_app  # noqa: E402
from multipy.serve.protocol import decode_request, encode_request  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=20, help="blocks per mode")
    parser.add_argument("--per-block", type=int, default=300)
    parser.add_argument("--layer", choices=("http", "app", "infer"), default="http")
    parser.add_argument("--model", default="identity")
    args = parser.parse_args()
    budget = LoopCompletions.reply_poll or 100e-6  # (off by default: poll 100 µs then)
    if dispatch._poll_awaited is None or budget <= 0:
        raise SystemExit("the poll needs the extension and MULTIPY_REPLY_POLL_US > 0")
    archive = example_archive(args.model)
    example = torch.package.PackageImporter(str(archive)).load_pickle("model", "example.pkl")
    body = encode_request([(f"INPUT__{i}", x) for i, x in enumerate(example)])[0]
    decoded = decode_request(body)
    scope = {"type": "http", "method": "POST", "path": "/v2/models/model/infer",
             "root_path": "", "headers": [(b"content-type", b"application/json"),
                                          (b"content-length", b"%d" % len(body))]}
    settled = [0, 0]  # settled by the poll, polled and gave up
    real_poll = dispatch._poll_awaited

    def counting(request):
        got = real_poll(request)
        settled[0] += got is True
        settled[1] += got is False
        return got

    dispatch._poll_awaited = counting
    with ModelRegistry.open({"model": str(archive)}, interpreters=2) as registry:
        app, model = build_app(registry), registry.get("model")

        async def app_request() -> None:
            sent, read = [], []

            async def receive():
                if not read:
                    read.append(True)
                    return {"type": "http.request", "body": body, "more_body": False}
                await asyncio.Event().wait()

            async def send(message):
                sent.append(message)

            await app(scope, receive, send)

        async def infer() -> None:
            await model.infer(decoded.args)

        one = {"http": _http_request(app, body), "app": app_request, "infer": infer}[args.layer]
        times = {"poll": [], "no poll": []}
        cpu = {"poll": 0.0, "no poll": 0.0}
        hits = {"poll": 0, "no poll": 0}
        gave_up = {"poll": 0, "no poll": 0}

        async def run() -> None:
            for _ in range(200):  # warm up: loaded, every path taken once
                await one()
            for block in range(2 * args.blocks):
                mode = "poll" if block % 2 == 0 else "no poll"
                LoopCompletions.reply_poll = budget if mode == "poll" else 0.0
                out, before, hit0, miss0 = times[mode], time.process_time(), *settled
                for _ in range(args.per_block):
                    t0 = time.perf_counter_ns()
                    await one()
                    out.append(time.perf_counter_ns() - t0)
                cpu[mode] += time.process_time() - before
                hits[mode] += settled[0] - hit0
                gave_up[mode] += settled[1] - miss0

        try:
            import uvloop
        except ImportError:
            asyncio.run(run())
        else:
            uvloop.run(run())
    n = args.blocks * args.per_block
    print(f"{args.model}, --layer {args.layer}, one request at a time, {args.blocks} blocks of "
          f"{args.per_block} per mode, poll {budget * 1e6:.0f} µs "
          f"(load {' '.join(open('/proc/loadavg').read().split()[:3])})")
    for mode, values in times.items():
        q = statistics.quantiles(values, n=10)
        print(f"  {mode:8} p50 {statistics.median(values) / 1e3:6.1f} µs  p90 {q[8] / 1e3:6.1f} µs"
              f"  host CPU {cpu[mode] / n * 1e6:6.1f} µs/request  settled by the poll "
              f"{hits[mode] / n:.2f}, polled in vain {gave_up[mode] / n:.2f}")


if __name__ == "__main__":
    main()
