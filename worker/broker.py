"""The workers' broker: the shared Redis broker plus the middleware only workers need."""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from pgreembed.config import Settings, environment
from pgreembed.observability.worker_metrics import WORKER_PORT_ENV, require_prometheus
from pgreembed.queue.broker import make_broker
from worker.warmup import WarmUp


def worker_broker(settings: Settings) -> RedisBroker:
    """Build the broker from `settings`, add the workers' middleware and make it global."""
    broker = make_broker(settings)
    broker.add_middleware(WarmUp())
    if environment.WORKER_METRICS_PORT.get():
        # Dramatiq's own exporter: its fork runs in the `dramatiq` main process, which
        # reads dramatiq_prom_port/_host/_db from the environment it was started with.
        require_prometheus(WORKER_PORT_ENV)
        from dramatiq.middleware.prometheus import Prometheus

        broker.add_middleware(Prometheus())
    dramatiq.set_broker(broker)
    return broker
