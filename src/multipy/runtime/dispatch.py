"""The dispatcher: futures, ``acall`` and batches on one call path.

::

    submit() (any thread, or the event loop)        completion thread
    ----------------------------------------        -----------------
    Request ─▶ incoming ─▶ pump():                  reply ready ─▶ Worker finishes the call,
                 idle interpreter? (LoadBalancer)       releases the interpreter ─▶ pump()
                   yes ─▶ take the request, or a        (the next queued request goes out
                          batch of compatible ones       before this one's caller is told)
                          ─▶ Worker.post ─▶ interpreter  ─▶ future.set_result / split a batch
                   no  ─▶ wait in the queue

When nothing waits in the queue, ``submit`` sends a request (not one that may
join a batch or is pinned to an interpreter) at once, on the thread that
submits it, without going through the queue and the pump.  Else a posted
request is sent by whichever thread runs :meth:`Dispatcher.pump` --
the submitting thread when an interpreter is idle, else the thread that
freed one (the completion thread, or a blocking caller returning) -- and no
thread waits for it: the manager's completion thread reads its reply.  A
blocking call (``model(x)``) takes the interpreter the same way through the
:class:`~multipy.runtime.balancer.LoadBalancer`, the one place that picks
interpreters; when it returns, the balancer's release pumps the queue.

Requests for one interpreter (``Obj.submit`` in a session, and batches a
deadline committed to a busy interpreter) wait in that interpreter's own
queue and go out as soon as its lock is free.

An interpreter that queues calls (``Worker.posted_depth`` > 1: the process
backend on the native call channel) takes posted requests behind its running
call: when no interpreter is idle, the pump sends the next request (not a
batch: batches still form while every interpreter is busy and go to an idle
one) to the least loaded one with room (``LoadBalancer.acquire_room``), so that
interpreter starts it the moment its current call ends, with no host round
trip in between.  "Idle" (``acquire_idle``, :meth:`Dispatcher.idle_now`)
still means nothing in flight.  A posted request found never taken by an
interpreter that died comes back as :class:`RequestNotSent` and is queued
again for the others or the replacement.

Cancelling a future before its request was taken from the queue means it is
never sent (``set_running_or_notify_cancel``); after that the call runs to its
end and its result is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time
import weakref
from _thread import get_ident
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

from ..backends.base import MAX_SENDS, RequestNotSent
from ..backends.completions import LoopCompletions
from ..errors import ManagerClosedError
from ..transport.messages import Op

if TYPE_CHECKING:
    from ..backends.completions import Completions
    from .balancer import LoadBalancer
    from .batching import Batcher


_NEVER = float("inf")


AWAITED = object()
"""``Request(future=AWAITED)``: the request goes to :meth:`Dispatcher.submit_async`,
which gives it its future (no ``concurrent.futures.Future`` made for nothing)."""


class Request:
    """One call waiting to be posted.

    ``batch`` is ``(batcher, key, rows)`` for a request that may join a batch;
    ``index`` pins it to one interpreter; ``convert`` turns the reply's value
    into what the future holds (on the completion thread).  ``future`` is a
    :class:`concurrent.futures.Future` unless the caller brings its own object
    with the same ``set_running_or_notify_cancel`` / ``set_result`` /
    ``set_exception`` (a blocking caller's cheaper waiter), or passes
    :data:`AWAITED` for a request that goes to ``submit_async``.  ``owner``: what
    the request keeps alive until it ends (the ReplicatedObj it calls: dropping its
    last handle would release the object, and what its recipe loads from, under a
    call still waiting to be sent).
    """

    __slots__ = ("future", "op", "args", "timeout", "handles", "materializes", "recipe",
                 "index", "resend", "convert", "batch", "queued_at", "fresh", "sent", "sends",
                 "owner")

    def __init__(self, op: Op, args: tuple, *, timeout: float | None = None, handles=None,
                 materializes: int | None = None, recipe: tuple | None = None,
                 index: int | None = None, resend: bool = True,
                 convert: Callable[[Any], Any] | None = None, batch: tuple | None = None,
                 future=None, owner=None) -> None:
        self.future = concurrent.futures.Future() if future is None else future
        self.op = op
        self.args = args
        self.timeout = timeout
        self.handles = handles
        self.materializes = materializes
        self.recipe = recipe
        self.index = index
        self.resend = resend
        self.convert = convert
        self.batch = batch
        self.queued_at = time.perf_counter()
        self.fresh = True
        self.sent = None  # (worker, handle) once sent alone: see submit_async
        self.sends = 0    # times it reached an interpreter that died before taking it
        self.owner = owner


class _Group:
    """What one post sends: one request, or a batch of compatible ones."""

    __slots__ = ("requests", "balanced", "retried", "handed")

    def __init__(self, requests: list[Request], balanced: bool) -> None:
        self.requests = requests
        self.balanced = balanced   # holds a count in the load balancer until it ends
        self.retried = False
        # Set by _post once the interpreter's lock (and count) are its to give back:
        # whoever took them gives them back themselves (_let_go) only until then.
        self.handed = False


class Dispatcher:
    """The queue of posted requests of one manager and the pump that sends them."""

    def __init__(self, workers: list, balancer: "LoadBalancer", completions: "Completions",
                 usable: Callable[[int], bool]) -> None:
        self._workers = workers
        self._balancer = balancer
        self._completions = completions
        self._usable = usable
        self._incoming: collections.deque = collections.deque()   # appended by any thread
        self._pending: collections.deque = collections.deque()    # the pump's own, by age
        self._retries: collections.deque = collections.deque()    # go first; any thread
        self._pinned = [collections.deque() for _ in workers]     # _Group per interpreter
        self._n_pinned = 0
        # True while nothing waits in any queue: the one test of the fast paths.  A
        # thread that queues something sets it False after queueing, then pumps; the
        # pump recomputes it before it lets go (see _run).
        self._empty = True
        # Who pumps: a flag claimed under a lock held for two lines (see _run), not a
        # lock held through the pump, so that a Ctrl-C cannot strand it.
        self._pump_guard = threading.Lock()
        self._pumping = False
        self._pumper = None        # the thread pumping now (get_ident), while it does
        self._submitter = None     # (thread, request) of the submit running the pump: see submit
        self._again = False
        self._timer = None         # (deadline, handle) of the batching deadline armed
        self._next_due = _NEVER    # earliest batching deadline in the queue (perf_counter)
        self._overdue = False      # a request is past its deadline; no interpreter was free to commit to
        self._closed = False
        # The completions of loops whose requests are finished on the loop (on_loop).
        self._loops: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        balancer.on_release = self.pump
        for worker in workers:
            worker.on_free = self.pump

    def submit(self, request: Request) -> concurrent.futures.Future:
        """Queue ``request`` and send it now if an interpreter can take it."""
        if self._closed:
            raise ManagerClosedError("this InterpreterManager is closed")
        if self._empty and request.batch is None and request.index is None:
            if self._post_now(request):
                return request.future
        self._incoming.append(request)
        self._empty = False
        try:
            # Whose request this pump pass carries: a batch interrupted (Ctrl-C) before
            # its send fails this one only (see _post).  One name for every thread: a
            # pass run by another thread than the one named leaves every request queued.
            self._submitter = (get_ident(), request)
            self._run()
        except BaseException:  # a Ctrl-C before the pump ran: the completion thread pumps
            self._submitter = None
            try:
                self._completions.call_soon(self.pump)
            except BaseException:  # a second Ctrl-C: once more (a pump too many finds nothing)
                self._completions.call_soon(self.pump)
            raise
        self._submitter = None  # (its future and result are not kept alive here)
        return request.future

    def _post_now(self, request: Request) -> bool:
        """Nothing waits in the queue: send ``request`` at once on an interpreter
        that can take it (as :meth:`_dispatch` would, without queueing it);
        ``False`` when none can, and it is queued instead."""
        balancer = self._balancer
        index = balancer.acquire_room(None, self._usable)  # acquire_idle, one call less
        if index is None:
            index = balancer.acquire_room(self._depth, self._usable)
            if index is None:
                return False
        worker = group = None
        try:  # see _let_go: what is held here is given back if a Ctrl-C lands
            worker = self._workers[index]
            if not worker.lock.acquire(blocking=False):
                worker = None
                balancer.release(index, notify=False)  # held outside the balancer: queue it
                return False
            if request.future.set_running_or_notify_cancel():
                group = _Group([request], balanced=True)
                self._post(index, worker, group)
            else:  # cancelled already: never sent
                held, worker = worker, None
                held.lock.release()
                balancer.release(index, notify=False)
            return True
        except BaseException:
            taken = [index, worker, group]  # see _let_go
            try:
                self._let_go(taken, requeue=False)  # the caller's own: it was interrupted
            except BaseException:  # a second Ctrl-C in there: what is left is given back
                self._let_go(taken, requeue=False)
            raise

    def expect(self) -> int | None:
        """A posted call is coming soon: wake the interpreter it will most likely
        go to (:meth:`LoadBalancer.likely`), if that one sleeps, so that its
        wake-up overlaps the caller's work until the post (``Worker.poke``).
        Returns that interpreter's index, or ``None`` when requests wait in the
        queue or no interpreter is idle (the call will not be posted at once).
        Never raises for an interpreter that is down or restarting.

        >>> manager._dispatcher.expect()  # doctest: +SKIP
        0
        """
        if not self._empty or self._closed:
            return None
        index = self._balancer.likely()
        if index is not None:
            self._workers[index].poke()
        return index

    def idle_now(self) -> int | None:
        """An idle interpreter for a blocking call, counted in the balancer, when
        nothing waits in the queue (so the call takes no one's turn); else ``None``."""
        if not self._empty:
            return None
        return self._balancer.acquire_idle(self._usable)

    async def submit_async(self, request: Request, *, on_loop: bool = False) -> Any:
        """Queue ``request`` and await its result on the running event loop.

        The result reaches the loop through its :class:`_Bridge`: one wake-up
        of the loop for every run of results, not one per result.  A task
        cancelled while the request is queued cancels it (never sent).

        ``on_loop``: a request sent from the loop's own thread has its reply
        read there too (:class:`~multipy.backends.completions.LoopCompletions`),
        with no hand-off through the completion thread.  Only for a loop that
        keeps running while its requests are in flight, like a server's: the
        interpreter stays busy until the loop reads the reply.  A lone request whose
        interpreter takes it at once can be polled for right after its send (for up to
        ``LoopCompletions.reply_poll``, 0 by default: off): its reply, found then, is settled before the
        ``await``, which does not suspend.
        """
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        bridge = _last_bridge
        if bridge is None or bridge.loop_ref() is not loop:
            bridge = _bridge(loop)
        if on_loop:
            completions = self._on_loop(loop)
            request.future = _LoopFuture(waiter, bridge, completions)
            # The common case (an idle interpreter or room in one's queue, the process
            # backend's channel) sent in one C call; anything else, with nothing taken
            # (False), by submit.
            if _post_awaited is None or not _post_awaited(self, request):
                self.submit(request)
            if _poll_awaited is not None and completions.reply_poll > 0:
                # The one call in flight, to an interpreter awake for it: its reply is
                # polled for up to LoopCompletions.reply_poll and settled here.
                _poll_awaited(request)
        else:
            request.future = _LoopFuture(waiter, bridge)
            self.submit(request)
        try:
            return await waiter
        except asyncio.CancelledError:
            sent = request.sent
            if sent is not None:  # sent, maybe still queued in the interpreter: drop it there
                sent[0].cancel_posted(sent[1])
            raise

    def _on_loop(self, loop: asyncio.AbstractEventLoop) -> LoopCompletions:
        completions = self._loops.get(loop)
        if completions is None:
            completions = self._loops[loop] = LoopCompletions(loop, self._completions)
        return completions

    def pump(self) -> None:
        """Send what can be sent now.  Cheap when nothing waits; safe from any thread
        and reentrant: a thread finding the pump busy leaves the work to its holder.

        The pump's own thread, called back from inside its pass (a posted call it
        sent freed the worker's lock: ``Worker.on_free``), does nothing: the pass
        goes on to the next request anyway, and a second pass would only find the
        interpreters as busy as the first left them."""
        if not self._empty and self._pumper != get_ident():
            self._run()

    def _run(self) -> None:
        """The pump proper (also run, without the ``_empty`` test, by a thread that
        just queued something: it may have read ``_empty`` before the queueing).

        The pump is claimed with a flag set under ``_pump_guard`` and given back in
        a ``finally``: CPython runs a signal handler (Ctrl-C) right after a call
        returns, so a non-blocking ``acquire()`` followed by a ``try`` could take the
        pump and lose it to a KeyboardInterrupt raised in between, and no pump would
        run again.  Entering and leaving a ``with`` block runs no handler before the
        block's protection starts; nothing between the claim and its ``finally``
        calls a function."""
        self._again = True
        guard = self._pump_guard
        while self._again:
            mine = False
            left = ()
            try:
                try:
                    with guard:
                        if self._pumping:
                            return  # its holder sees _again and runs once more
                        mine = self._pumping = True
                    self._pumper = get_ident()
                    self._again = False
                    if not self._closed:
                        self._dispatch()
                    else:  # e.g. a batch that failed in flight, to be retried request by request
                        left = self._take_unsent()
                finally:
                    if mine:
                        # Before the pump is given back (a queueing thread sets it after):
                        # no call here, so a signal handler cannot leave the pump claimed.
                        self._empty = not (self._incoming or self._pending or self._retries
                                           or self._n_pinned)
                        self._pumper = None
                        self._pumping = False
                _fail_closed(left)
            except BaseException:
                if mine and not self._empty:
                    # Interrupted (Ctrl-C) with requests still queued, some perhaps
                    # handed back (_let_go): the completion thread pumps for them.
                    try:
                        self._completions.call_soon(self.pump)
                    except BaseException:  # a second Ctrl-C: once more (harmless if twice)
                        self._completions.call_soon(self.pump)
                if left:
                    self._completions.call_soon(lambda: _fail_closed(left))
                raise

    def close(self) -> None:
        """Fail every request not sent yet with :class:`ManagerClosedError` (and
        every one put back in the queue later, e.g. a failed batch's requests).

        The queue is emptied here, or by the thread pumping now once its pass
        ends (never waited for: close may run inside a future's callback that the
        pump called)."""
        self._closed = True
        self._empty = False
        self._run()
        for completions in list(self._loops.values()):
            completions.hand_over()  # a stopped loop no longer reads its replies

    def _take_unsent(self) -> list[Request]:
        """Empty every queue (the pump claimed); returns what was in them."""
        left = list(self._retries) + list(self._incoming) + list(self._pending)
        self._retries.clear()
        self._incoming.clear()
        self._pending.clear()
        for queue in self._pinned:
            for group in queue:
                left.extend(group.requests)
            queue.clear()
        self._n_pinned = 0
        return left

    # -- with the pump claimed (one thread at a time) -----------------------------
    def _dispatch(self) -> None:
        incoming, pending, retries = self._incoming, self._pending, self._retries
        # Moved between queues by indexing and `del`, not pop(): CPython runs signal
        # handlers (Ctrl-C) and switches threads only after a call, so a request is
        # never out of every queue when a KeyboardInterrupt is raised (see _run).
        while retries:
            request = retries[-1]
            del retries[-1]
            pending.appendleft(request)
        arrived = []
        while incoming:
            request = incoming[0]
            if request.index is None:
                del incoming[0]
                pending.append(request)
                arrived.append(request)
            else:
                group = _Group([request], balanced=False)
                del incoming[0]
                self._n_pinned += 1
                self._pinned[request.index].append(group)
        if self._n_pinned:
            self._dispatch_pinned()
        tried: set[int] = set()
        balancer = self._balancer
        while pending:
            index = worker = group = None
            try:  # see _let_go: what is held here is given back if a Ctrl-C lands
                if pending[0].batch is None:
                    # An idle interpreter if there is one (acquire_room takes the first
                    # idle one in turn, as acquire_idle does), else one that queues
                    # calls and has room: it takes the request behind its current call.
                    index = balancer.acquire_room(self._depth, self._usable, tried)
                else:
                    # A batchable request waits for an idle interpreter, gathering the
                    # requests that arrive meanwhile (sent behind a call at once,
                    # batches came out a third smaller: docs/async-and-batching.md).
                    index = balancer.acquire_idle(self._usable, tried)
                if index is None:
                    break
                worker = self._workers[index]
                if not worker.lock.acquire(blocking=False):
                    # Held outside the balancer (a pinned session, a restart): its release pumps.
                    worker = None
                    tried.add(index)
                    balancer.release(index, notify=False)
                    index = None
                    continue
                group = self._take(pending)
                if group is None:
                    held, worker = worker, None
                    held.lock.release()
                    balancer.release(index, notify=False)
                    index = None
                    break
                self._post(index, worker, group)
            except BaseException:
                taken = [index, worker, group]  # see _let_go
                try:
                    self._let_go(taken)
                except BaseException:  # a second Ctrl-C in there: what is left is given back
                    self._let_go(taken)
                raise
        if not pending:
            self._next_due = _NEVER
            return
        due = self._next_due
        for request in arrived:
            request.fresh = False  # still here: it waited for an interpreter
            batch = request.batch
            if batch is not None and request.queued_at + batch[0].max_delay < due:
                due = request.queued_at + batch[0].max_delay
        self._next_due = due
        if time.perf_counter() >= due:
            self._check_deadlines(pending)
        elif due != _NEVER and (self._timer is None or self._timer[0] > due):
            self._arm_timer(due)

    def _depth(self, index: int) -> int:
        return self._workers[index].posted_depth

    def _dispatch_pinned(self) -> None:
        for index, queue in enumerate(self._pinned):
            while queue:
                worker = self._workers[index]
                # A committed batch goes once nothing else is posted there (as on an
                # interpreter that takes one posted call at a time: sent behind a
                # running call, batches would be committed by the max_delay timer only,
                # never on an idle interpreter); a session's request may queue there.
                limit = 1 if queue[0].requests[0].batch is not None else worker.posted_depth
                if worker.posted_in_flight >= limit:
                    break  # the next completion there pumps
                if not worker.lock.acquire(blocking=False):
                    break  # its release pumps again
                group = queue[0]
                removed = False
                try:  # a Ctrl-C: the group stays first in its queue, the interpreter free
                    first = group.requests[0]
                    started = True
                    if not group.balanced:  # a session's request: it was never started
                        started = first.future.set_running_or_notify_cancel()
                    elif first.batch is not None:  # a committed batch: still open to later requests
                        first.batch[0].top_up(group.requests, self._pending)
                    del queue[0]  # not popleft(): no call, so no signal handler, until `removed`
                    self._n_pinned -= 1
                    removed = True
                    if self._overdue and not queue:  # room for a committed batch here now
                        self._overdue = False
                        self._next_due = 0.0
                    if not started:  # cancelled while queued: never sent
                        group.handed = True
                        worker.lock.release()
                        continue
                    self._post(index, worker, group)
                except BaseException:
                    if not group.handed:
                        taken = [worker, group, removed]  # see _put_back
                        try:
                            self._put_back(queue, taken)
                        except BaseException:  # a second Ctrl-C in there: what is left, done
                            self._put_back(queue, taken)
                    raise
                # The interpreter is busy now; one that queues calls may take the next.

    def _take(self, pending: collections.deque) -> _Group | None:
        """The oldest request not cancelled, with the queued requests that can join its batch."""
        while pending:
            first = pending[0]
            try:
                started = first.future.set_running_or_notify_cancel()
            except BaseException:  # a Ctrl-C: it stays first in line, its future perhaps started
                pending[0] = _retry(first)
                raise
            del pending[0]  # not popleft(): no call, so no signal handler, between here and its use
            if started:
                break
        else:
            return None
        try:
            if first.batch is None:
                return _Group([first], balanced=True)
            return _Group(first.batch[0].gather(first, pending), balanced=True)
        except BaseException:  # a Ctrl-C: it goes back first in line
            pending.appendleft(_retry(first))
            raise

    def _check_deadlines(self, pending: collections.deque) -> None:
        """While every interpreter is busy, a batchable request waits at most its
        batcher's ``max_delay``; then its batch is committed to the least loaded
        interpreter (sent the moment that one's current call ends).

        Runs only once the earliest deadline (``_next_due``) has passed: one pass
        over the queue, which also finds the next earliest deadline.  When every
        interpreter has a committed batch already, the requests past their
        deadline wait for the next committed batch to go out (``_overdue``)."""
        now = time.perf_counter()
        due = _NEVER
        taken: set[int] = set()  # ids of requests that joined a committed batch
        # One committed batch per interpreter at most: a second one would only
        # split the requests arriving meanwhile into smaller batches.
        free_slot = lambda i: self._usable(i) and not self._pinned[i]  # noqa: E731
        room = any(not queue for queue in self._pinned)
        for request in list(pending):
            batch = request.batch
            if batch is None or id(request) in taken:
                continue
            deadline = request.queued_at + batch[0].max_delay
            if deadline > now:
                due = min(due, deadline)
                continue
            index = self._balancer.acquire(free_slot) if room else None
            if index is None or self._pinned[index]:  # every interpreter has one already
                if index is not None:
                    self._balancer.release(index, notify=False)
                self._overdue = True
                due = _NEVER  # checked again once a committed batch went out
                break
            pending.remove(request)
            if not request.future.set_running_or_notify_cancel():
                self._balancer.release(index, notify=False)
                continue  # cancelled while queued: never sent
            group = batch[0].gather(request, pending)
            taken.update(id(r) for r in group)
            self._pinned[index].append(_Group(group, balanced=True))
            self._n_pinned += 1
            room = any(not queue for queue in self._pinned)
        if self._n_pinned:
            self._again = True
        self._next_due = due
        if due != _NEVER and (self._timer is None or self._timer[0] > due):
            self._arm_timer(due)

    def _arm_timer(self, due: float) -> None:
        """Have the completion thread pump at ``due`` (``perf_counter``), the
        earliest batching deadline; replaces a later timer."""
        if self._timer is not None:
            self._completions.cancel(self._timer[1])
        wait = max(0.0, due - time.perf_counter())
        handle = self._completions.call_at(time.monotonic() + wait, self._on_deadline)
        self._timer = (due, handle)

    def _on_deadline(self) -> None:
        self._timer = None
        self.pump()

    def _post(self, index: int, worker, group: _Group) -> None:
        """Send ``group`` on ``worker`` (its lock held): one request, or one batched call."""
        requests = group.requests
        first = requests[0]
        try:
            if first.batch is not None:
                first.batch[0].record(requests)
            if len(requests) == 1:
                op, args = first.op, first.args
            else:
                op, args = first.batch[0].combine(requests)
            completions = self._completions
            future = first.future
            on_loop = future.on_loop if type(future) is _LoopFuture else None
            if (on_loop is not None and on_loop.here()
                    and (len(requests) == 1
                         or all(getattr(r.future, "on_loop", None) is on_loop for r in requests))):
                completions = on_loop  # the loop reads the reply itself
        except Exception as exc:  # (out of memory concatenating, ...): nothing was sent
            group.handed = True
            worker.lock.release()
            if group.balanced:
                self._balancer.release(index, notify=False)
            if len(requests) > 1:
                self._requeue(group)  # each request alone
            else:
                self._finish(group, None, exc)
            return
        # (A Ctrl-C before this line leaves the lock, the count and the group to the
        # caller's _let_go.)
        group.handed = True
        try:
            handle = worker.post(op, args, completions=completions,
                                 done=partial(self._done, index, group),
                                 timeout=first.timeout, handles=first.handles,
                                 materializes=first.materializes, recipe=first.recipe)
        except RequestNotSent as not_sent:
            # The interpreter was found dead before anything was sent (and is restarting).
            self._not_sent(index, group, not_sent)
        except Exception as exc:
            if worker.let_go_after(exc):  # sent, then an error (of on_free): its done() ends it
                raise
            # Nothing was sent (an argument that cannot cross...): the requests fail with it.
            if group.balanced:
                self._balancer.release(index, notify=False)
            self._finish(group, None, exc)
        except BaseException as exc:
            # A Ctrl-C.  A second one inside this recovery is absorbed (the first goes
            # on): each step it interrupts is done once more.
            try:
                sent = worker.let_go_after(exc)
            except BaseException:  # asked again, it tells the same (see let_go_after)
                sent = worker.let_go_after(exc)
            if sent:  # sent, then a Ctrl-C: its done() gives all back
                raise
            taken = [index if group.balanced else None, None, group]  # see _let_go
            try:
                self._unsent(taken, exc)
            except BaseException:
                self._unsent(taken, exc)
            raise
        else:  # sent: from here its done() gives everything back, whatever happens here
            if handle is not None and len(requests) == 1:
                first.sent = (worker, handle)

    def _let_go(self, taken: list, *, requeue: bool = True) -> None:
        """A Ctrl-C (KeyboardInterrupt, raised by a signal handler right after any
        call) stopped a send after it took the load balancer's count of interpreter
        ``index``, ``worker``'s lock or the requests of ``group`` (``taken`` is
        ``[index, worker, group]``, ``None`` for what it had not taken yet), before
        :meth:`_post` had them (``group.handed``): they are given back, and the
        requests queued again first (``requeue``; the interrupted pump has the
        completion thread pump).  Without this, the interpreter would look busy,
        and the requests wait, for ever.

        Each is struck from ``taken`` as it is given back, with no point between the
        two where a signal handler runs: run again after a second Ctrl-C stopped
        it, it gives back what is left, once."""
        index, worker, group = taken
        if group is not None and group.handed:
            return
        if worker is not None:
            taken[1] = None  # struck first: nothing between here and the release runs a handler
            worker.lock.release()
        if index is not None:
            self._balancer.release(index, notify=False)  # all or nothing
            taken[0] = None  # (a Python function's return runs no handler)
        if group is not None and requeue:
            self._queue_again(group.requests)  # all or nothing
            taken[2] = None

    def _unsent(self, taken: list, exc: BaseException) -> None:
        """A Ctrl-C (``exc``) stopped :meth:`_post` before anything was sent, the
        interpreter's lock given back: the balancer's count (``taken[0]``, or
        ``None``) is given back; the interrupted thread's own request fails with
        ``exc`` (the interrupt reaches that thread), every other request of the
        group (``taken[2]``; other callers' requests, which it sent for them) goes
        back to the queue, each alone.  Run again after a second Ctrl-C stopped
        it, it does what is left (see :meth:`_let_go`)."""
        index, _, group = taken
        if index is not None:
            self._balancer.release(index, notify=False)  # all or nothing
            taken[0] = None
        if group is None:
            return
        requests = group.requests
        if self._pumper != get_ident():  # a submit's own send (_post_now): its own request
            own = requests[0]
        else:
            submitter = self._submitter
            own = submitter[1] if submitter is not None and submitter[0] == get_ident() else None
        others = [r for r in requests if r is not own]
        if others:
            self._queue_again(others)  # all or nothing
        taken[2] = None
        if own is not None and own in requests:  # (a courtesy: its caller was interrupted)
            _resolve(own, None, exc)

    def _put_back(self, queue: collections.deque, taken: list) -> None:
        """A Ctrl-C stopped :meth:`_dispatch_pinned` before :meth:`_post` had the
        group (``taken``: ``[worker, group, removed]``): the interpreter's lock is
        given back and the group goes back first in its interpreter's queue (a
        session's request as a retry: its future may have started).  Run again
        after a second Ctrl-C stopped it, it does what is left (see :meth:`_let_go`)."""
        worker, group, removed = taken
        if worker is not None:
            taken[0] = None
            worker.lock.release()
        if group is not None:
            if not group.balanced:  # its future may have started: it goes as a retry
                group = _Group([_retry(r) for r in group.requests], balanced=False)
            taken[1] = None  # struck first: nothing between here and the queueing runs a handler
            if removed:
                self._n_pinned += 1  # (before: a handler may run as appendleft returns)
                queue.appendleft(group)
            else:
                queue[0] = group

    def _queue_again(self, requests: list) -> None:
        """Queue ``requests`` again, first, each alone (as retries).  All or nothing: a
        Ctrl-C while the retries are made queues none of them."""
        again = [_retry(request) for request in requests]
        retries = self._retries
        retries += again  # an operator, not a call: no signal handler runs in it
        self._empty = False

    def _done(self, index: int, group: _Group, value, error) -> None:
        """On the completion thread, after the worker freed the interpreter."""
        requests = group.requests
        requests[0].sent = None  # ended: nothing to cancel (and no cycle through its handle)
        if isinstance(error, RequestNotSent):
            # Queued in an interpreter that died before it took it: to its replacement.
            self._not_sent(index, group, error)
            self.pump()  # its release did not (notify=False)
            return
        rows = None
        if len(requests) > 1:
            rows = requests[0].batch[0].rows_of(requests, value, error)
            if rows is None:  # the batch failed or its result cannot be split by rows
                self._requeue(group)  # retried request by request
        if group.balanced:
            self._balancer.release(index)  # pumps: the next request goes out first
        else:
            self.pump()
        if len(requests) == 1:
            _resolve(requests[0], value, error)
        elif rows is not None:
            requests[0].batch[0].deliver(requests, value, rows)

    def _not_sent(self, index: int, group: _Group, not_sent: RequestNotSent) -> None:
        """``group`` never reached interpreter ``index`` (found dead): queue it again
        for the others or the replacement, up to :data:`~multipy.backends.base.MAX_SENDS`
        interpreters in all (as a blocking call), or fail it with the interpreter's
        error (``resend=False``, closed, or every interpreter it went to died first)."""
        if group.balanced:
            self._balancer.release(index, notify=False)
        requests = group.requests
        if not requests[0].resend or self._closed:
            self._finish(group, None, not_sent.error)
            return
        again = []
        for request in requests:
            request.sends += 1
            if request.sends < MAX_SENDS:
                again.append(request)
            else:
                _resolve(request, None, not_sent.error)
        if again:
            self._requeue(_Group(again, group.balanced))

    def _requeue(self, group: _Group) -> None:
        """Put ``group``'s requests back at the head of the queue (already running)."""
        self._retries.extend(_retry(request) for request in group.requests)
        self._empty = False
        self._run()

    def _finish(self, group: _Group, value, error) -> None:
        for request in group.requests:
            _resolve(request, value, error)


def _retry(request: Request) -> Request:
    """``request`` again, to be sent on its own; its caller's future stays the same."""
    retry = Request.__new__(Request)
    for name in Request.__slots__:
        setattr(retry, name, getattr(request, name))
    retry.batch = None
    retry.fresh = False
    retry.sent = None
    if not isinstance(request.future, _Started):
        retry.future = _Started(request.future)
    return retry


class _Started:
    """Wraps a caller's future that is already running: starting it again is a no-op."""

    __slots__ = ("inner",)

    def __init__(self, inner) -> None:
        self.inner = inner

    def set_running_or_notify_cancel(self) -> bool:
        return True

    def set_result(self, value) -> None:
        self.inner.set_result(value)

    def set_exception(self, error) -> None:
        self.inner.set_exception(error)


def _resolve(request: Request, value, error) -> None:
    if error is None and request.convert is not None:
        try:
            value = request.convert(value)
        except BaseException as exc:
            value, error = None, exc
    future = request.future
    if type(future) is _LoopFuture:  # its set_result / set_exception, written out
        future.bridge.deliver(future.waiter, value, error)
    elif error is None:
        future.set_result(value)
    else:
        future.set_exception(error)


def _fail_closed(requests) -> None:
    if requests:
        error = ManagerClosedError("the interpreter manager was closed before this call was sent")
        for request in requests:
            _fail(request, error)


def _fail(request: Request, error: BaseException) -> None:
    future = request.future
    if isinstance(future, _Started) or future.set_running_or_notify_cancel():
        future.set_exception(error)


class _LoopFuture:
    """What the dispatcher resolves for an ``acall``: an asyncio future on its loop
    (``on_loop``: the loop's completions, when it reads its own replies)."""

    __slots__ = ("waiter", "bridge", "on_loop")

    def __init__(self, waiter: asyncio.Future, bridge: "_Bridge",
                 on_loop: "LoopCompletions | None" = None) -> None:
        self.waiter = waiter
        self.bridge = bridge
        self.on_loop = on_loop

    def set_running_or_notify_cancel(self) -> bool:
        return not self.waiter.cancelled()  # a task cancelled while queued: never sent

    def set_result(self, value) -> None:
        self.bridge.deliver(self.waiter, value, None)

    def set_exception(self, error) -> None:
        self.bridge.deliver(self.waiter, None, error)


class _Bridge:
    """Hands results from the completion thread to one event loop, waking the loop
    once per run of results (``call_soon_threadsafe`` writes to the loop's pipe)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop_ref = weakref.ref(loop)  # weak: the bridge is the loop's value in _bridges
        self._lock = threading.Lock()
        self._ready: list = []

    def deliver(self, waiter: asyncio.Future, value, error) -> None:
        loop = self.loop_ref()
        if loop is None:
            return  # the loop is gone, and every task that awaited on it
        if asyncio._get_running_loop() is loop:  # on the loop's thread: no wake-up
            if not waiter.cancelled():
                if error is None:
                    waiter.set_result(value)
                else:
                    waiter.set_exception(error)
            return
        with self._lock:
            self._ready.append((waiter, value, error))
            if len(self._ready) > 1:
                return  # the loop was woken already and has not drained yet
        try:
            loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            pass  # the loop is closed: nobody awaits these results any more

    def _drain(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for waiter, value, error in ready:
            if waiter.cancelled():
                continue  # cancelled after it was sent: the result is dropped
            if error is None:
                waiter.set_result(value)
            else:
                waiter.set_exception(error)


def _setup_ring() -> None:
    """Tell the extension what the bell watch's C common case on a loop recognises
    (``_native.ring_awaited``): the objects of an awaited request's path."""
    from ..backends.base import _PostedCall
    from ..transport import channel

    if channel._ring_awaited is not None:
        channel._native_module.ring_setup(channel._hand_over, _PostedCall, Dispatcher._done,
                                          _LoopFuture, partial, asyncio._get_running_loop)


def _setup_send():
    """Tell the extension what ``_native.post_awaited`` makes and recognises (the
    send of ``submit_async(..., on_loop=True)``); ``None`` without the extension
    (``MULTIPY_NATIVE=0``): every request goes through :meth:`Dispatcher.submit`."""
    from ..backends import process
    from ..transport import channel

    post = getattr(channel._native_module, "post_awaited", None) if channel.NATIVE else None
    if post is None or channel._ring_awaited is None:
        return None
    if not channel._native_module.send_setup(_Group, process._Posted, process.ProcessWorker,
                                             process._CALL_REPLICATED, process.PIPELINE_DEPTH):
        return None  # (the classes' slots are not those it makes: the Python path)
    return post


_setup_ring()
_post_awaited = _setup_send()


def _setup_poll():
    """``_native.poll_awaited``: submit_async's poll for a lone awaited call's reply
    (``None`` without the extension)."""
    from ..transport import channel

    return getattr(channel._native_module, "poll_awaited", None) if channel._ring_awaited else None


_poll_awaited = _setup_poll()


_bridges: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Bridge]" = weakref.WeakKeyDictionary()
_bridges_lock = threading.Lock()
# The bridge of the loop that awaited last: most programs run one loop, and its
# bridge is then found without the weak dictionary's Python-level lookup.  (Its
# loop is held weakly: a later loop, even one at the same address, is told apart.)
_last_bridge: "_Bridge | None" = None


def _bridge(loop: asyncio.AbstractEventLoop) -> _Bridge:
    global _last_bridge
    bridge = _bridges.get(loop)
    if bridge is None:
        with _bridges_lock:
            bridge = _bridges.get(loop)
            if bridge is None:
                bridge = _bridges[loop] = _Bridge(loop)
    _last_bridge = bridge
    return bridge
