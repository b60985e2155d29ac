"""Scale-out on Ray Serve: the same FastAPI app (and the same continuous batching) in each replica.

One replica per device: with GPUs each replica asks Ray for one (``num_gpus=1``, so Ray gives it its
own ``CUDA_VISIBLE_DEVICES``), on CPU for ``cpus_per_replica`` cores. Ray Serve's HTTP proxy spreads
requests and WebSocket streams over the replicas; inside a replica, ``create_app`` runs its own
:class:`EngineWorker`. The app is built on the replica by a builder function (``serve.ingress(builder)``),
so the engine is loaded there, not pickled from the driver. ``dh-serve --replicas N`` calls :func:`run`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading

from .config import ServeConfig

log = logging.getLogger(__name__)


def deployment(config: ServeConfig, *, replicas: int, gpus_per_replica: float | None = None,
               cpus_per_replica: float = 1.0):
    """A bound Ray Serve application of ``replicas`` copies of dh-serve's app (import ray lazily)."""
    from ray import serve

    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if _cuda_devices() else 0.0
    fields = dataclasses.asdict(config)

    def build_app():  # evaluated on each replica
        from .app import create_app

        return create_app(ServeConfig(**fields), load_in_background=False)  # routed to once loaded

    ingress = serve.ingress(build_app)
    cls = serve.deployment(
        ingress(),
        name="dheads",
        num_replicas=replicas,
        ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica},
        max_ongoing_requests=config.max_streams + config.max_queue,
        health_check_period_s=10,
    )
    return cls.bind()


def _cuda_devices() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


# Ray Serve restarts its HTTP proxy when a readiness/health check takes over 5-10 s; on a few busy cores
# (engine loads, other jobs) that turns into a restart loop. Longer defaults, unless set otherwise:
PATIENT_CHECKS = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


def start(config: ServeConfig, *, replicas: int, num_cpus: int | None = None, **kw):
    """Start Ray (local), Ray Serve's proxy on ``config.host:port``, and the application; returns its handle."""
    for k, v in PATIENT_CHECKS.items():
        os.environ.setdefault(k, v)  # before ray.init: Ray's processes inherit the driver's environment
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": config.host, "port": config.port})
    return serve.run(deployment(config, replicas=replicas, **kw), name="dheads", route_prefix="/")


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def run(config: ServeConfig, *, replicas: int) -> None:
    """``dh-serve --replicas N``: serve until SIGINT/SIGTERM, then shut Ray Serve down.

    Ray's C++ core installs absl's failure-signal handler in the driver, which turns SIGTERM into an abort
    (exit 134, a stack dump) before Python sees it; ``RAY_DISABLE_FAILURE_SIGNAL_HANDLER=1`` (unless set
    otherwise) leaves SIGTERM to the handler below, so the stop is clean.
    """
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    try:
        start(config, replicas=replicas, num_cpus=max(replicas, 2))
    except SystemExit as e:  # ray.init's own SIGTERM handler (sys.exit(15)) fired while the app was starting
        if e.code != signal.SIGTERM:
            raise
        log.info("stopping Ray Serve (SIGTERM while starting)")
        stop()
        return
    log.info("Ray Serve: %d replicas of dh-serve on http://%s:%d", replicas, config.host, config.port)
    done = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: done.set())
    done.wait()
    log.info("stopping Ray Serve")
    stop()
