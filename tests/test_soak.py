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
