"""The Dramatiq broker (Redis), tuned so a killed worker's messages come back in seconds.

Dramatiq's Redis broker is at-least-once: messages of a worker that died are
requeued once its heartbeat is older than `heartbeat_timeout`, by a
maintenance pass that runs on a random fraction of commands. The defaults
(60 s, rare passes) mean minutes; we use seconds.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import CurrentMessage

from pgreembed.metrics import WORKER_PORT_ENV, require_prometheus
from worker.warmup import WarmUp

QUEUE = "pgreembed"


def make_broker(redis_url: str | None = None) -> RedisBroker:
    url = redis_url or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    broker = RedisBroker(
        url=url,
        heartbeat_timeout=int(os.environ.get("PGREEMBED_HEARTBEAT_MS", "10000")),
        maintenance_chance=int(os.environ.get("PGREEMBED_MAINTENANCE_CHANCE", "100000")),
    )
    broker.add_middleware(CurrentMessage())  # the actor reads its retry count
    broker.add_middleware(WarmUp())
    if os.environ.get(WORKER_PORT_ENV):
        # Dramatiq's own exporter: its fork runs in the `dramatiq` main process, which
        # reads dramatiq_prom_port/_host/_db from the environment it was started with.
        require_prometheus(WORKER_PORT_ENV)
        from dramatiq.middleware.prometheus import Prometheus

        broker.add_middleware(Prometheus())
    dramatiq.set_broker(broker)
    return broker
