"""The actor the workers run: embed one batch of rows of one slot.

Retries are deliberate (not Dramatiq's 20 retries over ~30 days): the provider
layer already retried transient errors in-process, so a failed message is
retried a few times with back-off; after that its rows come back through the
scheduler once their in-flight lease expires.
"""

from __future__ import annotations

import functools
import logging

import dramatiq
import redis

from pgreembed.batch import process_batch
from pgreembed.config import Settings, load_settings
from pgreembed.inflight import InFlight
from worker.broker import QUEUE

log = logging.getLogger(__name__)


@functools.cache
def settings() -> Settings:
    """Read once per worker process, from $PGREEMBED_CONFIG and the environment."""
    return load_settings()


@functools.cache
def redis_client() -> redis.Redis:
    return redis.Redis.from_url(settings().redis_url)


@dramatiq.actor(queue_name=QUEUE, max_retries=4, min_backoff=2_000, max_backoff=120_000,
                time_limit=15 * 60 * 1000)
def embed_batch(target: str, slot_id: int, keys: list[str]) -> None:
    """Embed `keys` of `target`'s slot and release their in-flight markers."""
    config = settings()
    process_batch(config, target, slot_id, keys)
    # Only on success: a failing message keeps its rows claimed while Dramatiq retries it.
    InFlight(redis_client(), slot_id, config.lease_seconds).release(keys)
