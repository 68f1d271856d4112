"""Per-slot counts: what is embedded, pending, stale, outdated or failed.

The default counts stay cheap on a table of any size, because they only read what is
small (pgreembed.store.counts): rows without a vector through the slot's partial index
(a sample of pages past 50,000 of them), failures through the state table's partial
index, outdated vectors through its (model, pk) index. The table's row count is
Postgres's own (the statistics' live-row counter, else `pg_class.reltuples`), so `total`
and `embedded` (total minus rows without a vector) are labelled estimates, and so are
`pending` and `stale` when sampled. `exact=True` counts every row with one scan of the
table and its state table, which takes seconds per million rows (`pgreembed status
--exact`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import psycopg
import redis

from pgreembed.config import Settings, Target
from pgreembed.observability.redact import redact
from pgreembed.queue.claims import InFlight
from pgreembed.store.catalog import estimated_rows, regclass
from pgreembed.store.counts import cheap_counts, exact_counts
from pgreembed.store.slots import Slot, load_slots
from pgreembed.store.takeover import pgai_keeps_current
from pgreembed.store.usage import inputs_and_reused


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
    truncated: int | None  # counted only with exact=True (it needs the whole state table)
    in_flight: int | None
    # Why nothing is sent for this column (the provider refuses every request as
    # configured); None when healthy. Cleared by `pgreembed init`.
    misconfigured: str | None = None
    estimated: bool = False  # total and embedded come from the table's row estimate
    seconds: float = 0.0  # how long the counts took
    # From the usage ledger: rows written with a vector bought for them, and rows given an
    # identical text's vector without a provider call (`dedupe`).
    provider_inputs: int = 0
    reused: int = 0
    # pending and stale (and so embedded) scaled from a sample of the table's pages: the
    # backlog was too big to count at every scrape (pgreembed.store.counts)
    backlog_estimated: bool = False
    # Why nothing is dispatched for the column now: None, or the slot's paused_by
    # ('operator', 'spend_cap', 'side_fill', 'pgai': pgai's worker keeps it current, ...;
    # 'paused' for a pause of an older version that recorded no reason).
    paused_by: str | None = None
    frozen: bool = False  # adopted from pgai with an embedder pgreembed lacks (Slot.frozen)
    # pgai's worker, not pgreembed, keeps the live column current: adopted and not taken
    # over, or handed back by `import-pgai --undo` (store.takeover.pgai_keeps_current).
    pgai_in_charge: bool = False

    @property
    def coverage(self) -> float:
        """Share of the table's rows with a vector from this column's model."""
        if self.total <= 0:
            return 1.0
        return max(0.0, min(1.0, (self.embedded - self.outdated) / self.total))

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["coverage"] = round(self.coverage, 6)
        out["seconds"] = round(self.seconds, 4)
        return out


def slot_status(conn: psycopg.Connection, slot: Slot, redis_client: redis.Redis | None,
                lease_seconds: int, exact: bool = False, paused_by: str | None = None,
                pgai_keeps: bool = False) -> SlotStatus:
    started = time.perf_counter()
    estimate = None if exact else estimated_rows(conn, regclass(conn, slot.table))
    if estimate is None:  # asked for, or a table never analysed (then small, or new)
        total, embedded, pending, stale, outdated, failed, truncated = exact_counts(conn, slot)
        counted: int | None = truncated
        sampled = False
    else:
        found = cheap_counts(conn, slot, estimate)
        pending, stale, failed, outdated = found.pending, found.stale, found.failed, \
            found.outdated
        # The estimate lags behind inserts: never report fewer rows than we counted.
        total = max(estimate, found.without_vector + outdated)
        embedded, counted = total - found.without_vector, None
        sampled = found.sampled_percent is not None
    bought, reused = inputs_and_reused(conn, slot.id)
    seconds = time.perf_counter() - started
    in_flight = None
    if redis_client is not None:
        try:
            in_flight = InFlight(redis_client, slot.id, lease_seconds).count()
        except redis.RedisError:
            in_flight = None
    return SlotStatus(slot.target.name, slot.id, slot.role, slot.vector_column, slot.model_key,
                      total, embedded, pending, stale, outdated, failed, counted, in_flight,
                      None if slot.misconfigured is None else redact(slot.misconfigured),
                      estimated=estimate is not None, seconds=seconds,
                      provider_inputs=bought, reused=reused, backlog_estimated=sampled,
                      paused_by=(paused_by or "paused") if slot.paused else None,
                      frozen=slot.frozen,
                      pgai_in_charge=slot.role == "live" and pgai_keeps)


def collect(conn: psycopg.Connection, settings: Settings,
            redis_client: redis.Redis | None, exact: bool = False) -> list[SlotStatus]:
    result = []
    reasons: dict[int, str | None] = dict(conn.execute(
        "SELECT id, paused_by FROM pgreembed.slots WHERE paused").fetchall())
    for target in settings.targets.values():
        pgai = _pgai_keeps(conn, target)
        for slot in load_slots(conn, target):
            result.append(slot_status(conn, slot, redis_client, settings.lease_seconds, exact,
                                      reasons.get(slot.id), pgai_keeps=pgai))
    conn.commit()
    return result


def _pgai_keeps(conn: psycopg.Connection, target: Target) -> bool:
    """store.takeover.pgai_keeps_current; False where pgai's catalog cannot be read (a
    monitoring role without the grant, a pgai older than its `disabled` column): status
    must not fail for it."""
    try:
        with conn.transaction():
            return pgai_keeps_current(conn, target)
    except psycopg.Error:
        return False
