"""The actors the workers run: embed one batch of rows of one slot; chunk a batch of a
chunked target's dirty parents.

Retries are deliberate (not Dramatiq's 20 retries over ~30 days): the provider
layer already retried transient errors in-process, so a failed message is
retried a few times with back-off; after that Dramatiq's Retries middleware sends
`embed_batch_gave_up` (on_retry_exhausted), which hands its rows back to the scheduler.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import dramatiq
import psycopg
import redis

from pgreembed.chunking.stage import stage_parents
from pgreembed.errors import PgreembedError
from pgreembed.observability.worker_metrics import worker_metrics
from pgreembed.queue.claims import InFlight, chunk_claims
from pgreembed.queue.contract import (
    ACTOR,
    BACKFILL_ACTOR,
    BACKFILL_CHUNK_ACTOR,
    BACKFILL_PRIORITY,
    BACKFILL_QUEUE,
    CHUNK_ACTOR,
    QUEUE,
)
from pgreembed.store.pool import worker_pool
from worker.batch import process_batch
from worker.settings import knowing, settings

log = logging.getLogger(__name__)


@functools.cache
def redis_client() -> redis.Redis:
    return redis.Redis.from_url(settings().redis_url)


MAX_RETRIES = 4


def claimed_at(inflight: InFlight, keys: list[str]) -> dict[str, float] | None:
    """When the scheduler claimed each key, for the lag metric (only when it is on)."""
    if worker_metrics() is None:
        return None
    try:
        return inflight.claimed_at(keys)
    except redis.RedisError:
        return None  # the metric is not worth failing a batch for


# What Dramatiq's Retries middleware sends when embed_batch gave up (on_retry_exhausted).
RETRIES_EXHAUSTED = "embed_batch_gave_up"


@dramatiq.actor(actor_name=RETRIES_EXHAUSTED, queue_name=QUEUE, max_retries=3)
def embed_batch_gave_up(message: dict[str, Any], retries: dict[str, Any]) -> None:
    """Hand a given-up batch's rows back to the scheduler now, not after their lease."""
    target, slot_id, keys = message["args"]
    log.warning("target %s slot %d: giving up on a batch of %d rows after %s retries;"
                " they go back to the scheduler", target, slot_id, len(keys),
                retries.get("max_retries"))
    InFlight(redis_client(), slot_id, settings().lease_seconds).release(keys)


@dramatiq.actor(actor_name=ACTOR, queue_name=QUEUE, max_retries=MAX_RETRIES, min_backoff=2_000,
                max_backoff=120_000, time_limit=15 * 60 * 1000,
                on_retry_exhausted=RETRIES_EXHAUSTED)
def embed_batch(target: str, slot_id: int, keys: list[str]) -> None:
    """Embed `keys` of `target`'s slot and release their in-flight markers.

    A failing message keeps its rows claimed while Dramatiq retries it (so the
    scheduler does not enqueue them again meanwhile); once Dramatiq's retries are
    exhausted, embed_batch_gave_up releases them, so the scheduler reschedules them at
    once instead of after the lease.
    """
    config = knowing(target)
    inflight = InFlight(redis_client(), slot_id, config.lease_seconds)
    process_batch(config, target, slot_id, keys, claimed_at(inflight, keys))
    inflight.release(keys)


@dramatiq.actor(actor_name=BACKFILL_ACTOR, queue_name=BACKFILL_QUEUE,
                priority=BACKFILL_PRIORITY, max_retries=MAX_RETRIES, min_backoff=2_000,
                max_backoff=120_000, time_limit=15 * 60 * 1000,
                on_retry_exhausted=RETRIES_EXHAUSTED)
def embed_backfill_batch(target: str, slot_id: int, keys: list[str]) -> None:
    """embed_batch for a column that is not live (a migration's, a side fill's): its own
    queue and a lower priority, so the live column's new rows are not kept waiting
    behind a migration's queued batches (pgreembed.queue.contract)."""
    embed_batch.fn(target, slot_id, keys)


# The back-off is a setting; Dramatiq's Retries middleware reads it from the actor's options.
for _actor in (embed_batch, embed_backfill_batch):
    _actor.options["min_backoff"] = int(settings().retry_backoff_seconds * 1000)


@dramatiq.actor(actor_name=CHUNK_ACTOR, queue_name=QUEUE, max_retries=0,
                time_limit=5 * 60 * 1000)
def chunk_parents(target: str, chunk_set: str, keys: list[str]) -> None:
    """Split, match and apply the parents `keys` of `target`'s chunk set `chunk_set` (one
    short transaction), then release their claims. Nothing is retried here: whatever was
    not applied (a parent edited or held meanwhile, a fault) keeps its mark in Postgres,
    and the scheduler sends it again in a later pass."""
    config = knowing(target)
    claims = chunk_claims(redis_client(), chunk_set, config.lease_seconds)
    try:
        with worker_pool(config).connection() as conn:
            applied = stage_parents(conn, config, chunk_set, keys)
        log.debug("chunk set %s: %s", chunk_set, applied)
    except (psycopg.Error, PgreembedError) as exc:
        log.warning("chunk set %s: %d parents left dirty: %s: %s", chunk_set, len(keys),
                    type(exc).__name__, exc)
    except Exception:  # noqa: BLE001 - a splitter's bug: the marks stay, the batch ends
        log.exception("chunk set %s: %d parents left dirty", chunk_set, len(keys))
    finally:
        claims.release(keys)


@dramatiq.actor(actor_name=BACKFILL_CHUNK_ACTOR, queue_name=BACKFILL_QUEUE,
                priority=BACKFILL_PRIORITY, max_retries=0, time_limit=5 * 60 * 1000)
def chunk_backfill_parents(target: str, chunk_set: str, keys: list[str]) -> None:
    """chunk_parents for a re-chunk migration's other set (the new one, every parent dirty
    at its start; after the swap the old one): a live parent's edit must not wait behind
    them (pgreembed.queue.contract)."""
    chunk_parents.fn(target, chunk_set, keys)
