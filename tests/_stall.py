"""What a test prints when calls it waits for do not end: the manager's books.

``describe(manager)`` is a report of the dispatcher's queues, the load balancer's
counts, and for each interpreter its lock, its posted calls in flight (their
reply slots, whether the bell watch handed them over yet), the bell's state and
the completion thread's watches, and every thread's stack: enough to tell a
request that waits in the queue from one whose reply came and was never read.
Each part is read on its own (``getattr`` with defaults): a report never raises.
"""

from __future__ import annotations

import faulthandler
import select
import struct
import tempfile
import threading

_BELL_WORD = 384  # transport.channel's _BELL: 1 while the host wants the bell rung


def _part(lines: list, title: str, read) -> None:
    try:
        lines.append(f"{title}: {read()}")
    except Exception as exc:  # noqa: BLE001 (a report of a broken state must not raise)
        lines.append(f"{title}: <{type(exc).__name__}: {exc}>")


def _readable(fd: int) -> bool:
    return fd >= 0 and bool(select.select([fd], [], [], 0)[0])


def _driver(lines: list, driver, completions) -> None:
    end = getattr(driver, "end", None)
    _part(lines, "  driver", lambda: (
        f"busy={driver._busy} posting={driver.posting} left={len(driver.left)} "
        f"buffers_untaken={sorted(driver.pending_in)} arena_held={driver.arena[0]} "
        f"finished={driver.finished.is_set()} abandoned={driver.abandoned} "
        f"answered={driver.answered} spills={sorted(driver._spills)}"))
    if end is None:
        return
    bells = driver.bells
    _part(lines, "  bell watch", lambda: (
        f"watching={bells.watching is not None} retired={bells.retired} "
        f"word={struct.unpack_from('<I', driver.memory, _BELL_WORD)[0]} "
        f"bell_r={end.bell_r} readable={_readable(end.bell_r)} closed={end.bell_closed}"))
    _part(lines, "  completions", lambda: (
        f"watches={sorted(completions._watches)} registered={sorted(completions._registered)} "
        f"calls={len(completions._calls)} timers={len(completions._timers)} "
        f"thread_alive={completions._thread is not None and completions._thread.is_alive()}"))
    for seq, posted in list(driver.posted.items()):
        call = posted.call
        _part(lines, f"  posted call {seq}", lambda: (
            f"slot={call.slot} reply_there={end.ready(call.slot)} handed={posted.handed} "
            f"dropped={posted.dropped} abandoned={posted.abandoned} "
            f"taken_by_interpreter={end.taken(call.posted_to)}"))


def describe(manager) -> str:
    """The report (a multi-line string); see the module docstring."""
    lines: list = []
    dispatcher = manager._dispatcher
    _part(lines, "dispatcher", lambda: (
        f"empty={dispatcher._empty} pumping={dispatcher._pumping} "
        f"incoming={len(dispatcher._incoming)} pending={len(dispatcher._pending)} "
        f"retries={len(dispatcher._retries)} pinned={dispatcher._n_pinned}"))
    _part(lines, "balancer load", lambda: list(manager._balancer._load))
    completions = manager._completions
    for worker in manager._workers:
        _part(lines, f"interpreter {worker.index}", lambda: (
            f"lock_held={worker.lock.locked()} posted_in_flight={worker.posted_in_flight} "
            f"calls={worker.calls} failures={worker.failures} dead={worker.dead_reason}"))
        driver = getattr(worker, "_driver", None)
        if driver is not None:
            _driver(lines, driver, completions)
    # The host's threads' stacks, as faulthandler writes them: sys._current_frames()
    # would also walk the threads of running subinterpreters (each with its own GIL
    # and allocator) and corrupt memory, on CPython 3.13.
    with tempfile.TemporaryFile("w+") as out:
        faulthandler.dump_traceback(out, all_threads=True)
        out.seek(0)
        lines.append(out.read())
    names = ", ".join(f"{t.ident:#x} {t.name}" for t in threading.enumerate())
    lines.append(f"thread names: {names}")
    return "\n".join(lines)
