"""multipy as a Ray Serve application: replicas that each own an interpreter pool.

::

    HTTP client ──▶ Serve proxy (one per node, at the app's route prefix)
                       │ picks a replica (power of two choices, max_ongoing_requests each)
                       ▼
    replica = one Ray actor, num_cpus = interpreters           Python caller
       │ ASGI: build_app(registry), the very app `multipy serve` runs    │
       │                                                   DeploymentHandle.infer
       ▼                                                               ▼
    ModelRegistry ── ServedModel.infer  (admission, deadlines, the library's batching)
       ▼
    InterpreterManager ──▶ interpreters (processes), restarted when they die
       │
       └── weights: the package file mapped copy-on-write by every interpreter, so
           the page cache holds one copy per machine however many replicas run there

A replica is a Ray actor that owns one :class:`~multipy.InterpreterManager`
and one :class:`~multipy.serve.ModelRegistry`; Serve's HTTP proxy hands it
ASGI requests, which the Starlette app of :mod:`multipy.serve` answers: the
same v2 codec, admission and error statuses as ``multipy serve``.  Ray adds
what one machine cannot: replicas on many nodes, one entry point, autoscaling
and the replacement of a replica that dies.  Serve's own request batching
(``@serve.batch``) is not used: rows are grouped by the library's batching,
which never waits a timer while an interpreter is idle.

Needs the ``ray`` extra (``pip install 'multipy[ray]'``); ``import multipy``
never imports Ray.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from typing import Any

try:
    from ray import serve
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "multipy.ray needs Ray Serve, which is not installed: pip install 'multipy[ray]' "
        f"(or 'ray[serve]>=2.58'); the import failed with: {exc}") from exc

from .runtime import InterpreterManager, ManagerStatistics
from .serve import ModelRegistry, ModelSpec, ServeOptions

#: Environment of every replica (``ray_actor_options["runtime_env"]`` may override it).
#: The app never blocks its event loop (the interpreters do the work), so Serve may run
#: it on the replica's own loop instead of handing every request to a second thread.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}

#: Serve's logging options of every replica (``logging_config`` may override them): no
#: access log line per request, as ``multipy serve`` (a line costs the replica's event
#: loop CPU time on every request).
REPLICA_LOGGING = {"enable_access_log": False}

__all__ = ["REPLICA_ENV", "REPLICA_LOGGING", "MultipyDeployment", "ReplicaStatistics", "app", "from_config", "run"]


@dataclasses.dataclass(frozen=True)
class ReplicaStatistics:
    """One replica's process and its pool (``await handle.statistics.remote()``).

    >>> stats = handle.statistics.remote().result()            # doctest: +SKIP
    >>> [i.pid for i in stats.manager.interpreters]  # doctest: +SKIP
    [40211]
    """

    #: The replica's own process (a Ray actor).
    pid: int
    #: The Ray node it runs on.
    node_id: str
    #: The :meth:`InterpreterManager.statistics` of its pool.
    manager: ManagerStatistics


@serve.deployment(name="multipy")
@serve.ingress()
class MultipyDeployment:
    """A Serve replica: one interpreter pool serving the v2 REST routes.

    Built by :func:`app`; HTTP requests reach the app of :mod:`multipy.serve`,
    Python callers use :meth:`infer` through a ``DeploymentHandle``.
    """

    def __init__(self, models: Mapping[str, ModelSpec], options: ServeOptions, interpreters: int,
                 backend: str, num_threads: int) -> None:
        from .serve import build_app

        # Ray sets OMP_NUM_THREADS=1 in replicas; each interpreter sets torch's
        # thread count itself from the CPUs this replica reserved.
        manager = InterpreterManager(interpreters, backend=backend, num_threads=num_threads)
        try:
            self._registry = ModelRegistry(manager, models, options, owns_manager=True)
        except BaseException:
            manager.close()
            raise
        self._app = build_app(self._registry)

    def __serve_build_asgi_app__(self):
        return self._app

    async def infer(self, model: str, /, *args: Any, timeout: float | None = None) -> Any:
        """``model(*args)`` through the same admission and batching as an HTTP
        request; ``timeout`` (s) defaults to the app's ``request_timeout``.

        >>> handle = serve.run(multipy.ray.app({"simple": "simple.pt"}))   # doctest: +SKIP
        >>> handle.infer.remote("simple", torch.ones(1, 10)).result()  # doctest: +SKIP
        tensor([[...]])
        """
        served = self._registry.get(model)
        limit = self._registry.options.request_timeout if timeout is None else timeout
        return await served.infer(args, deadline=time.monotonic() + limit)

    def statistics(self) -> ReplicaStatistics:
        """This replica's pid, node and pool statistics."""
        import ray

        return ReplicaStatistics(os.getpid(), ray.get_runtime_context().get_node_id(),
                                 self._registry.manager.statistics())

    def check_health(self) -> None:
        # Serve replaces a replica whose health check raises.  A pool restarting a
        # crashed interpreter is still healthy: only a closed one is not.
        if self._registry.manager.closed:
            raise RuntimeError("this replica's interpreter pool is closed")


