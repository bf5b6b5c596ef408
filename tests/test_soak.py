"""The soak test, short form for CI: 16 host threads, mixed calls, an
interpreter SIGKILLed every second.  ``multipy soak`` runs the long form."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from _wait import gone, wait_for
from multipy.soak import run_soak


def test_soak_under_kills_loses_nothing_and_leaks_nothing():
    report = run_soak(threads=16, seconds=8, interpreters=2, kill_every=1.0,
                      big_numel=1 << 18)
    assert not report.problems, report.problems
    # Calls of every outcome happened while interpreters were killed and restarted.
    assert report.kills >= 2 and report.restarts >= 1
    assert report.good > 0 and report.expected_errors > 0
    assert report.calls == report.good + report.expected_errors + report.crashed_calls
    assert report.crashed_calls <= report.kills
    assert report.fds_after <= report.fds_before
    assert report.threads_after <= report.threads_before
    assert report.shm_leaked == ()


@pytest.mark.slow
@pytest.mark.timeout(900)  # a 300 s soak, plus start and close
def test_soak_long_form():
    report = run_soak(threads=16, seconds=300, interpreters=2, kill_every=3.0)
    assert not report.problems, report.problems


HOST = textwrap.dedent("""
    import sys, time
    import multipy
    m = multipy.InterpreterManager(2)
    with m.acquire_one() as s:
        s.global_("builtins", "len")([1])
    print(*[i.pid for i in m.statistics().interpreters], flush=True)
    time.sleep(120)
""")


def held_in_dev_shm(pid: int) -> set[str]:
    """Files under /dev/shm that process ``pid`` has mapped or open, less
    multiprocessing's semaphores (``sem.*``, not multipy's)."""
    with open(f"/proc/{pid}/maps") as maps:
        paths = {fields[5].strip() for fields in (line.split(None, 5) for line in maps)
                 if len(fields) == 6}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            paths.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass  # closed meanwhile
    return {p for p in paths if p.startswith("/dev/shm/") and not p.startswith("/dev/shm/sem.")}


def test_workers_exit_when_the_host_is_sigkilled_and_leave_nothing_behind():
    host = subprocess.Popen([sys.executable, "-c", HOST], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in host.stdout.readline().split()]
        assert len(pids) == 2 and not any(gone(p) for p in pids)
        # multipy names nothing in /dev/shm: what the host and its workers share are
        # memfds, which go with the processes.  Only these processes are looked at, so
        # other programs' files there change nothing.
        for pid in [host.pid, *pids]:
            assert held_in_dev_shm(pid) == set(), pid
        host.send_signal(signal.SIGKILL)
        host.wait(10)
        wait_for(lambda: all(gone(p) for p in pids), "the workers to exit with their host")
    finally:
        if host.poll() is None:
            host.kill()


BUSY_HOST = textwrap.dedent("""
    import os, sys, threading, time
    import multipy
    marker = sys.argv[1]
    m = multipy.InterpreterManager(1)
    m.register_module_source("busy", "import time\\n"
                             "def run(path):\\n"
                             "    open(path, 'w').close()\\n"
                             "    while True:\\n"
                             "        time.sleep(0.05)\\n")

    def busy():
        with m.acquire_one() as s:
            s.global_("busy", "run")(marker)

    threading.Thread(target=busy, daemon=True).start()
    while not os.path.exists(marker):
        time.sleep(0.01)
    print(m.statistics().interpreters[0].pid, flush=True)
    time.sleep(120)
""")


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_a_worker_running_a_call_exits_when_the_host_is_sigkilled(tmp_path):
    # An idle worker sees its request pipe close; one running a call that never
    # returns reads no pipe, and is forked from a fork server that outlived the host
    # as long as any of its children held the server's liveness pipe.
    host = subprocess.Popen([sys.executable, "-c", BUSY_HOST, str(tmp_path / "running")],
                            stdout=subprocess.PIPE, text=True)
    worker = server = None
    try:
        worker = int(host.stdout.readline())
        server = _parent(worker)  # the fork server it was forked from
        host.send_signal(signal.SIGKILL)
        host.wait(10)
        wait_for(lambda: gone(worker), "the busy worker to exit with its host")
        wait_for(lambda: gone(server), "its fork server to exit with the host")
    finally:
        if host.poll() is None:
            host.kill()
        for pid in (worker, server):  # left behind only when this test fails
            if pid is not None and not gone(pid):
                os.kill(pid, signal.SIGKILL)
