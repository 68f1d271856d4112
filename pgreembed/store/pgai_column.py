"""A column destination's take-over from pgai, the SQL (operations.pgai_column_takeover runs it).

pgai's column destination writes the vector into the source row itself, so the keys in
its queue become pgreembed's ordinary pending rows: their vector set NULL (the text may
have changed since pgai embedded it; pgai keeps the old vector until it re-embeds), in
key order with FOR UPDATE SKIP LOCKED, so a row an app transaction holds is never waited
on: its key stays in `pgreembed.pgai_takeovers.in_flight` and is set once free (a crash
in between: the next `--take-over` finishes it). pgai's failed keys are recorded in the
slot's state table as failed on their current text, with pgai's reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from pgreembed.store.pgai_cutover import result_row
from pgreembed.store.pgai_queue import queue_of, source_of
from pgreembed.store.pgai_values import Vectorizer
from pgreembed.store.slots import NOTIFY_CHANNEL, Slot
from pgreembed.store.takeover import PAUSED_BY_PGAI, failure_arrays


@dataclass(frozen=True)
class ColumnSwitched:
    deleted: int  # pgai queue rows deleted (no pgai batch held them)
    queued: list[str]  # their distinct keys, as text
    pending: list[str]  # ... whose vector was set NULL now (or already NULL)
    left: list[str]  # queued keys left for later: rows an app transaction holds, and the
    # keys a pgai batch in flight holds (kept in the registry until done)
    held: int  # queue rows a pgai batch in flight holds
    failed_recorded: int  # pgai's failed keys recorded as failed here
    failed_superseded: int  # ... queued again since: pending instead


def make_pending(conn: psycopg.Connection, slot: Slot, keys: Sequence[str]) -> list[str]:
    """Set the vector NULL of the rows `keys` (text) names, those no transaction holds
    (key order, SKIP LOCKED); returns the keys done (rows gone count as done)."""
    if not keys:
        return []
    ids = {"table": slot.table, "pk": slot.pk, "vector": slot.vector, "type": slot.pk_cast}
    locked = conn.execute(sql.SQL(
        "WITH wanted AS (SELECT {pk} FROM {table} WHERE {pk} = ANY(%s::text[]::{type}[])),"
        " free AS (SELECT a.{pk} FROM {table} a WHERE a.{pk} IN (SELECT {pk} FROM wanted)"
        "  ORDER BY a.{pk} FOR UPDATE SKIP LOCKED),"
        " cleared AS (UPDATE {table} a SET {vector} = NULL FROM free WHERE a.{pk} = free.{pk}"
        "  AND a.{vector} IS NOT NULL RETURNING 1)"
        " SELECT ARRAY(SELECT {pk}::text FROM wanted EXCEPT SELECT {pk}::text FROM free),"
        " (SELECT count(*) FROM cleared)").format(**ids), (list(keys),)).fetchone()
    held = set(locked[0]) if locked else set()
    return [k for k in keys if k not in held]


def switch_column(conn: psycopg.Connection, vec: Vectorizer, slot: Slot, target: str,
                  pgai_triggers: list[str], ours: list[str],
                  failed: Sequence[tuple[Any, datetime, str]]) -> ColumnSwitched:
    """In the caller's transaction (run_locked, SHARE ROW EXCLUSIVE on the source): pgai's
    triggers off and ours on in one ALTER TABLE, the free queue rows deleted and their rows
    made pending, pgai's failures recorded (but of keys queued again since), what could not
    be done now kept in the registry, a pause pgai's charge put on the column lifted (only
    now: the scheduler must not send a failed row before its failure is recorded), the
    scheduler woken."""
    switch = sql.SQL(", ").join(
        [sql.SQL("DISABLE TRIGGER {}").format(sql.Identifier(t)) for t in pgai_triggers]
        + [sql.SQL("ENABLE TRIGGER {}").format(sql.Identifier(t)) for t in ours])
    key = sql.Identifier(slot.primary_key)
    cur = conn.execute(sql.SQL(
        "ALTER TABLE {source} {switch};\n"
        "WITH free AS (SELECT ctid FROM {q} FOR UPDATE SKIP LOCKED),"
        " gone AS (DELETE FROM {q} WHERE ctid IN (SELECT ctid FROM free) RETURNING {key})"
        " SELECT (SELECT count(*) FROM gone), ARRAY(SELECT DISTINCT {key}::text FROM gone),"
        " ARRAY(SELECT DISTINCT {key}::text FROM {q} WHERE ctid NOT IN"
        "  (SELECT ctid FROM free)), (SELECT count(*) FROM {q} WHERE ctid NOT IN"
        "  (SELECT ctid FROM free))").format(source=source_of(vec), switch=switch,
                                              q=queue_of(vec), key=key))
    row = result_row(cur)
    deleted, queued, in_flight, held = int(row[0]), list(row[1]), list(row[2]), int(row[3])
    pending = make_pending(conn, slot, queued)
    again = {*queued, *in_flight}
    kept = [f for f in failed if str(f[0]) not in again]
    recorded = record_failures(conn, slot, kept)
    left = sorted({*(k for k in queued if k not in set(pending)), *in_flight})
    conn.execute(
        "INSERT INTO pgreembed.pgai_takeovers AS t (target, vectorizer_id, vectorizer, state,"
        " in_flight, taken_at) VALUES (%s, %s, %s, 'taken', %s, now())"
        " ON CONFLICT (target) DO UPDATE SET vectorizer_id = EXCLUDED.vectorizer_id,"
        " vectorizer = EXCLUDED.vectorizer, state = 'taken', taken_at = now(),"
        " undone_at = NULL, in_flight = ARRAY(SELECT DISTINCT unnest(t.in_flight"
        " || EXCLUDED.in_flight))", (target, vec.id, vec.name, left))
    conn.execute("UPDATE pgreembed.slots SET paused = false, paused_by = NULL WHERE id = %s"
                 " AND paused_by = %s", (slot.id, PAUSED_BY_PGAI))
    conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, target))
    return ColumnSwitched(deleted, queued, pending, left, held, recorded,
                          len(failed) - len(kept))


def keep_left(conn: psycopg.Connection, target: str, left: Sequence[str]) -> None:
    conn.execute("UPDATE pgreembed.pgai_takeovers SET in_flight = %s WHERE target = %s",
                 (list(left), target))


def record_failures(conn: psycopg.Connection, slot: Slot,
                    failed: Sequence[tuple[Any, datetime, str]]) -> int:
    """pgai's failed keys as failed on their current text (a row gone is skipped): such a
    row is not sent again until its text changes, like any row failed here."""
    if not failed:
        return 0
    ids = {"state": slot.state_table, "table": slot.table, "pk": slot.pk,
           "type": slot.pk_cast, "hash": slot.hash_expr}
    return conn.execute(sql.SQL(
        "INSERT INTO {state} (pgr_pk, pgr_failed_hash, pgr_failure, pgr_attempts,"
        " pgr_failed_at) SELECT a.{pk}, {hash}, f.pgr_reason, 1, f.pgr_at"
        " FROM unnest(%s::text[], %s::timestamptz[], %s::text[]) AS f(pgr_k, pgr_at,"
        " pgr_reason) JOIN {table} a ON a.{pk} = f.pgr_k::{type}"
        " ON CONFLICT (pgr_pk) DO UPDATE SET pgr_failed_hash = EXCLUDED.pgr_failed_hash,"
        " pgr_failure = EXCLUDED.pgr_failure, pgr_attempts = EXCLUDED.pgr_attempts,"
        " pgr_failed_at = EXCLUDED.pgr_failed_at").format(**ids),
        failure_arrays(failed)).rowcount


def pending_keys(conn: psycopg.Connection, slot: Slot) -> list[str]:
    """Rows whose vector is NULL (pending or failed): an undo hands them to pgai."""
    return [str(r[0]) for r in conn.execute(sql.SQL(
        "SELECT {pk}::text FROM {table} WHERE {vector} IS NULL").format(
        pk=slot.pk, table=slot.table, vector=slot.vector)).fetchall()]
