"""Dynamic batching: concurrent calls of one model run as one call.

``model.batched()`` wraps a :class:`~multipy.runtime.replicated.ReplicatedObj`;
its calls go through the manager's dispatcher (:mod:`multipy.runtime.dispatch`)
like every posted request, and are batched where they wait::

    caller A: f(x[1×16]) ─┐                     ┌─▶ A gets rows 0:1
    caller B: f(x[3×16]) ─┼─ queued while every ─┤    B gets rows 1:4
    caller C: f(x[1×16]) ─┘  interpreter is busy └─▶ C gets rows 4:5
                 interpreter frees ─▶ f(cat([A, B, C])) ─▶ split by rows

* **No timer while an interpreter is idle.**  A request that finds an idle
  interpreter is sent at once, alone; requests are only batched while they
  wait for an interpreter anyway.  ``max_delay_ms`` bounds that wait: a
  request queued that long (every interpreter still busy) has its batch
  closed and committed to the least loaded interpreter, to go the moment that
  one's current call ends.
* **Grouping by shape.**  Calls join one batch when every tensor argument
  agrees with theirs on all dimensions but the first (and on dtype and
  device), every other argument is equal, and they run under the same
  autograd mode; at most ``max_batch_size`` rows go in one batch.
* **Row-by-row answers.**  The result (a tensor, or a tuple, list or dict of
  tensors) is split along dimension 0 back to each caller.  Each caller's
  tensors are views of the batch's result.
* **One bad request fails alone.**  A batch that raises, or whose result
  cannot be split by rows, is run again request by request: every caller gets
  its own result or the model's own exception.

Batching is opt-in per object: only a model whose rows are independent (the
usual inference ``forward``) may be wrapped.  Batched matrix products may
differ from batch-1 ones in the last bits, as in any batching server.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
import types
from typing import TYPE_CHECKING, Any

from .dispatch import AWAITED, Request, _retry
from .stats import BatchStatistics, quantile

if TYPE_CHECKING:
    import concurrent.futures

    from .replicated import ReplicatedObj

_TENSOR = object()  # marks a tensor's place in a batching key
_MAX_KEYS = 256     # batching keys kept for identity comparison, per BatchedObj


class BatchedObj:
    """A :class:`ReplicatedObj` whose concurrent calls are batched.

    >>> fast = model.batched(max_batch_size=32, max_delay_ms=2.0)   # doctest: +SKIP
    >>> out = fast(torch.rand(1, 16))            # blocking, like model(...)  # doctest: +SKIP
    >>> future = fast.submit(torch.rand(1, 16))  # concurrent.futures.Future  # doctest: +SKIP
    >>> out = await fast.acall(torch.rand(1, 16))                     # asyncio  # doctest: +SKIP
    >>> fast.statistics().mean_batch_size  # doctest: +SKIP
    7.5
    """

    def __init__(self, replicated: "ReplicatedObj", *, max_batch_size: int = 32,
                 max_delay_ms: float = 2.0, method: str | None = None) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        if not max_delay_ms >= 0:
            raise ValueError(f"max_delay_ms must be 0 or more, got {max_delay_ms!r}")
        self._replicated = replicated
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1000.0
        self.method = method
        self._lock = threading.Lock()
        self._sizes: collections.Counter = collections.Counter()
        self._waits: list[float] = []
        self._sent_on_arrival = 0
        self._queued = 0
        self._retried = 0
        self._keys: dict = {}  # one object per batching key seen: compared by identity

    # -- the call surface -------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the model (batched with concurrent calls) and wait for the result."""
        manager = self._replicated._manager
        index = manager._dispatcher.idle_now()
        if index is not None:
            # An interpreter is idle and nobody queues: a batch of one, run by this
            # thread as a plain blocking call (no hand-off to the completion thread).
            try:
                batchable = self._signature(args, kwargs) is not None
            except BaseException:
                manager._balancer.release(index)  # taken for this call: give it back
                raise
            if batchable:  # one that could have been batched
                with self._lock:
                    self._sizes[1] += 1
                    self._sent_on_arrival += 1
                    self._waits.append(0.0)
            return manager._call_replicated(self._replicated, self.method, args, kwargs, None,
                                            index=index)
        # Queued: a waiter cheaper than a Future (one lock, released once), and this
        # thread, not the completion thread, takes its rows out of the batch's result.
        waiter = _Waiter()
        manager._dispatcher.submit(self._request(args, kwargs, waiter))
        return waiter.result()

    def submit(self, *args: Any, **kwargs: Any) -> "concurrent.futures.Future":
        """Queue a call; the future holds this caller's rows of the result.

        Cancelling the future before its batch was sent means the call is
        never sent; after that it runs and its result is dropped.
        """
        return self._replicated._manager._dispatcher.submit(self._request(args, kwargs))

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        """``await`` a call (batched with concurrent calls).

        A task cancelled (e.g. by ``asyncio.wait_for``) before its batch was
        sent is never sent; after that the call runs and its result is dropped.
        """
        request = self._request(args, kwargs, AWAITED)
        return await self._replicated._manager._dispatcher.submit_async(request)

    def _request(self, args: tuple, kwargs: dict, future=None) -> Request:
        signature = self._signature(args, kwargs)
        manager = self._replicated._manager
        request = manager._replicated_request(self._replicated, self.method, args, kwargs, None,
                                              future=future)
        if signature is not None:
            key, rows = signature
            key = (request.args[4], key)
            keys = self._keys
            try:
                key = keys.setdefault(key, key) if len(keys) < _MAX_KEYS else keys.get(key, key)
            except Exception:  # noqa: BLE001
                pass  # an argument that cannot be hashed (or compared): left to _same
            request.batch = (self, key, rows)
        return request

    def statistics(self) -> BatchStatistics:
        """Batches formed, their sizes and how long requests waited."""
        with self._lock:
            sizes = dict(sorted(self._sizes.items()))
            waits = sorted(self._waits)
            sent_on_arrival, queued, retried = self._sent_on_arrival, self._queued, self._retried
        batches = sum(sizes.values())
        requests = sum(size * count for size, count in sizes.items())
        return BatchStatistics(
            requests=requests, batches=batches,
            mean_batch_size=requests / batches if batches else 0.0,
            batch_sizes=types.MappingProxyType(sizes),
            sent_on_arrival=sent_on_arrival, queued=queued, retried_alone=retried,
            mean_wait=sum(waits) / len(waits) if waits else 0.0,
            p50_wait=quantile(waits, 0.5), p99_wait=quantile(waits, 0.99))

    def __repr__(self) -> str:
        return (f"<BatchedObj of {self._replicated!r} max_batch_size={self.max_batch_size} "
                f"max_delay_ms={self.max_delay * 1000:g}>")

    # -- what the dispatcher asks (under its pump lock) ------------------------------
    def gather(self, first: Request, pending: collections.deque) -> list[Request]:
        """``first`` (already running) and the queued requests that can join its
        batch, oldest first, taken out of ``pending``."""
        group = [first]
        self.top_up(group, pending)
        return group

    def top_up(self, group: list[Request], pending: collections.deque) -> None:
        """Move queued requests that can join ``group``'s batch into it.

        A Ctrl-C (CPython raises it right after any call returns) leaves each
        request once in ``group`` or in ``pending``: the requests moved so far go
        back to the front of ``pending``, with the one being started, as retries
        (their futures may be running already: see ``dispatch._retry``).
        """
        _, key, _ = group[0].batch
        room = self.max_batch_size - sum(r.batch[2] for r in group)
        size = len(group)
        i = 0
        try:
            # Moved one at a time by indexing and `del`: no call between a request
            # leaving `pending` and its joining `group`.
            while room > 0 and i < len(pending):
                request = pending[i]
                batch = request.batch
                if (batch is not None and batch[0] is self and batch[2] <= room
                        and (batch[1] is key or _same(batch[1], key))):
                    try:
                        started = request.future.set_running_or_notify_cancel()
                    except BaseException:  # its future perhaps started: it goes as a retry
                        pending[i] = _retry(request)
                        raise
                    del pending[i]
                    if started:  # else cancelled: dropped, never sent
                        group.append(request)
                        room -= batch[2]
                    continue
                i += 1
        except BaseException:
            while len(group) > size:
                pending.appendleft(_retry(group[-1]))
                del group[-1]
            raise

    def combine(self, requests: list[Request]) -> tuple:
        """The one call of a batch: tensor arguments concatenated along dim 0."""
        torch = sys.modules["torch"]
        first = requests[0]
        op, (rid, method, args, kwargs, grad) = first.op, first.args
        with torch.no_grad():
            args = tuple(torch.cat([r.args[2][i] for r in requests]) if isinstance(a, torch.Tensor)
                         else a for i, a in enumerate(args))
            kwargs = {name: torch.cat([r.args[3][name] for r in requests])
                      if isinstance(a, torch.Tensor) else a for name, a in kwargs.items()}
        return op, (rid, method, args, kwargs, grad)

    def rows_of(self, requests: list[Request], value, error) -> list[int] | None:
        """Where each caller's rows start in a batch's result (and where the last
        ends); ``None`` when the batch must be run again request by request (it
        raised, or its result has no rows)."""
        offsets = [0]
        for request in requests:
            offsets.append(offsets[-1] + request.batch[2])
        if error is None and _has_rows(value, offsets[-1]):
            return offsets
        with self._lock:
            self._retried += len(requests)
        return None

    def deliver(self, requests: list[Request], value, offsets: list[int]) -> None:
        """Give each caller its rows of ``value`` (views of it).  A blocking
        caller's waiter takes its rows itself, in its own thread."""
        for i, request in enumerate(requests):
            future = request.future
            if type(future) is _Waiter:
                future.set_rows(value, offsets[i], offsets[i + 1])
            else:
                future.set_result(_rows(value, offsets[i], offsets[i + 1]))

    # -- internals -------------------------------------------------------------------
    def _signature(self, args: tuple, kwargs: dict):
        """``(key, rows)`` when the call can join a batch, else ``None``."""
        torch = sys.modules.get("torch")
        if torch is None:
            return None
        tensor = torch.Tensor
        rows = None
        parts = []
        items = enumerate(args) if not kwargs else [*enumerate(args), *sorted(kwargs.items())]
        for name, value in items:
            if isinstance(value, tensor):
                shape = value.shape
                if not shape or (rows is not None and shape[0] != rows) or value.is_sparse:
                    return None
                rows = shape[0]
                parts.append((name, _TENSOR, tuple(shape)[1:], value.dtype, value.device))
            elif isinstance(value, (list, tuple, dict)) and _holds_tensor(value, tensor):
                return None  # tensors nested in containers are not concatenated
            else:
                parts.append((name, value))
        if not rows:
            return None
        return tuple(parts), rows

    def record(self, group: list[Request]) -> None:
        """Count a batch as it is sent."""
        with self._lock:
            self._sizes[len(group)] += 1
            waits = self._waits
            now = time.perf_counter()
            for request in group:
                waits.append(now - request.queued_at)
                if request.fresh:
                    self._sent_on_arrival += 1
                else:
                    self._queued += 1
            if len(waits) > 8192:
                del waits[:4096]


