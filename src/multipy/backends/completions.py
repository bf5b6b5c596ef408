"""Completions: the one thread per manager that finishes posted requests.

A *posted* request (``Worker.post``: futures, ``acall``, batches) is sent by
whichever thread dispatches it and finished by this thread when its reply is
ready; no host thread waits for it::

    dispatching thread              completion thread (multipy-completion-N)
    ------------------              ----------------------------------------
    Worker.post ─▶ send request
      watch(reply fd, finish) ───▶  epoll ─▶ reply readable ─▶ finish():
                                       read reply, release the interpreter,
                                       set the caller's future
    (thread backend: the interpreter
     thread calls wake() ────────▶  call_soon(finish))

How a backend says "the reply is ready" is its own business: a readable file
descriptor (:meth:`Completions.watch`: the process and subinterpreter
backends' reply pipes, an eventfd a native channel signals) or a call from
any thread (:meth:`Completions.call_soon`: the thread backend's interpreter
thread).  Deadlines of posted calls are timers on the same thread
(:meth:`Completions.call_at`).

The thread starts on first use and stops in :meth:`Completions.close` (the
manager's close); watches still open then are told :data:`CLOSED`.

:class:`LoopCompletions` does the same job on an asyncio event loop's own
thread, for a server whose loop both sends requests and awaits their answers:
the loop watches the reply descriptor itself, so a reply costs no hand-off to
the completion thread and back (two thread wake-ups and two GIL hand-offs)::

    event loop thread
    -----------------
    Worker.post ─▶ send request, loop.add_reader(reply fd, finish)
    ... other requests ...
    reply fd readable ─▶ finish(): read reply, release the interpreter,
                         set the caller's asyncio future (same thread: no wake-up)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import os
import select
import sys
import threading
import time
import weakref
from typing import Callable

READY = "ready"      # the watched descriptor became readable
CLOSED = "closed"    # the completion thread stopped before it did

_names = itertools.count()
_ONESHOT_IN = select.EPOLLIN | select.EPOLLONESHOT


class Completions:
    """Runs callbacks on one named thread when descriptors become readable,
    when asked from another thread, or at a deadline.

    >>> done = threading.Event()
    >>> c = Completions()
    >>> c.call_soon(done.set)
    >>> done.wait(5)
    True
    >>> c.close()
    """

    #: What :meth:`LoopCompletions.here` is for a loop: ``None``, any thread may watch.
    here = None

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"multipy-completion-{next(_names)}"
        self._lock = threading.Lock()
        self._calls: collections.deque = collections.deque()
        self._watches: dict[int, Callable[[str], None]] = {}
        # Descriptors registered with the epoll (a one-shot registration stays there,
        # disarmed, once it fired): re-armed with modify, never register's
        # FileExistsError (an exception per watch costs more than the rest of it).
        self._registered: set[int] = set()
        self._timers: list = []
        self._sequence = itertools.count()
        self._thread: threading.Thread | None = None
        self._epoll = None
        self._wake_r = self._wake_w = -1
        self._closed = False

    # -- any thread ------------------------------------------------------------
    def watch(self, fd: int, callback: Callable[[str], None], /) -> None:
        """Call ``callback(READY)`` on the completion thread once ``fd`` is
        readable (one shot), or ``callback(CLOSED)`` if the thread stops first."""
        with self._lock:
            if self._thread is None or self._closed:  # (once per posted call: no call else)
                self._start_locked()
            self._watches[fd] = callback
            epoll = self._epoll
            if fd in self._registered:  # watched before: re-arm the one-shot registration
                try:
                    epoll.modify(fd, _ONESHOT_IN)
                except FileNotFoundError:  # closed since (the epoll forgot it), maybe reused
                    epoll.register(fd, _ONESHOT_IN)
            else:
                try:
                    epoll.register(fd, _ONESHOT_IN)
                except FileExistsError:
                    epoll.modify(fd, _ONESHOT_IN)
                self._registered.add(fd)

    def watch_kept(self, fd: int, callback: Callable[[str], None], owner, /) -> None:
        """:meth:`watch` of a descriptor watched again and again (a channel's bell,
        ``owner`` its end); the same as :meth:`watch` here (the epoll keeps its
        registration between watches already)."""
        self.watch(fd, callback)

    def unwatch(self, fd: int, /) -> None:
        """Forget a :meth:`watch` of ``fd`` (before closing it): its callback will not run."""
        with self._lock:
            self._watches.pop(fd, None)
            if fd in self._registered:
                self._registered.discard(fd)
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass

    def expect(self, callback: Callable[[str], None], /) -> Callable[[], None]:
        """For backends that learn of a reply on a thread of their own: returns
        ``wake``; the first ``wake()`` (from any thread) runs ``callback(READY)``
        on the completion thread, or ``callback(CLOSED)`` runs if it stops first."""
        with self._lock:
            self._start_locked()
            key = -next(self._sequence) - 1  # never a descriptor
            self._watches[key] = callback

        def wake() -> None:
            with self._lock:
                fired = self._watches.pop(key, None)
                if fired is not None:
                    self._calls.append(lambda: fired(READY))
            if fired is not None:
                self._wake()

        return wake

    def call_soon(self, fn: Callable[[], None], /) -> None:
        """Run ``fn()`` on the completion thread (thread-safe, never blocks)."""
        with self._lock:
            self._start_locked()
            self._calls.append(fn)
        self._wake()

    def call_at(self, deadline: float, fn: Callable[[], None], /) -> list:
        """Run ``fn()`` on the completion thread at ``deadline`` (``time.monotonic``).
        Returns a handle for :meth:`cancel`."""
        entry = [deadline, next(self._sequence), fn]
        with self._lock:
            self._start_locked()
            heapq.heappush(self._timers, entry)
            first = self._timers[0] is entry
        if first:
            self._wake()
        return entry

    @staticmethod
    def cancel(handle: list, /) -> None:
        """Forget a timer of :meth:`call_at` (harmless once it ran)."""
        handle[2] = None

    def close(self) -> None:
        """Stop the thread; watches still open get ``CLOSED``.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        self._wake()
        if thread is not threading.current_thread():
            thread.join()

    # -- the completion thread ---------------------------------------------------
    def _start_locked(self) -> None:
        if self._closed:
            from ..errors import ManagerClosedError

            raise ManagerClosedError("the interpreter manager is closed")
        if self._thread is not None:
            return
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (the thread will wake anyway) or closed

    def _run(self) -> None:
        epoll, wake_r = self._epoll, self._wake_r
        try:
            while not self._closed:
                timeout = -1.0
                if self._timers:
                    # At most a day a wait (epoll's timeout is an int of ms): a
                    # timer further away is looked at again then.
                    timeout = min(max(0.0, self._timers[0][0] - time.monotonic()), 86400.0)
                try:
                    events = epoll.poll(timeout)
                except InterruptedError:
                    continue
                for fd, _ in events:
                    if fd == wake_r:
                        try:  # emptied once a read comes back short (no read to raise)
                            while len(os.read(wake_r, 4096)) == 4096:
                                pass
                        except BlockingIOError:
                            pass
                        continue
                    with self._lock:
                        callback = self._watches.pop(fd, None)
                    if callback is not None:
                        _run_callback(callback, READY)
                        callback = None  # hold nothing of a finished call (its caller's loop...)
                self._run_due()
        finally:
            self._shutdown()

    def _run_due(self) -> None:
        timers, now = self._timers, time.monotonic()
        while True:
            with self._lock:
                if timers and (timers[0][0] <= now or timers[0][2] is None):
                    fn = heapq.heappop(timers)[2]
                elif self._calls:
                    fn = self._calls.popleft()
                else:
                    return
            if fn is not None:
                _run_callback(fn)

    def _shutdown(self) -> None:
        with self._lock:
            watches, self._watches = self._watches, {}
            calls = list(self._calls)
            self._calls.clear()
            self._timers.clear()
        for fn in calls:
            _run_callback(fn)
        for callback in watches.values():
            _run_callback(callback, CLOSED)
        self._epoll.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


