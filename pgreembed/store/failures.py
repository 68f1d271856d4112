"""Rows that could not be embedded, in every column being kept filled, and retrying them.

A target has up to three slots: the live column, during a migration the
incoming 'next' column, after a swap the 'old' column kept for rollback. A row
can fail in one and not in another (another model, other limits), so every
record is labelled by column, model and role, and a retry can be limited to one
column. A failure record of a row deleted from the app's table is nobody's
failure: listing, counting and retrying start from the app's table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import sql

from pgreembed.config import Target
from pgreembed.errors import ConfigError
from pgreembed.observability.redact import redact
from pgreembed.store.slots import NOTIFY_CHANNEL, Slot, load_slots, require_initialized
from pgreembed.store.trusted_sql import NO_PARAMS


@dataclass(frozen=True)
class FailureRecord:
    column: str
    model: str
    role: str
    key: str
    reason: str
    attempts: int
    failed_at: datetime | None

    def as_dict(self) -> dict[str, object]:
        return {"column": self.column, "model": self.model, "role": self.role,
                "key": self.key, "reason": self.reason, "attempts": self.attempts,
                "failed_at": None if self.failed_at is None else self.failed_at.isoformat()}


def select_slots(conn: psycopg.Connection, target: Target, column: str | None) -> list[Slot]:
    """The target's slots (live first), or only the one filling `column`."""
    require_initialized(conn, [target])
    slots = load_slots(conn, target)
    if column is None:
        return slots
    chosen = [s for s in slots if s.vector_column == column]
    if not chosen:
        known = ", ".join(f"{s.vector_column} ({s.role})" for s in slots)
        raise ConfigError(f"--column: target {target.name!r} has no column {column!r} being"
                          f" kept filled (its columns: {known})")
    return chosen


def list_failures(conn: psycopg.Connection, slot: Slot, limit: int
                  ) -> tuple[int, list[FailureRecord]]:
    """(how many rows of the app's table failed in this slot on their current text, the
    `limit` most recent). A row edited since it failed is pending again, not listed."""
    rows = conn.execute(sql.SQL(
        """
        SELECT s.pgr_pk::text, s.pgr_failure, s.pgr_attempts, s.pgr_failed_at,
               count(*) OVER ()
        FROM {rows}
        WHERE {failed}
        ORDER BY s.pgr_failed_at DESC NULLS LAST, s.pgr_pk
        LIMIT %s
        """).format(rows=slot.rows_with_state(), failed=slot.failed()),
        (limit,)).fetchall()
    total = int(rows[0][4]) if rows else 0
    records = [FailureRecord(slot.vector_column, slot.model_key, slot.role, key,
                             redact(reason or ""), attempts, failed_at)
               for key, reason, attempts, failed_at, _ in rows]
    return total, records


def retry_failures(conn: psycopg.Connection, slot: Slot) -> int:
    """Make the slot's failed rows pending again and wake the scheduler; commits.

    Returns how many rows of the app's table are pending again (those failed on their
    current text: a row edited since it failed is pending already).
    """
    # State rows locked in key order, skipping those the app holds (its DELETE's trigger
    # deletes them): waiting for one while holding others could deadlock with the app.
    cur = conn.execute(sql.SQL(
        """
        UPDATE {state} t SET pgr_failed_hash = NULL
        WHERE t.pgr_pk IN (SELECT s.pgr_pk FROM {rows} WHERE {failed}
                           ORDER BY s.pgr_pk FOR UPDATE OF s SKIP LOCKED)
        """).format(state=slot.state_table, rows=slot.rows_with_state(),
                    failed=slot.failed()), NO_PARAMS)
    count = cur.rowcount
    if count:
        conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, slot.target.name))
    conn.commit()
    return count
