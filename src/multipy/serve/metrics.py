"""Prometheus metrics of a served registry (``GET /metrics``).

Counted per request by the app: ``multipy_requests_total{model,status}`` and
``multipy_request_duration_seconds{model}``.  Read from the registry and the
manager at scrape time (nothing per request): the batch-size histogram, queue
depth, requests running, busy and live interpreters, restarts, and the bytes of
weights every interpreter maps from one shared copy.  Each app has its own ``CollectorRegistry``, so several
apps (tests, a Ray replica) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
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
        self.requests = Counter("multipy_requests", "Inference requests answered, by model and "
                                "HTTP status", ["model", "status"], registry=self.prometheus)
        self.duration = Histogram("multipy_request_duration_seconds", "Time from a request's "
                                  "arrival to its answer", ["model"], buckets=_LATENCY_BUCKETS,
                                  registry=self.prometheus)
        self.prometheus.register(_PoolCollector(registry))
        self._children: dict[tuple[str, int], tuple] = {}  # labels() costs µs per request

    def request(self, model: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        children = self._children.get((model, status))
        if children is None:
            children = self._children[model, status] = (
                self.requests.labels(model, str(status)), self.duration.labels(model))
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        """The text exposition format (``CONTENT_TYPE_LATEST``)."""
        return generate_latest(self.prometheus)


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
