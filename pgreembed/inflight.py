"""Which rows are in flight: a Redis sorted set per slot, scored by enqueue time.

The markers live in the same Redis as the queue on purpose: if Redis loses its
data, queue and markers go together and the next scheduler pass rebuilds both
from Postgres. A marker older than the lease is dropped, so a message lost any
other way (dead-lettered after its retries) delays its rows by the lease, never
forever.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import redis

# Add the members that are not there yet; return those (atomically, one round trip).
_CLAIM = """
local added = {}
for i, member in ipairs(ARGV) do
    if i > 1 and redis.call('ZADD', KEYS[1], 'NX', ARGV[1], member) == 1 then
        added[#added + 1] = member
    end
end
return added
"""


class InFlight:
    """Claims rows of one slot before they are enqueued; releases them when done."""

    def __init__(self, client: redis.Redis, slot_id: int, lease_seconds: int,
                 namespace: str = "pgreembed") -> None:
        self.client = client
        self.key = f"{namespace}:inflight:{slot_id}"
        self.lease_seconds = lease_seconds
        self._claim = client.register_script(_CLAIM)

    def claim(self, keys: Sequence[str]) -> list[str]:
        """The subset of `keys` not already in flight, now marked as in flight."""
        if not keys:
            return []
        added = self._claim(keys=[self.key], args=[time.time(), *keys])
        return [k.decode() if isinstance(k, bytes) else str(k) for k in added]

    def release(self, keys: Iterable[str]) -> None:
        members = list(keys)
        if members:
            self.client.zrem(self.key, *members)

    def expire_stale(self) -> int:
        """Drop markers older than the lease; returns how many."""
        return int(self.client.zremrangebyscore(self.key, "-inf", time.time() - self.lease_seconds))

    def count(self) -> int:
        return int(self.client.zcard(self.key))
