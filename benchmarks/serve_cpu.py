"""CPU per request of each process (and thread) of a server under HTTP load.

Starts one server of ``multipy bench serve`` (``multipy serve``, mosec, ...)
with a model, loads it with ``wrk -c C`` for S seconds, and prints the CPU time
each process of the server's tree, each thread of its first process, and wrk
itself used per request (user + system, from /proc through psutil), before and
after the run, and each process's voluntary context switches per request (its
sleeps: an interpreter that sleeps between two requests switches at least once
per request; load moves this count far less than CPU times)::

    python benchmarks/serve_cpu.py --server multipy --model smallops -c 64 -s 5
    python benchmarks/serve_cpu.py --server mosec --model smallops -c 64 -s 5

On a fully loaded machine the sum is what bounds requests/s: 2 cores give
2,000 ms of CPU per second, so 2 ms per request in all caps the rate at ~1,000/s.
"""
import argparse
import contextlib
import os
import resource
import tempfile
import time
from pathlib import Path

import psutil
import torch

from multipy.bench.serve import _archive, _servers, _wrk
from multipy.serve.protocol import encode_request


def _times(proc: psutil.Process) -> dict:
    out = {}
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            name = " ".join(p.cmdline()[:3])[-60:] or p.name()
            out[p.pid] = (name, t.user, t.system, p.num_ctx_switches().voluntary)
    return out


def _threads(proc: psutil.Process) -> dict:
    out = {}
    for t in proc.threads():
        with contextlib.suppress(OSError):
            comm = Path(f"/proc/{proc.pid}/task/{t.id}/comm").read_text().strip()
            out[t.id] = (comm, t.user_time, t.system_time)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", default="multipy", choices=("multipy", "mosec", "litserve", "echo"))
    parser.add_argument("--model", default="smallops")
    parser.add_argument("-c", "--connections", type=int, default=64)
    parser.add_argument("-s", "--seconds", type=float, default=5.0)
    parser.add_argument("--interpreters", type=int, default=2)
    args = parser.parse_args()
    archive = _archive(args.model, None, lambda s: None)
    example = torch.package.PackageImporter(str(archive)).load_pickle("model", "example.pkl")
    body = encode_request([(f"INPUT__{i}", x) for i, x in enumerate(example)])[0]
    wanted = {"multipy": "multipy serve", "echo": "starlette echo"}.get(args.server, args.server)
    with tempfile.TemporaryDirectory() as tmp:
        notes = []
        servers = dict(_servers([args.server], args.interpreters, None, notes.append, Path(tmp)))
        server = servers[wanted](archive, body)
        try:
            _wrk(server.url, body, args.connections, 1.0)  # warm up
            root = psutil.Process(server.proc.pid)
            before, threads = _times(root), _threads(root)
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.monotonic()
            rate, p50, p99, errors = _wrk(server.url, body, args.connections, args.seconds)
            elapsed = time.monotonic() - started
            after, threads_after = _times(root), _threads(root)
            wrk = resource.getrusage(resource.RUSAGE_CHILDREN)
        finally:
            server.stop()
    n = rate * round(args.seconds)
    print(f"{wanted}, {args.model}, {args.connections} connections: {rate:,.0f} req/s, "
          f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, errors {errors}; loadavg "
          f"{open('/proc/loadavg').read().split()[:3]}")
    print(f"{'process':62} {'user':>8} {'sys':>8}  ms CPU per request  {'switches':>8}")
    total = 0.0
    for pid, (name, user, system, switches) in after.items():
        if pid not in before:
            continue
        u, s = user - before[pid][1], system - before[pid][2]
        total += u + s
        print(f"{name:62} {u * 1e3 / n:8.3f} {s * 1e3 / n:8.3f}  {'':17} "
              f"{(switches - before[pid][3]) / n:8.2f}")
    u, s = wrk.ru_utime - children.ru_utime, wrk.ru_stime - children.ru_stime
    print(f"{'wrk':62} {u * 1e3 / n:8.3f} {s * 1e3 / n:8.3f}")
    total += u + s
    print(f"{'all':62} {total * 1e3 / n:17.3f}   ({total / elapsed:.2f} cores busy)")
    print("threads of the server's first process:")
    for tid, (comm, user, system) in threads_after.items():
        if tid in threads:
            u, s = user - threads[tid][1], system - threads[tid][2]
            if u + s > 0.005:
                print(f"  {comm:60} {u * 1e3 / n:8.3f} {s * 1e3 / n:8.3f}")


if __name__ == "__main__":
    main()
