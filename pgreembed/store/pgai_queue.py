"""pgai 0.12.1's side of a take-over: its catalog row, its source triggers, its queue and
failed queue, and its `disabled` flag (the SQL; pgreembed.operations.pgai_takeover runs it).

What pgai's worker reads (pgai/vectorizer/vectorizer.py, `_should_continue_processing`):
`SELECT disabled FROM ai.vectorizer WHERE id = ...` before every batch, so setting it stops
the worker between batches; `ai.disable_vectorizer_schedule(id)` is pgai's own function
for it (it also unschedules a timescaledb job). The source triggers
(`_vectorizer_src_trg_<id>` and `..._truncate`) enqueue every insert and update into
`<queue_schema>.<queue_table>` (no unique key: a key may be queued many times); the worker
claims queue rows `FOR UPDATE SKIP LOCKED` and deletes them in the transaction that writes
their chunks. Keys it gave up on are in `<queue_failed_table>` (key, failure_step,
created_at), with the message in `ai._vectorizer_errors` under the same timestamp (both
are written in one transaction, so `recorded = created_at`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from pgreembed.errors import SetupError
from pgreembed.store.parent_keys import ParentKey
from pgreembed.store.pgai_values import Vectorizer
from pgreembed.store.trusted_sql import NO_PARAMS


def key_of(vec: Vectorizer) -> ParentKey:
    """The source's key columns: pgai's queue and failed queue have one column each, named
    and typed as the source's."""
    return ParentKey(tuple(c.name for c in vec.source_pk), tuple(c.type for c in vec.source_pk))


def source_of(vec: Vectorizer) -> sql.Identifier:
    return sql.Identifier(vec.source_schema, vec.source_table)


def queue_of(vec: Vectorizer) -> sql.Identifier:
    return sql.Identifier(vec.queue_schema, vec.queue_table)


def triggers_of(vec: Vectorizer) -> list[str]:
    """Its two triggers on the source: the row trigger and the TRUNCATE one."""
    return [vec.trigger_name, f"{vec.trigger_name}_truncate"]


def triggers_enabled(conn: psycopg.Connection, vec: Vectorizer) -> dict[str, bool]:
    """Its source triggers that exist, and whether each is enabled."""
    return {str(name): state != "D" for name, state in conn.execute(
        "SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = to_regclass(%s)"
        " AND tgname = ANY(%s)", (source_of(vec).as_string(conn), triggers_of(vec))).fetchall()}


@dataclass(frozen=True)
class QueueTaken:
    """What was in pgai's queue: the rows deleted and their distinct keys, and the rows a
    pgai batch in flight holds (claimed before; its commit deletes them) and their keys."""

    deleted: int
    moved: list[Any]
    held: int
    in_flight: list[Any]


def take_queue(conn: psycopg.Connection, vec: Vectorizer) -> QueueTaken:
    """Delete the queue rows no pgai batch holds, and return the distinct keys of both
    kinds in text form (ParentKey.text; the caller marks them; a key may be queued many
    times). Never waits on a pgai batch: its rows are skipped, as its own claim skips ours."""
    key = key_of(vec)
    ids = {"q": queue_of(vec), "key": key.cols(), "text": key.text()}
    moved = conn.execute(sql.SQL(
        "WITH free AS (SELECT ctid FROM {q} FOR UPDATE SKIP LOCKED),"
        " gone AS (DELETE FROM {q} WHERE ctid IN (SELECT ctid FROM free) RETURNING {key})"
        " SELECT {text}, count(*) FROM gone GROUP BY {key} ORDER BY {key}").format(**ids),
        NO_PARAMS).fetchall()
    held = conn.execute(sql.SQL(
        "SELECT {text}, count(*) FROM {q} GROUP BY {key} ORDER BY {key}").format(**ids),
        NO_PARAMS).fetchall()
    return QueueTaken(deleted=sum(int(n) for _, n in moved), moved=[k for k, _ in moved],
                      held=sum(int(n) for _, n in held), in_flight=[k for k, _ in held])


def queue_rows(conn: psycopg.Connection, vec: Vectorizer) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(queue_of(vec)),
                       NO_PARAMS).fetchone()
    return int(row[0]) if row else 0