def _same(a, b) -> bool:
    """Keys compare with ``==``; values whose ``==`` raises or is not a bool differ."""
    try:
        return bool(a == b) if a is not b else True
    except Exception:
        return False


def _holds_tensor(value, tensor) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v, tensor) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v, tensor) for v in value.values())
    return isinstance(value, tensor)


def _has_rows(value, total: int) -> bool:
    """Whether every tensor of ``value`` (a tensor, or a tuple, list or dict of
    them) has ``total`` rows, so that it splits by rows."""
    torch = sys.modules["torch"]
    if isinstance(value, torch.Tensor):
        return value.dim() > 0 and value.shape[0] == total
    if isinstance(value, (tuple, list)):
        return all(_has_rows(v, total) for v in value)
    if isinstance(value, dict):
        return all(_has_rows(v, total) for v in value.values())
    return False


def _rows(value, start: int, stop: int):
    """Rows ``start:stop`` of a result that :func:`_has_rows`."""
    if isinstance(value, (tuple, list)):
        parts = [_rows(v, start, stop) for v in value]
        kind = type(value)
        return kind._make(parts) if hasattr(kind, "_make") else kind(parts)
    if isinstance(value, dict):
        return type(value)((k, _rows(v, start, stop)) for k, v in value.items())
    return value[start:stop]


class _Waiter:
    """A blocking caller's slot for its result: a lock the caller waits on and
    the completion thread releases once (a ``concurrent.futures.Future`` takes
    a condition and a second lock hand-off to do the same)."""

    __slots__ = ("_lock", "_value", "_error", "_rows")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._value = self._error = self._rows = None

    def set_running_or_notify_cancel(self) -> bool:
        return True  # a blocking call cannot be cancelled

    def set_result(self, value) -> None:
        self._value = value
        self._lock.release()

    def set_exception(self, error: BaseException) -> None:
        self._error = error
        self._lock.release()

    def set_rows(self, value, start: int, stop: int) -> None:
        self._value, self._rows = value, (start, stop)
        self._lock.release()

    def result(self):
        """Wait for the call to end; its value, or its exception raised."""
        self._lock.acquire()
        error = self._error
        if error is not None:
            try:
                raise error
            finally:
                error = self = None  # no reference cycle through the traceback
        if self._rows is not None:
            return _rows(self._value, *self._rows)
        return self._value
