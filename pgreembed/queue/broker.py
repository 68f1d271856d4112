"""The Dramatiq broker (Redis), built from Settings, so the queue and the claims share a Redis.

Dramatiq's Redis broker is at-least-once: messages of a worker that died are
requeued once its heartbeat is older than `heartbeat_timeout`, by a
maintenance pass that runs on a random fraction of commands. The defaults
(60 s, rare passes) mean minutes; we use seconds (Settings.heartbeat_ms).
"""

from __future__ import annotations

from dramatiq.brokers.redis import RedisBroker

from pgreembed.config import Settings


def make_broker(settings: Settings) -> RedisBroker:
    """The broker at `settings.redis_url` (also where the in-flight claims and limiters live)."""
    return RedisBroker(url=settings.redis_url, heartbeat_timeout=settings.heartbeat_ms,
                       maintenance_chance=settings.maintenance_chance)
