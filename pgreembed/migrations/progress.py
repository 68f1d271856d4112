"""`migrate status`: how far a migration's new column is filled, at what rate and spend."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from pgreembed.config import Settings, Target
from pgreembed.migrations.index import ColumnIndex, column_indexes
from pgreembed.migrations.state import Migration, require_open, slots_by_id
from pgreembed.store.pool import connect
from pgreembed.store.usage import spend


@dataclass(frozen=True)
class Progress:
    migration: Migration
    column: str
    model: str
    total: int
    done: int
    failed: int
    rate_per_second: float
    eta_seconds: float | None
    paused: bool
    indexes: list[ColumnIndex]
    tokens: int
    spend_usd: float
    spend_cap_usd: float | None
    paused_by: str | None = None  # "operator" or "spend_cap"


def progress(settings: Settings, target: Target) -> Progress:
    with connect(settings.database_url) as conn:
        migration = require_open(conn, target)
        slots = slots_by_id(conn, target)
        slot = slots.get(migration.to_slot) or slots[migration.from_slot]
        if slot.role == "live":  # after a swap, report on the column being kept for rollback
            slot = slots[migration.from_slot]
        row = conn.execute(sql.SQL(
            """
            SELECT count(*), count(a.{v}), count(s.pgr_failed_hash),
                   count(*) FILTER (WHERE s.pgr_embedded_at > now() - interval '60 seconds')
            FROM {rows}
            """).format(v=slot.vector, rows=slot.rows_with_state(outer=True))
        ).fetchone()
        assert row is not None
        indexes = column_indexes(conn, slot)
        tokens, spent, cap = spend(conn, migration.to_slot)
        paused_by = conn.execute("SELECT paused_by FROM pgreembed.slots WHERE id = %s AND"
                                 " paused", (slot.id,)).fetchone()
    total, done, failed, recent = (int(x) for x in row)
    rate = recent / 60.0
    left = total - done - failed
    # A paused fill does not finish: no ETA (its recent rate would promise one).
    eta = None if slot.paused and left else (
        (left / rate) if rate > 0 else (0.0 if left == 0 else None))
    return Progress(migration, slot.vector_column, slot.model_key, total, done, failed, rate,
                    eta, slot.paused, indexes, tokens, spent, cap,
                    paused_by[0] if paused_by else None)