class LoopCompletions:
    """:class:`Completions`' interface, run on an asyncio event loop's thread.

    Only for a loop that keeps running while its calls are in flight (a
    server's): a call whose reply the loop watches is finished only when the
    loop runs.  :meth:`hand_over` moves whatever is still watched to the
    ``fallback`` completion thread; the dispatcher calls it when the manager
    closes, for loops that stopped.  ``watch`` must be called on the loop's
    thread; the other methods from any thread.

    >>> async def main():
    ...     c = LoopCompletions(asyncio.get_running_loop(), Completions())
    ...     done = asyncio.Event()
    ...     c.call_soon(done.set)
    ...     await done.wait()
    ...     return c.here()
    >>> asyncio.run(main())
    True
    """

    #: Seconds a loop polls for the reply of its lone awaited call, right after sending
    #: it, before it goes back to waiting for the bell (``MULTIPY_REPLY_POLL_US``,
    #: microseconds; 0, the default: never; on a quiet 2-core VM a 100 µs poll settled
    #: every lone request without lowering its latency, see docs/serving.md).  Only when that call is the one call in flight of the
    #: process and its interpreter was awake for it; a reply found so is settled at
    #: once (its ``await`` does not suspend) and rings no bell.  After a poll that
    #: gave up, the next lone calls on that interpreter are not polled for (1, 3, 7,
    #: ... up to 63 of them), so a model slower than the poll is rarely polled for.
    reply_poll = float(os.environ.get("MULTIPY_REPLY_POLL_US", "0")) * 1e-6

    def __init__(self, loop: asyncio.AbstractEventLoop, fallback: Completions) -> None:
        self._loop = weakref.ref(loop)  # weak: the loop may be collected with calls done
        self._fallback = fallback
        self._watches: dict[int, Callable[[str], None]] = {}
        self._reading: set[int] = set()  # descriptors the loop reads (add_reader) now
        # Descriptors read between watches (watch_kept): fd -> (owner, the loop's own
        # duplicate of it, which the loop reads and closes itself; see watch_kept).
        self._kept: dict[int, tuple] = {}
        self._timers: list = []

    def here(self) -> bool:
        """True on the loop's thread while it runs."""
        loop = asyncio._get_running_loop()
        return loop is not None and loop is self._loop()

    def watch(self, fd: int, callback: Callable[[str], None], /) -> None:
        """Like :meth:`Completions.watch`, on the loop (call it on the loop's thread)."""
        if fd in self._kept:  # a kept descriptor's number, closed since and reused
            self._drop_kept(fd)
        self._watches[fd] = callback
        if fd not in self._reading:
            self._loop().add_reader(fd, self._ready, fd)
            self._reading.add(fd)

    def watch_kept(self, fd: int, callback: Callable[[str], None], owner, /) -> None:
        """:meth:`watch` of a descriptor watched again and again while ``owner``
        (a channel's end) lives: a channel's bell, watched for each posted call.
        The loop keeps reading it between watches, so a call costs no reader added
        and removed (in uvloop, eight system calls per call).

        The loop reads its own duplicate of ``fd``, which only it closes (on its
        thread, once it stopped reading it): the reader can never outlive its
        descriptor, nor read another one that reused the number after ``owner``
        closed ``fd``.  It stops reading (and closes the duplicate) as soon as the
        descriptor is readable with no watch: a ring left over, a ring for another
        completion context's call (left in the pipe for it), or end-of-file (the
        interpreter is gone); the next watch reads it again.  Call it on the loop's
        thread."""
        kept = self._kept.get(fd)
        if kept is None or kept[0] is not owner:
            if kept is not None:  # `owner` closed its descriptor; another reused the number
                self._drop_kept(fd)
            if fd in self._reading:  # watched with watch(): stop that reader first
                self._stop_reading(fd)
            dup = os.dup(fd)
            try:
                self._loop().add_reader(dup, self._ready_kept, fd)
            except BaseException:
                os.close(dup)
                raise
            self._kept[fd] = (owner, dup)
        self._watches[fd] = callback

    def _ready_kept(self, fd: int) -> None:
        callback = self._watches.pop(fd, None)
        if callback is None:
            self._drop_kept(fd)  # readable with no watch: not read until the next one
            return
        try:  # _run_callback, written out (once per reply); its next watch keeps the reader
            callback(READY)
        except BaseException as exc:  # noqa: BLE001
            _report(exc, callback)

    def _drop_kept(self, fd: int) -> None:
        kept = self._kept.pop(fd, None)
        if kept is not None:
            loop = self._loop()
            if loop is not None and not loop.is_closed():
                with contextlib.suppress(Exception):
                    loop.remove_reader(kept[1])
            os.close(kept[1])

    def __del__(self) -> None:
        for fd in list(self._kept):
            with contextlib.suppress(Exception):
                self._drop_kept(fd)

    def unwatch(self, fd: int, /) -> None:
        """Like :meth:`Completions.unwatch` (on the loop's thread)."""
        self._watches.pop(fd, None)
        self._stop_reading(fd)
        self._drop_kept(fd)

    def _ready(self, fd: int) -> None:
        callback = self._watches.pop(fd, None)
        if callback is not None:
            _run_callback(callback, READY)
        # A busy interpreter's next call is sent from the callback, and its reply
        # watched on the same descriptor: the loop keeps reading it (no reader
        # removed and added back per call).  Else it stops reading it now, so no
        # reader outlives its watch (a descriptor closed later may be reused).
        if fd not in self._watches:
            self._stop_reading(fd)

    def _stop_reading(self, fd: int) -> None:
        if fd in self._reading:
            self._reading.discard(fd)
            loop = self._loop()
            if loop is not None:
                with contextlib.suppress(Exception):  # a closed loop watches nothing
                    loop.remove_reader(fd)

    def expect(self, callback: Callable[[str], None], /) -> Callable[[], None]:
        """Like :meth:`Completions.expect`: the first ``wake()`` runs ``callback(READY)``
        on the loop."""
        fired = threading.Lock()

        def wake() -> None:
            if fired.acquire(blocking=False):
                self.call_soon(lambda: callback(READY))

        return wake

    def call_soon(self, fn: Callable[[], None], /) -> None:
        """Run ``fn()`` on the loop (on the completion thread once the loop is closed)."""
        loop = self._loop()
        try:
            if loop is None:
                raise RuntimeError("the loop is gone")
            if asyncio._get_running_loop() is loop:  # on its thread: no wake-up to send
                loop.call_soon(_run_callback, fn)
            else:
                loop.call_soon_threadsafe(_run_callback, fn)
        except RuntimeError:
            self._fallback.call_soon(fn)

    def call_at(self, deadline: float, fn: Callable[[], None], /) -> list:
        """Like :meth:`Completions.call_at` (``deadline`` on ``time.monotonic``)."""
        entry = [deadline, 0, fn]
        self._timers.append(entry)
        self.call_soon(lambda: self._arm_timer(entry))
        return entry

    def _arm_timer(self, entry: list) -> None:
        loop = self._loop()
        loop.call_at(loop.time() + entry[0] - time.monotonic(), self._due, entry)

    def _due(self, entry: list) -> None:
        with contextlib.suppress(ValueError):
            self._timers.remove(entry)
        fn = entry[2]
        if fn is not None:
            _run_callback(fn)

    cancel = staticmethod(Completions.cancel)

    def hand_over(self) -> None:
        """Move the watches and timers of a loop that no longer runs to the
        completion thread (harmless while it runs: it keeps them)."""
        loop = self._loop()
        if loop is not None and loop.is_running():
            return
        watches, self._watches = self._watches, {}
        timers, self._timers = self._timers, []
        for fd in list(self._reading):
            self._stop_reading(fd)
        for fd in list(self._kept):
            self._drop_kept(fd)
        for fd, callback in watches.items():
            self._fallback.watch(fd, callback)
        for entry in timers:
            if entry[2] is not None:
                self._fallback.call_at(entry[0], lambda entry=entry: entry[2] and entry[2]())