def hand_back(conn: psycopg.Connection, vec: Vectorizer, keys: list[str]) -> int:
    """Queue `keys` (text form) for pgai's worker (an undo): it re-chunks and re-embeds
    each."""
    if not keys:
        return 0
    key = key_of(vec)
    return conn.execute(sql.SQL(
        "INSERT INTO {q} ({key}) SELECT DISTINCT {values} FROM unnest(%s::text[]) AS t(k)"
    ).format(q=queue_of(vec), key=key.cols(), values=key.from_text(sql.SQL("t.k"))),
        (keys,)).rowcount


@dataclass(frozen=True)
class PgaiFailure:
    key: Any
    step: str
    failed_at: datetime
    reason: str


def failures(conn: psycopg.Connection, vec: Vectorizer) -> list[PgaiFailure]:
    """Keys (text form) in pgai's failed queue, the latest failure per key, with pgai's
    message for it (`ai._vectorizer_errors` rows of the same vectorizer and timestamp)
    when there is one."""
    if vec.queue_failed_table is None:
        return []
    failed = sql.Identifier(vec.queue_schema, vec.queue_failed_table)
    errors = conn.execute("SELECT to_regclass('ai._vectorizer_errors') IS NOT NULL").fetchone()
    message = sql.SQL(
        "(SELECT string_agg(DISTINCT e.message || coalesce(': ' || (e.details ->> 'error_reason'),"
        " ''), '; ') FROM ai._vectorizer_errors e WHERE e.id = %s AND e.recorded = f.created_at)"
    ) if errors == (True,) else sql.SQL("NULL::text")
    params = (vec.id,) if errors == (True,) else ()
    rows = conn.execute(sql.SQL(
        "SELECT DISTINCT ON ({key}) {text}, f.failure_step, f.created_at, {message}"
        " FROM {failed} f ORDER BY {key}, f.created_at DESC").format(
        key=key_of(vec).cols("f"), text=key_of(vec).text("f"), failed=failed,
        message=message), params).fetchall()
    return [PgaiFailure(k, str(step or ""), at,
                        f"pgai gave up at step {step or 'unknown'!r}"
                        + (f": {text}" if text else " (pgai recorded no message)"))
            for k, step, at, text in rows]


def set_disabled(conn: psycopg.Connection, vec: Vectorizer, disabled: bool) -> None:
    """pgai's own switch: its worker checks `disabled` before every batch."""
    function = "disable_vectorizer_schedule" if disabled else "enable_vectorizer_schedule"
    conn.execute(sql.SQL("SELECT ai.{}(%s::int4)").format(sql.Identifier(function)),
                 (vec.id,))


def switch_triggers(conn: psycopg.Connection, vec: Vectorizer, ours: list[str],
                    to_pgreembed: bool) -> None:
    """One ALTER TABLE that disables one side's triggers on the source and enables the
    other's: every write of the app is seen by exactly one of the two, and the statement
    is the whole of the lock's cost (SHARE ROW EXCLUSIVE, as long as the transaction)."""
    pgai = list(triggers_enabled(conn, vec))
    if not pgai:
        raise SetupError(f"pgai vectorizer {vec.name!r}: its triggers"
                         f" {', '.join(triggers_of(vec))} are not on"
                         f" {vec.source_schema}.{vec.source_table}")
    off, on = (pgai, ours) if to_pgreembed else (ours, pgai)
    conn.execute(sql.SQL("ALTER TABLE {} {}").format(source_of(vec), sql.SQL(", ").join(
        [sql.SQL("DISABLE TRIGGER {}").format(sql.Identifier(t)) for t in off]
        + [sql.SQL("ENABLE TRIGGER {}").format(sql.Identifier(t)) for t in on])))


def held_rows(conn: psycopg.Connection, vec: Vectorizer) -> int:
    """Queue rows a pgai batch in flight holds (it claims them FOR UPDATE and deletes them
    when it commits); the caller rolls back (the probe locks the free rows for a moment)."""
    row = conn.execute(sql.SQL(
        "SELECT (SELECT count(*) FROM {q})"
        " - (SELECT count(*) FROM (SELECT FROM {q} FOR UPDATE SKIP LOCKED) free)").format(
        q=queue_of(vec)), NO_PARAMS).fetchone()
    return int(row[0]) if row else 0
