"""Exact per-slot counts: what is embedded, pending, stale, outdated or failed."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import psycopg
import redis
from psycopg import sql

from pgreembed.config import Settings
from pgreembed.inflight import InFlight
from pgreembed.redact import redact
from pgreembed.slots import Slot, load_slots


@dataclass(frozen=True)
class SlotStatus:
    target: str
    slot: int
    role: str
    column: str
    model: str
    total: int
    embedded: int
    pending: int
    stale: int
    outdated: int
    failed: int
    truncated: int
    in_flight: int | None
    # Why nothing is sent for this column (the provider refuses every request as
    # configured); None when healthy. Cleared by `pgreembed init`.
    misconfigured: str | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def slot_status(conn: psycopg.Connection, slot: Slot, redis_client: redis.Redis | None,
                lease_seconds: int) -> SlotStatus:
    row = conn.execute(sql.SQL(
        """
        SELECT count(*),
               count(*) FILTER (WHERE a.{vector} IS NOT NULL),
               count(*) FILTER (WHERE a.{vector} IS NULL AND s.pgr_failed_hash IS NULL),
               count(*) FILTER (WHERE a.{vector} IS NULL AND s.pgr_hash IS NOT NULL
                                  AND s.pgr_failed_hash IS NULL),
               count(*) FILTER (WHERE a.{vector} IS NOT NULL AND s.pgr_model_id <> %s),
               count(*) FILTER (WHERE s.pgr_failed_hash IS NOT NULL),
               count(*) FILTER (WHERE s.pgr_truncated)
        FROM {table} a LEFT JOIN {state} s ON s.pgr_pk = a.{pk}
        """
    ).format(vector=slot.vector, table=slot.table, state=slot.state_table, pk=slot.pk),
        (slot.model_id,)).fetchone()
    assert row is not None
    in_flight = None
    if redis_client is not None:
        try:
            in_flight = InFlight(redis_client, slot.id, lease_seconds).count()
        except redis.RedisError:
            in_flight = None
    return SlotStatus(slot.target.name, slot.id, slot.role, slot.vector_column, slot.model_key,
                      row[0], row[1], row[2], row[3], row[4], row[5], row[6], in_flight,
                      None if slot.misconfigured is None else redact(slot.misconfigured))


def collect(conn: psycopg.Connection, settings: Settings,
            redis_client: redis.Redis | None) -> list[SlotStatus]:
    result = []
    for target in settings.targets.values():
        for slot in load_slots(conn, target):
            result.append(slot_status(conn, slot, redis_client, settings.lease_seconds))
    conn.commit()
    return result

