"""Prometheus metrics of a served registry (``GET /metrics``).

Counted per request by the app (plain counts, made metric families at scrape
time): ``multipy_requests_total{model,status}`` and
``multipy_request_duration_seconds{model}``.  Read from the registry and the
manager at scrape time (nothing per request): the batch-size histogram, queue
depth, requests running, busy and live interpreters, restarts, and the bytes of
weights every interpreter maps from one shared copy.  Each app has its own ``CollectorRegistry``, so several
apps (tests, a Ray replica) can live in one process.
"""

from __future__ import annotations

import bisect

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .registry import ModelRegistry

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The metrics of one app.

    >>> metrics = Metrics(registry)                             # doctest: +SKIP
    >>> metrics.request("simple", 200, 0.0012)                  # doctest: +SKIP
    >>> body = metrics.render()                                 # doctest: +SKIP
    """

    def __init__(self, registry: ModelRegistry) -> None:
        self.prometheus = CollectorRegistry(auto_describe=True)
        # Counted in plain dicts and lists, turned into metric families at scrape
        # time: prometheus_client's Counter.inc and Histogram.observe take a lock
        # per value and look for the bucket in Python, several µs per request.
        self._requests: dict[tuple[str, int], int] = {}
        self._durations: dict[str, list] = {}  # model -> [count per bucket (+Inf last), sum]
        self.prometheus.register(_RequestCollector(self))
        self.prometheus.register(_PoolCollector(registry))

    def request(self, model: str, status: int, seconds: float) -> None:
        """Count one answered request (on the event loop's thread)."""
        key = (model, status)
        self._requests[key] = self._requests.get(key, 0) + 1
        duration = self._durations.get(model)
        if duration is None:
            duration = self._durations[model] = [[0] * (len(_LATENCY_BUCKETS) + 1), 0.0]
        duration[0][bisect.bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        duration[1] += seconds

    def render(self) -> bytes:
        """The text exposition format (``CONTENT_TYPE_LATEST``)."""
        return generate_latest(self.prometheus)


class _RequestCollector:
    """``multipy_requests_total`` and ``multipy_request_duration_seconds`` from the
    counts :meth:`Metrics.request` keeps."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self):
        return []

    def collect(self):
        metrics = self._metrics
        requests = CounterMetricFamily("multipy_requests", "Inference requests answered, by "
                                       "model and HTTP status", labels=["model", "status"])
        for (model, status), n in list(metrics._requests.items()):
            requests.add_metric([model, str(status)], n)
        duration = HistogramMetricFamily("multipy_request_duration_seconds", "Time from a "
                                         "request's arrival to its answer", labels=["model"])
        for model, (counts, total) in list(metrics._durations.items()):
            buckets, seen = [], 0
            for bound, n in zip((*_LATENCY_BUCKETS, float("inf")), counts):
                seen += n
                buckets.append(("+Inf" if bound == float("inf") else str(bound), seen))
            duration.add_metric([model], buckets, total)
        yield requests
        yield duration


class _PoolCollector:
    """Gauges and counters read from the registry and the manager at scrape time."""

    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry

    def describe(self):
        return []

    def collect(self):
        registry = self._registry
        queue = GaugeMetricFamily("multipy_queue_depth", "Requests waiting for an interpreter",
                                  labels=["model"])
        running = GaugeMetricFamily("multipy_requests_running", "Requests running in an "
                                    "interpreter", labels=["model"])
        weights = GaugeMetricFamily("multipy_model_weights_bytes", "Tensor bytes of the model's "
                                    "package, mapped once and shared by every interpreter",
                                    labels=["model"])
        for model in registry:
            queue.add_metric([model.name], model.waiting)
            running.add_metric([model.name], model.running)
            weights.add_metric([model.name], registry.weights_bytes[model.name])
        batches = HistogramMetricFamily("multipy_batch_size", "Requests per call of the model",
                                        labels=["model"])
        for model in registry:
            sizes = model.batch_sizes()
            buckets = [(str(float(le)), sum(n for size, n in sizes.items() if size <= le))
                       for le in _BATCH_BUCKETS]
            buckets.append(("+Inf", sum(sizes.values())))
            batches.add_metric([model.name], buckets, sum(s * n for s, n in sizes.items()))
        yield from (queue, running, weights, batches)
        if registry.manager.closed:
            return
        stats = registry.manager.statistics().interpreters
        yield GaugeMetricFamily("multipy_interpreters", "Interpreters in the pool",
                                value=len(stats))
        yield GaugeMetricFamily("multipy_interpreters_up", "Interpreters serving now (not "
                                "crashed or restarting)", value=sum(i.available for i in stats))
        yield GaugeMetricFamily("multipy_interpreters_busy", "Interpreters running a call now",
                                value=sum(i.in_flight > 0 for i in stats))
        restarts = CounterMetricFamily("multipy_interpreter_restarts", "Interpreters restarted "
                                       "after a crash or a timeout", labels=["interpreter"])
        for i in stats:
            restarts.add_metric([str(i.index)], i.restarts)
        yield restarts
