"""A soak test: many host threads, mixed calls, interpreters killed as it runs.

``run_soak`` drives one manager with ``threads`` host threads making a mix of
good calls, calls that raise, calls with large tensors and calls returning views
of their arguments, while a killer
thread SIGKILLs a random interpreter every ``kill_every`` seconds.  It checks
every successful result, accounts for every failure, and compares the host's
open file descriptors, threads and shared memory (multipy's memfd segments and
``/dev/shm`` files it holds open or mapped) before and after.  The test
suite runs a short form; ``multipy soak`` runs a long one.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import random
import signal
import threading
import time

_MODULE = '''
import torch

class Mixed:
    """good: x * 2; bad: raises ValueError; big: a large tensor plus one;
    view: a view of the argument (it goes back by reference, without a copy)"""
    def __call__(self, kind, x):
        if kind == "bad":
            raise ValueError("bad input, as asked")
        if kind == "big":
            return x + 1
        if kind == "view":
            return x[1:]
        return x * 2
'''


@dataclasses.dataclass(frozen=True)
class SoakReport:
    """What a soak run did and found.  ``problems`` is empty when it passed."""

    seconds: float
    threads: int
    interpreters: int
    calls: int
    good: int
    expected_errors: int
    crashed_calls: int
    kills: int
    restarts: int
    fds_before: int
    fds_after: int
    threads_before: int
    threads_after: int
    shm_leaked: tuple[str, ...]   # shared memory the host still holds after close
    problems: tuple[str, ...]

    @property
    def calls_per_second(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _shared_memory() -> set[str]:
    """The shared memory this process holds: multipy's memfd segments and any
    ``/dev/shm`` file, open as a descriptor or mapped, each named with its inode.

    Only this process is looked at, so other programs (other test runs, other
    users) creating and removing files in ``/dev/shm`` meanwhile change nothing;
    the interpreters' own segments go with their processes."""
    held = set()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(None, 5)
                if len(fields) == 6 and _shared(fields[5]):
                    held.add(f"{fields[5].strip()} (inode {fields[4]})")
        for fd in os.listdir("/proc/self/fd"):
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
                if _shared(path):
                    held.add(f"{path} (inode {os.stat(f'/proc/self/fd/{fd}').st_ino})")
            except OSError:
                pass  # closed meanwhile (the listing's own descriptor, another thread's)
    except OSError:
        pass
    return held


def _shared(path: str) -> bool:
    return path.startswith(("/memfd:multipy", "/dev/shm/")) and not path.startswith("/dev/shm/sem.")


def _kill_one(manager, rng) -> bool:
    """SIGKILL one interpreter of ``manager`` that is serving now; False when none
    is.  Signalled through a pidfd opened while the manager still names that
    process as the interpreter, so a number reused by another process is never hit."""
    up = [i for i in manager.statistics().interpreters if i.available and i.pid]
    if not up:
        return False
    chosen = rng.choice(up)
    try:
        pidfd = os.pidfd_open(chosen.pid)
    except ProcessLookupError:
        return False
    try:
        now = manager.statistics().interpreters[chosen.index]
        if (now.pid, now.generation, now.available) != (chosen.pid, chosen.generation, True):
            return False  # it died meanwhile: the descriptor may name another process
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)


def run_soak(*, threads: int = 16, seconds: float = 10.0, interpreters: int = 2,
             kill_every: float = 2.0, big_numel: int = 1 << 20, seed: int = 0,
             progress=None) -> SoakReport:
    """Run the soak and return a :class:`SoakReport`.

    >>> report = run_soak(seconds=5)                     # doctest: +SKIP
    >>> assert not report.problems, report.problems  # doctest: +SKIP
    """
    import torch

    from . import InterpreterCrashedError, InterpreterManager

    from .backends.process import ProcessBackend

    ProcessBackend.warm()  # its descriptors belong to the host's lifetime, not the run's
    shm_before = _shared_memory()
    fds_before = _open_fds()
    threads_before = threading.active_count()
    problems: list[str] = []
    counts = {"good": 0, "expected": 0, "crashed": 0}
    lock = threading.Lock()
    kills = 0

    with InterpreterManager(interpreters, num_threads=1) as manager:
        manager.register_module_source("multipy_soak", _MODULE)
        with manager.acquire_one() as s:
            mixed = s.create_movable(s.global_("multipy_soak", "Mixed")())
        stop = threading.Event()

        def drive(n: int) -> None:
            rng = random.Random(seed * 1000 + n)
            small = torch.arange(16, dtype=torch.float32) + n
            big = torch.full((big_numel,), float(n))
            while not stop.is_set():
                kind = rng.choice(("good", "good", "good", "bad", "big", "view"))
                x = big if kind == "big" else small.clone() if kind == "view" else small
                try:
                    out = mixed(kind, x)
                except ValueError:
                    outcome = "expected" if kind == "bad" else "unexpected ValueError"
                except InterpreterCrashedError:
                    outcome = "crashed"
                except Exception as exc:  # anything else is a finding
                    outcome = f"unexpected {type(exc).__name__}: {exc}"
                else:
                    want = x + 1 if kind == "big" else x[1:] if kind == "view" else x * 2
                    if kind == "bad":
                        outcome = "a bad call succeeded"
                    elif not torch.equal(out, want):
                        outcome = f"wrong result for a {kind} call"
                    else:
                        outcome = "good"
                with lock:
                    if outcome in counts:
                        counts[outcome] += 1
                    elif len(problems) < 20:
                        problems.append(outcome)

        workers = [threading.Thread(target=drive, args=(i,), daemon=True) for i in range(threads)]
        # The window starts once the interpreters serve: a slow start must not eat it.
        started = time.monotonic()
        for t in workers:
            t.start()
        rng = random.Random(seed)
        deadline = started + seconds
        next_kill = time.monotonic() + kill_every
        while time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            if progress is not None:
                progress(time.monotonic() - started, sum(counts.values()))
            if kill_every > 0 and time.monotonic() >= next_kill:
                kills += _kill_one(manager, rng)
                next_kill += kill_every
        stop.set()
        for t in workers:
            t.join(60)
            if t.is_alive():
                problems.append("a host thread hung")
        elapsed = time.monotonic() - started
        restarts = manager.statistics().restarts
    # Background restarts may still be unwinding, and exceptions kept in reference
    # cycles hold result views (an mmap keeps its own descriptor) until collected.
    for _ in range(50):
        gc.collect()
        if threading.active_count() <= threads_before and _open_fds() <= fds_before:
            break
        time.sleep(0.1)
    fds_after = _open_fds()
    threads_after = threading.active_count()
    leaked = tuple(sorted(_shared_memory() - shm_before))
    if counts["crashed"] > kills:
        problems.append(f"{counts['crashed']} calls failed as crashed but only {kills} kills were made")
    if fds_after > fds_before:
        problems.append(f"open file descriptors grew from {fds_before} to {fds_after}")
    if threads_after > threads_before:
        problems.append(f"host threads grew from {threads_before} to {threads_after}")
    if leaked:
        problems.append(f"shared memory still held after close: {', '.join(leaked)}")
    return SoakReport(
        seconds=elapsed, threads=threads, interpreters=interpreters,
        calls=sum(counts.values()), good=counts["good"], expected_errors=counts["expected"],
        crashed_calls=counts["crashed"], kills=kills, restarts=restarts,
        fds_before=fds_before, fds_after=fds_after, threads_before=threads_before,
        threads_after=threads_after, shm_leaked=leaked, problems=tuple(problems))
