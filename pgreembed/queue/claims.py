"""Which rows are in flight: a Redis sorted set per slot, scored by enqueue time.

The markers live in the same Redis as the queue on purpose: if Redis loses its
data, queue and markers go together and the next scheduler pass rebuilds both
from Postgres. A marker older than the lease is dropped, so a message lost any
other way (dead-lettered after its retries) delays its rows by the lease, never
forever.

A claim is provisional until its message is on the queue: it expires after
`UNCONFIRMED_SECONDS` unless `confirm` is called, so a scheduler killed
between claiming rows and enqueueing them delays those rows by seconds, not
by a whole lease.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import redis

UNCONFIRMED_SECONDS = 10.0

# Add the members that are not there yet; return those (atomically, one round trip).
_CLAIM = (Path(__file__).parent / "claim.lua").read_text()


class InFlight:
    """Claims rows of one slot before they are enqueued; releases them when done."""

    def __init__(self, client: redis.Redis, slot_id: int | str, lease_seconds: int,
                 namespace: str = "pgreembed") -> None:
        self.client = client
        self.key = f"{namespace}:inflight:{slot_id}"
        self.lease_seconds = lease_seconds
        self._claim = client.register_script(_CLAIM)

    def claim(self, keys: Sequence[str]) -> list[str]:
        """The subset of `keys` not already in flight, now marked as in flight
        (provisionally: `confirm` them once their message is enqueued)."""
        if not keys:
            return []
        # Scored as if claimed a lease ago, less a few seconds: expire_stale drops it soon.
        provisional = time.time() - self.lease_seconds + min(UNCONFIRMED_SECONDS,
                                                             self.lease_seconds)
        added = self._claim(keys=[self.key], args=[provisional, *keys])
        return [k.decode() if isinstance(k, bytes) else str(k) for k in added]

    def confirm(self, keys: Sequence[str]) -> None:
        """Their message is on the queue: keep the claims for the whole lease (only
        claims still there: a fast worker may have released them already)."""
        if keys:
            now = time.time()
            self.client.zadd(self.key, {key: now for key in keys}, xx=True)

    def release(self, keys: Iterable[str]) -> None:
        members = list(keys)
        if members:
            self.client.zrem(self.key, *members)

    def expire_stale(self) -> int:
        """Drop markers older than the lease; returns how many."""
        return int(self.client.zremrangebyscore(self.key, "-inf", time.time() - self.lease_seconds))

    def claimed_at(self, keys: Sequence[str]) -> dict[str, float]:
        """When each of `keys` was enqueued (confirmed claims only; one round trip)."""
        if not keys:
            return {}
        floor = time.time() - self.lease_seconds + UNCONFIRMED_SECONDS
        scores = self.client.zmscore(self.key, list(keys))
        return {k: float(v) for k, v in zip(keys, scores, strict=True)
                if v is not None and float(v) > floor}

    def count(self) -> int:
        return int(self.client.zcard(self.key))


# A chunk batch takes seconds, not an embedding backlog's hour: a batch lost any way other
# than a redelivery (Dramatiq's) leaves its parents unclaimed this soon.
CHUNK_LEASE_SECONDS = 120


def chunk_claims(client: redis.Redis, chunk_set: str, lease_seconds: int) -> InFlight:
    """The dirty parents of one chunk set sent to the workers and not applied yet (keys as
    text): the scheduler sends a parent at most once at a time, as rows of a slot."""
    return InFlight(client, f"chunk:{chunk_set}", min(lease_seconds, CHUNK_LEASE_SECONDS))
