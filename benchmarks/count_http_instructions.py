"""Instructions per HTTP request of a server process under ``wrk -c1``, under callgrind.

Starts ``multipy serve`` (the ``identity`` example, 2 process interpreters) or the
bare Starlette + uvicorn echo app of ``multipy bench serve`` under callgrind, warms
it up with ``wrk``, then counts the server process's instructions (every thread of
it, not the interpreters) while ``wrk`` sends one request at a time for SECONDS,
and prints them per request::

    python benchmarks/count_http_instructions.py multipy 10
    python benchmarks/count_http_instructions.py echo 10
    python benchmarks/count_http_instructions.py multipy 10 --keep /tmp/cg.out
    callgrind_annotate --inclusive=yes /tmp/cg.out | less     # where they go

Unlike ``count_serve_instructions.py`` (the app called in process), this counts
uvicorn's HTTP parsing and writing and the event loop's wake-ups too: with the
echo app's count beside it, what is uvicorn's and what is the app's.  Counts do
not depend on machine load; the kernel's share is left out.  Needs valgrind and wrk.
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch

from multipy.bench.serve import _ECHO_APP, _WRK_SCRIPT, _free_port
from multipy.bench.targets import example_archive
from multipy.serve.protocol import encode_request


def _wrk(url: str, script: str, seconds: int) -> int:
    """Requests ``wrk -c1`` completed in ``seconds``."""
    out = subprocess.run(["wrk", "-t1", "-c1", f"-d{seconds}s", "-s", script, url],
                         capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    requests, _, socket_errors, status_errors = (int(x) for x in line.split()[1:5])
    if socket_errors or status_errors:
        raise SystemExit(f"wrk saw errors: {line}")
    return requests


def _answers(url: str, body: bytes) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body), timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _instructions(pid: int) -> int:
    out = subprocess.run(["callgrind_control", "-e", str(pid)], capture_output=True, text=True,
                         check=True).stdout
    return sum(int(m.replace(",", "")) for m in re.findall(r"^\s*Th\s+\d+\s+([\d,]+)", out, re.M))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("server", choices=("multipy", "echo"))
    parser.add_argument("seconds", type=int, nargs="?", default=10)
    parser.add_argument("--keep", metavar="FILE", help="write the measured window's callgrind "
                        "data to FILE (for callgrind_annotate --inclusive=yes FILE)")
    parser.add_argument("--interpreters", type=int, default=2)
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"needs {tool}")
    archive = example_archive("identity")
    example = torch.package.PackageImporter(str(archive)).load_pickle("model", "example.pkl")
    body = encode_request([(f"INPUT__{i}", x) for i, x in enumerate(example)])[0]
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "post.lua")
        with open(script, "w") as f:
            f.write(_WRK_SCRIPT.replace("{body}", body.decode()))
        if args.server == "echo":
            app = os.path.join(tmp, "echo_app.py")
            with open(app, "w") as f:
                f.write(_ECHO_APP)
            command, url = [app, str(port)], f"http://127.0.0.1:{port}/echo"
        else:
            command = ["-m", "multipy", "serve", f"model={archive}", "--interpreters", str(args.interpreters),
                       "--port", str(port)]
            url = f"http://127.0.0.1:{port}/v2/models/model/infer"
        server = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--trace-children=no", "--instr-atstart=no",
             f"--callgrind-out-file={tmp}/cg.%p", sys.executable, *command],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            for _ in range(600):
                if _answers(url, body):
                    break
                if server.poll() is not None:
                    raise SystemExit("the server exited before it answered")
                time.sleep(1)
            else:
                raise SystemExit("the server did not answer within 600 s")
            _wrk(url, script, 3)  # warm up
            subprocess.run(["callgrind_control", "-i", "on", str(server.pid)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            n = _wrk(url, script, args.seconds)
            count = _instructions(server.pid)
            if args.keep:
                subprocess.run(["callgrind_control", "-i", "off", str(server.pid)], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                subprocess.run(["callgrind_control", "-d", str(server.pid)], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                dumps = sorted(f for f in os.listdir(tmp) if f.startswith(f"cg.{server.pid}."))
                shutil.copy(os.path.join(tmp, dumps[-1]), args.keep)
        finally:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    print(f"{args.server}: {n:,} requests, {count / n:,.0f} instructions per request "
          "(server process)")


if __name__ == "__main__":
    main()
