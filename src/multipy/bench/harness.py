"""The timing harness: N host threads, a barrier, a fixed window.

::

    main thread                         worker thread i (of n)
    -----------                         ----------------------
    start n threads ──────────────────▶ fn = fn_factory(i); fn()     (warm-up)
                                        barrier.wait()  ── last one in stamps t0
    poll: on_tick(elapsed / seconds)    loop until t0 + seconds:
                                            t = now(); fn(); latencies.append(now() - t)
    join; wall = last finish - t0
    Result(items, items / wall, p25/p50/p95)

This is deploy_benchmark's loop: every thread warms up before the clock
starts, all threads start together, and throughput is items over wall seconds
(not the sum of per-thread rates, which would hide a convoy).

Example:
    >>> import time
    >>> r = run_threads(lambda i: (lambda: time.sleep(0.001)), 2, 0.1)
    >>> r.n_threads, r.work_items_completed > 0
    (2, True)
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence

from ..runtime.stats import quantile

__all__ = ["WARMUP_ITEMS", "Result", "percentile_ms", "run_threads"]

#: Items each thread (or process) runs before the clock starts: the first calls
#: pay one-off costs (allocator growth, oneDNN primitive caches, lazy loading).
WARMUP_ITEMS = 3

_POLL_SECONDS = 0.1


@dataclasses.dataclass(frozen=True)
class Result:
    """One timed window.  Latencies are milliseconds per item.

    ``n_threads`` is how many host threads (or, for ``limit``, processes) ran.

    Example:
        >>> Result(2, 10, 0.5, 1.0, 2.0, 3.0).work_items_per_second
        20.0
    """

    n_threads: int
    work_items_completed: int
    seconds: float
    p25_latency: float
    p50_latency: float
    p95_latency: float

    @property
    def work_items_per_second(self) -> float:
        return self.work_items_completed / self.seconds if self.seconds > 0 else 0.0

    @classmethod
    def from_latencies(cls, n_threads: int, latencies: Sequence[float], seconds: float) -> "Result":
        """Build a result from per-item latencies in seconds and the wall window."""
        ordered = sorted(latencies)
        return cls(n_threads, len(ordered), seconds, percentile_ms(ordered, 0.25),
                   percentile_ms(ordered, 0.50), percentile_ms(ordered, 0.95))


def percentile_ms(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of sorted seconds, in milliseconds; 0 when empty.

    Example:
        >>> percentile_ms([0.001, 0.002, 0.003], 0.5)
        2.0
    """
    return quantile(ordered, q) * 1e3


def run_threads(fn_factory: Callable[[int], Callable[[], object]], n: int, seconds: float, *,
                on_tick: Callable[[float], None] | None = None,
                start_timeout: float = 600.0) -> Result:
    """Run ``fn_factory(i)()`` in a loop on ``n`` threads for ``seconds``.

    ``fn_factory`` is called once per thread, on that thread, so each thread
    may hold its own state (its own clone buffers, a pinned session...).
    Each thread calls its function :data:`WARMUP_ITEMS` times before the barrier.
    ``on_tick(fraction)`` is called from the calling thread while the window
    runs (progress bars).  An exception in any thread (warm-up included) stops
    the others and is re-raised here.

    Example:
        >>> run_threads(lambda i: (lambda: None), 1, 0.05).n_threads
        1
    """
    if n < 1:
        raise ValueError(f"need at least one thread, got {n}")
    started = [0.0]
    barrier = threading.Barrier(n, action=lambda: started.__setitem__(0, time.perf_counter()))
    latencies: list[list[float]] = [[] for _ in range(n)]
    finished = [0.0] * n
    errors: list[BaseException] = []
    stop = threading.Event()

    def body(i: int) -> None:
        try:
            fn = fn_factory(i)
            for _ in range(WARMUP_ITEMS):
                fn()
            barrier.wait(timeout=start_timeout)
            deadline = started[0] + seconds
            mine = latencies[i]
            clock = time.perf_counter
            now = clock()
            while now < deadline and not stop.is_set():
                fn()
                after = clock()
                mine.append(after - now)
                now = after
            finished[i] = now
        except threading.BrokenBarrierError:
            pass  # another thread failed first; its error is the one to report
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            errors.append(exc)
            stop.set()
            barrier.abort()

    threads = [threading.Thread(target=body, args=(i,), name=f"bench-{i}", daemon=True)
               for i in range(n)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        threads[0].join(_POLL_SECONDS)
        if on_tick is not None and started[0]:
            on_tick(min(1.0, (time.perf_counter() - started[0]) / seconds))
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    wall = max(finished) - started[0]
    return Result.from_latencies(n, [x for per in latencies for x in per], wall)
