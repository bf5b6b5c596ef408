"""torch::deploy's load balancer: a free interpreter first, else the least loaded.

Choosing never blocks: the counters are updated under a lock held only for
the choice itself (a few hundred nanoseconds), never while waiting for an
interpreter.  The caller then queues on the chosen interpreter's own lock.
"""

from __future__ import annotations

import threading

from ..transport.channel import _native_module

#: ``take_turn(balancer) -> index | None`` and ``give_back(balancer, index) -> bool``:
#: :meth:`LoadBalancer.acquire` (without ``usable``: the same choice) and
#: :meth:`LoadBalancer.release` without its hook, in one C call each, without the
#: lock (one step under the GIL); ``None``/``False`` (nothing changed) while the
#: lock is held.  ``None`` without the extension.
take_turn = getattr(_native_module, "take_turn", None)
give_back = getattr(_native_module, "give_back", None)


class LoadBalancer:
    """Counts in-flight users per interpreter and hands out the best one.

    >>> lb = LoadBalancer(2)
    >>> a = lb.acquire(); b = lb.acquire()
    >>> sorted([a, b])
    [0, 1]
    >>> lb.release(a)
    """

    def __init__(self, n: int) -> None:
        self._load = [0] * n
        self._limit = n
        self._lock = threading.Lock()
        self._start = 0
        # The interpreter whose count went to 0 last (None: none yet).  One request
        # at a time, it is still spinning for its next request when that comes;
        # the next in turn went idle a request earlier and sleeps by then (a
        # wake-up on both sides per request).  acquire_room takes it first.
        self._warm = None
        # Called after a release (any thread): the dispatcher of posted requests
        # sends queued ones to the interpreter that became free.
        self.on_release = None

    def set_limit(self, k: int) -> None:
        """Use only the first ``k`` interpreters (``debug_limit_interpreters``)."""
        self._limit = max(1, min(k, len(self._load)))

    def acquire(self, usable=None) -> int:
        """The index to use; its load is counted until :meth:`release`.

        ``usable(index) -> bool`` excludes interpreters (down, restarting); when
        none is usable the least loaded of all is returned.
        """
        # A with block, not acquire() and try: no signal (Ctrl-C) can land between them.
        # One can land as the block lets the lock go, its count taken: see release.
        taken = None
        try:
            with self._lock:
                load, n = self._load, self._limit
                start = self._start
                self._start = (start + 1) % n
                if usable is None and start < n and not load[start]:
                    load[start] = 1  # the usual case: the next in turn is free
                    taken = start
                else:
                    best = None
                    for k in range(n):
                        i = (start + k) % n
                        if usable is not None and not usable(i):
                            continue
                        if load[i] == 0:
                            best = i
                            break
                        if best is None or load[i] < load[best]:
                            best = i
                    if best is None:
                        best = min(range(n), key=load.__getitem__)
                    load[best] += 1
                    taken = best
        except BaseException:
            if taken is not None:  # see release
                with self._lock:
                    self._load[taken] -= 1
            raise
        return taken

    def acquire_idle(self, usable=None, exclude=()) -> int | None:
        """An interpreter nobody uses now (counted until :meth:`release`), or
        ``None`` when every usable one is busy: posted requests then wait in the
        dispatcher's queue instead of behind one interpreter.

        >>> lb = LoadBalancer(1)
        >>> lb.acquire_idle(), lb.acquire_idle()
        (0, None)
        """
        return self.acquire_room(None, usable, exclude)

    def acquire_room(self, depth, usable=None, exclude=()) -> int | None:
        """The least loaded interpreter with room for one more call in flight
        (fewer than ``depth(index)``, or than 1 where ``depth`` is ``None``;
        counted until :meth:`release`), or ``None``.  Of several idle ones, the
        one that went idle last (it may still be spinning, awake), else the
        first in turn.

        "Idle" (:meth:`acquire_idle`) means nothing in flight; "room" means the
        interpreter queues calls and its queue is not full: a posted call sent
        there runs as soon as the calls before it end, with no host round trip
        in between.

        >>> lb = LoadBalancer(1)
        >>> lb.acquire_room(lambda i: 2), lb.acquire_room(lambda i: 2), lb.acquire_room(lambda i: 2)
        (0, 0, None)
        >>> lb = LoadBalancer(2)
        >>> lb.release(lb.acquire_idle()); lb.acquire_idle()  # 0 went idle last: 0 again
        0
        """
        taken = None
        try:  # as in acquire: a Ctrl-C as the lock is let go does not keep the count
            with self._lock:
                load, n = self._load, self._limit
                start = self._start
                best = self._warm
                if (best is not None and (best >= n or load[best] or best in exclude
                                          or (usable is not None and not usable(best)))):
                    best = None
                for k in range(n if best is None else 0):
                    i = (start + k) % n
                    held = load[i]
                    # The cheap tests first: usable() and depth() are Python calls,
                    # asked only of an interpreter that would be taken.
                    if (held and (depth is None or held >= depth(i))
                            or best is not None and held >= load[best] or i in exclude
                            or usable is not None and not usable(i)):
                        continue
                    best = i
                    if not held:
                        break
                if best is not None:
                    self._start = (best + 1) % n
                    load[best] += 1
                    taken = best
        except BaseException:
            if taken is not None:  # see release
                with self._lock:
                    self._load[taken] -= 1
            raise
        return taken

    def likely(self) -> int | None:
        """The interpreter that :meth:`acquire_room` would take now for a call
        that needs an idle one (``depth`` ``None``, every interpreter usable),
        without counting it; ``None`` when none is idle.  A hint, read without
        the lock: by the time the call comes another may have taken it.

        >>> lb = LoadBalancer(2)
        >>> lb.release(lb.acquire_idle()); lb.likely()  # 0 went idle last
        0
        >>> a = lb.acquire_idle(); lb.likely()  # 0 is busy: the next idle in turn
        1
        """
        load, n = self._load, self._limit
        warm = self._warm
        if warm is not None and warm < n and not load[warm]:
            return warm
        start = self._start
        for k in range(n):
            i = (start + k) % n
            if not load[i]:
                return i
        return None

    def release(self, index: int, *, notify: bool = True) -> None:
        """Give back one count of interpreter ``index`` (from :meth:`acquire`,
        :meth:`acquire_idle` or :meth:`acquire_room`), then run ``on_release``
        when ``notify``.

        All or nothing: when it raises (a Ctrl-C, handled by CPython right after
        any call returns, the lock's release included), the count was not given
        back, so a caller that gives back what it holds on an interrupt gives it
        back once.  (``on_release``'s own exceptions come after the count was
        given back: callers that recover from interrupts pass ``notify=False``.)

        >>> lb = LoadBalancer(1)
        >>> lb.release(lb.acquire()); lb.in_flight(0)
        0
        """
        # CPython handles a signal right after a call returns, and the lock's __exit__
        # is a call: a KeyboardInterrupt can come out of a with block after it changed
        # a count.  The except blocks here take such a change back; nothing in them
        # before it is a call, so no second signal lands first.
        given = False
        try:
            with self._lock:
                load = self._load
                load[index] -= 1
                if not load[index]:
                    self._warm = index  # (a hint: left as is if taken back below)
                given = True
        except BaseException:
            if given:
                with self._lock:
                    self._load[index] += 1
            raise
        hook = self.on_release
        if notify and hook is not None:
            hook()

    def in_flight(self, index: int) -> int:
        return self._load[index]