def app(models: Mapping[str, str | os.PathLike | ModelSpec], /, *, interpreters: int = 2,
        num_replicas: int | str = 1, backend: str = "process", num_threads: int | None = None,
        max_ongoing_requests: int | None = None, max_queued_requests: int | None = None,
        autoscaling_config: Mapping[str, Any] | None = None,
        ray_actor_options: Mapping[str, Any] | None = None,
        logging_config: Mapping[str, Any] | None = None, **options: Any):
    """A Ray Serve application serving ``models`` with the v2 REST routes.

    ``models`` maps a name to ``"path[:package/resource]"``, as ``multipy
    serve NAME=PATH``; every path must exist on every node that runs a replica
    (a shared volume or the image).  Each replica owns ``interpreters``
    interpreters and reserves as many CPUs (``ray_actor_options`` may say
    otherwise); torch's thread count in each interpreter is ``num_threads``
    (default: the replica's CPUs divided among its interpreters).

    ``max_ongoing_requests``, ``max_queued_requests``, ``autoscaling_config``
    and ``logging_config`` are Serve's deployment options, passed through;
    with ``autoscaling_config`` (or ``num_replicas="auto"``) Serve chooses the
    number of replicas.  Replicas write no access log line per request, as
    ``multipy serve`` (``/metrics`` counts requests); ``logging_config=
    {"enable_access_log": True}`` turns Serve's on.  The other keyword ``options`` are those of
    ``multipy serve`` (:class:`~multipy.serve.ServeOptions`: ``max_batch_size``,
    ``max_queue``, ``request_timeout``...).

    >>> from ray import serve                                    # doctest: +SKIP
    >>> import multipy.ray  # doctest: +SKIP
    >>> handle = serve.run(multipy.ray.app({"simple": "simple.pt"}, interpreters=2,  # doctest: +SKIP
    ...                                    num_replicas=2, max_batch_size=8),
    ...                    route_prefix="/")
    >>> handle.infer.remote("simple", torch.ones(1, 10)).result()  # doctest: +SKIP
    """
    if not isinstance(interpreters, int) or interpreters < 1:
        raise ValueError(f"interpreters must be a positive int, got {interpreters!r}")
    if not models:
        raise ValueError("serve at least one model: app({'name': 'path.pt'})")
    try:
        serve_options = ServeOptions(**options)
    except TypeError:
        known = ", ".join(f.name for f in dataclasses.fields(ServeOptions))
        unknown = ", ".join(sorted(set(options) - {f.name for f in dataclasses.fields(ServeOptions)}))
        raise TypeError(f"app() got unknown option(s) {unknown}; the server's options are {known}, "
                        "and Serve's are max_ongoing_requests, max_queued_requests, "
                        "autoscaling_config, ray_actor_options, logging_config, num_replicas"
                        ) from None
    specs = {}
    for name, where in models.items():
        spec = where if isinstance(where, ModelSpec) else ModelSpec.parse(name, os.fspath(where))
        if not os.path.exists(spec.path):
            raise FileNotFoundError(f"model {name!r}: package {spec.path!r} does not exist; "
                                    "every replica opens the same path on its own node")
        specs[name] = dataclasses.replace(spec, path=os.path.abspath(spec.path))
    actor_options = {"num_cpus": interpreters, **(ray_actor_options or {})}
    runtime_env = dict(actor_options.get("runtime_env") or {})
    runtime_env["env_vars"] = {**REPLICA_ENV, **(runtime_env.get("env_vars") or {})}
    actor_options["runtime_env"] = runtime_env
    if num_threads is None:
        num_threads = max(1, int(actor_options["num_cpus"]) // interpreters)
    deployment_options: dict[str, Any] = {
        "ray_actor_options": actor_options,
        "logging_config": {**REPLICA_LOGGING, **(logging_config or {})}}
    if autoscaling_config is not None:
        deployment_options["autoscaling_config"] = dict(autoscaling_config)
    else:
        deployment_options["num_replicas"] = num_replicas
    if max_ongoing_requests is not None:
        deployment_options["max_ongoing_requests"] = max_ongoing_requests
    if max_queued_requests is not None:
        deployment_options["max_queued_requests"] = max_queued_requests
    return MultipyDeployment.options(**deployment_options).bind(
        specs, serve_options, interpreters, backend, num_threads)


def from_config(args: Mapping[str, Any]):
    """The application a Serve config file describes (``import_path:
    multipy.ray:from_config``): ``args`` are :func:`app`'s keywords, ``models``
    among them.

    .. code-block:: yaml

        applications:
          - name: multipy
            route_prefix: /
            import_path: multipy.ray:from_config
            args: {models: {simple: /models/simple.pt}, interpreters: 2, max_batch_size: 8}

    >>> from_config({"models": {"simple": "simple.pt"}, "interpreters": 2})  # doctest: +SKIP
    """
    settings = dict(args)
    try:
        models = settings.pop("models")
    except KeyError:
        raise ValueError("the application's args need models: {name: path}") from None
    return app(models, **settings)


def run(models: Mapping[str, str | os.PathLike | ModelSpec], /, *, address: str | None = None,
        replicas: int = 1, interpreters: int = 2, host: str = "127.0.0.1", port: int = 8000,
        name: str = "multipy", route_prefix: str = "/", on_ready=None, **options: Any) -> None:
    """Serve ``models`` on Ray until SIGINT or SIGTERM (what ``multipy serve --ray`` runs).

    Without ``address`` a Ray instance is started on this machine (loopback
    only) and shut down on exit; with one (``"auto"``, ``"ray://head:10001"``,
    ``"127.0.0.1:6379"``) the application joins that cluster and only the
    application is deleted on exit.  Serve's HTTP proxy listens on
    ``host:port`` unless Serve already runs on the cluster with other HTTP
    options.  ``on_ready(url)`` is called once the application serves.

    >>> run({"simple": "simple.pt"}, replicas=2, interpreters=1)   # doctest: +SKIP
    """
    import signal

    import ray

    application = app(models, interpreters=interpreters, num_replicas=replicas, **options)
    if address is None:
        cpus = os.cpu_count() or 1
        if replicas * interpreters > cpus:
            raise ValueError(f"{replicas} replicas x {interpreters} interpreters reserve "
                             f"{replicas * interpreters} CPUs; this machine has {cpus}: "
                             "use fewer interpreters per replica, or join a larger cluster "
                             "with address=...")
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
    else:
        ray.init(address=address, configure_logging=False)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name=name, route_prefix=route_prefix)
        if on_ready is not None:
            on_ready(f"http://{host}:{port}{route_prefix.rstrip('/')}")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass  # SIGINT or SIGTERM: stop serving, exit normally
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            # Deleting the application stops its replicas and their interpreters
            # gracefully.  A Ray started here then stops Serve's controller and proxy
            # with it; serve.shutdown() would make Ray print failed task retries (the
            # controller kills itself while the call waits on it).  On a cluster that
            # was joined, Serve keeps running for its other applications.
            serve.delete(name)
        finally:
            ray.shutdown()


def _interrupt(sig, frame) -> None:
    raise KeyboardInterrupt