def _run_callback(fn, *args) -> None:
    # A callback delivers its own errors to its caller's future; one that escapes
    # is a bug in multipy, reported without stopping the other callers' completions.
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001
        _report(exc, fn)


def _report(exc: BaseException, fn) -> None:
    """Hand ``exc`` to ``sys.unraisablehook``: the default hook accepts only its own
    argument type (a TypeError for anything else, which would end the thread),
    so its report is written here instead; a hook set by the application (e.g.
    pytest's) gets an object with the same fields."""
    hook = sys.unraisablehook
    if hook is not sys.__unraisablehook__:
        try:
            hook(_Unraisable(exc, fn))
            return
        except Exception:  # noqa: BLE001 (a hook that takes only the real type)
            pass
    import traceback

    try:
        print(f"{_Unraisable.MESSAGE}: {fn!r}", file=sys.stderr)
        traceback.print_exception(exc, file=sys.stderr)
    except Exception:  # noqa: BLE001 (stderr closed: nothing more to do)
        pass


class _Unraisable:
    MESSAGE = "multipy: a completion callback raised"

    def __init__(self, exc, obj) -> None:
        self.exc_type, self.exc_value, self.exc_traceback = type(exc), exc, exc.__traceback__
        self.err_msg = self.MESSAGE
        self.object = obj

