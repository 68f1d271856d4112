"""How far behind the pipeline is, without a column of insert times in the app's table.

The app's table has no insert time we could trust, and reading the age of every
pending row would scan the backlog. What we measure instead, cheaply:

- a row handed to the workers is in the slot's in-flight set, scored with the time the
  scheduler enqueued it (a row is claimed within milliseconds of its INSERT's commit
  when the NOTIFY trigger is on, so for fresh rows this is close to the insert time);
- for rows not claimed yet (waiting behind `max_inflight_rows`), the scheduler records
  when its last complete sweep of a slot started: every row pending then has been
  claimed since, so an unclaimed row became pending after it. Its age is an upper bound.

The oldest pending row's age is the larger of the two (0 when nothing is pending).
"""

from __future__ import annotations

import time

import redis

from pgreembed.queue.claims import UNCONFIRMED_SECONDS, InFlight


def swept_key(slot_id: int, namespace: str = "pgreembed") -> str:
    return f"{namespace}:swept:{slot_id}"


def record_complete_sweep(client: redis.Redis, slot_id: int, started_at: float) -> None:
    """A sweep that started at `started_at` reached the end of the slot's pending rows."""
    client.set(swept_key(slot_id), repr(started_at))


def oldest_claim_age(inflight: InFlight, now: float) -> float | None:
    """Age of the oldest confirmed claim (provisional ones are scored a lease back)."""
    floor = now - inflight.lease_seconds + UNCONFIRMED_SECONDS
    found = inflight.client.zrangebyscore(inflight.key, floor, "+inf", start=0, num=1,
                                          withscores=True)
    return max(0.0, now - float(found[0][1])) if found else None


def oldest_pending_seconds(client: redis.Redis, slot_id: int, lease_seconds: int,
                           pending: int, in_flight: int, created_at: float,
                           now: float | None = None) -> float:
    """Age of the oldest pending row of a slot, as described in the module docstring.

    `created_at` (the slot's registration) bounds rows never swept yet.
    """
    if pending <= 0 and in_flight <= 0:
        return 0.0
    now = time.time() if now is None else now
    inflight = InFlight(client, slot_id, lease_seconds)
    age = oldest_claim_age(inflight, now) or 0.0
    if pending > in_flight:  # some pending rows are not claimed yet
        raw = client.get(swept_key(slot_id))
        since = float(raw) if raw is not None else created_at
        age = max(age, now - since)
    return age
